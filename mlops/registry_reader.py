"""Read-only views of the model registry for the CLI's report verbs, without importing MLflow.

`mlops status`, `history`, `lineage` and `impact` only read: aliases, versions and their tags.
Importing mlflow and opening its SQLAlchemy store takes seconds (alembic checks the schema on
every open); the default profile's registry is one SQLite file. So a `sqlite:///` tracking URI
is read straight from its tables, read-only, and every other URI (the MLflow server, PostgreSQL)
goes through MlflowClient: the same answers, only slower. A file whose tables are not the
expected ones (another MLflow schema, workspaces in use) goes through the client too.

Data versions (`lineage`, `impact`): a version records the data version of each input partition
in its training run's artifact mlops/registry.LINEAGE_ARTIFACT, and only their digest as a tag
(older versions: one tag per partition, read as before). `data_versions(v)` reads that artifact
and checks it against the digest. SqliteRegistry finds the run's artifact folder in the same
file (runs.artifact_uri) and, when it is local (a `file:` URI or a plain path: the default
profile), reads the JSON straight from disk, still without MLflow: `impact` over every version
is one SQL query for the tags plus one small file per version. An artifact store MLflow alone
can reach (the server's mlflow-artifacts:/, S3, ...) is read through MlflowClient.

Writes never come here: they go through mlops/registry.py and MLflow.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

# MLflow keeps a deleted version's row with this stage; its searches leave such rows out.
DELETED_STAGE = "Deleted_Internal"
_TABLES = {
    "model_versions": ("name", "version", "creation_time", "run_id", "current_stage"),
    "model_version_tags": ("name", "version", "key", "value"),
    "registered_model_aliases": ("name", "alias", "version"),
}


@dataclass(frozen=True)
class VersionInfo:
    version: int
    run_id: str | None
    creation_timestamp: int | None  # ms since the epoch, as MLflow records it
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)


class RegistryReader(Protocol):
    def versions(self, model_name: str) -> list[VersionInfo]:
        """Every live version of the model, oldest first (empty: no such model)."""
        ...

    def alias_version(self, model_name: str, alias: str) -> int | None: ...

    def data_versions(self, v: VersionInfo) -> dict[str, dict[str, str]]:
        """{asset: {partition: content hash}} of the version's inputs ({}: none recorded);
        RegistryError when its artifact cannot be read or does not match the digest."""
        ...


def _data_versions(
    v: VersionInfo, from_artifact: Callable[[str | None, str], dict[str, dict[str, str]]]
) -> dict[str, dict[str, str]]:
    """The version's own tags when they hold the data versions (older versions, or none
    recorded), else from_artifact(run id, digest)."""
    from mlops import registry

    versions = registry.legacy_data_versions(v.tags)
    if versions is not None:
        return versions
    return from_artifact(
        registry.run_id_of(v.tags, v.run_id), v.tags[registry.DATA_VERSIONS_DIGEST_TAG]
    )


class _Closing:
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SqliteRegistry(_Closing):
    """A `sqlite:///` MLflow backend store, opened read-only (a missing file: no models)."""

    def __init__(self, path: Path, tracking_uri: str | None = None) -> None:
        self.path = path
        # For the artifacts only MLflow can reach.
        self.tracking_uri = tracking_uri or f"sqlite:///{path.resolve()}"
        self._conn: sqlite3.Connection | None = None
        if path.exists():
            self._conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                self._check_schema()
            except Exception:
                self.close()
                raise

    def _check_schema(self) -> None:
        assert self._conn is not None
        for table, wanted in _TABLES.items():
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in wanted if c not in have]
            if missing:
                raise LookupError(f"{self.path}: {table} lacks {', '.join(missing)}")
            if "workspace" in have:
                (n,) = self._conn.execute(
                    f"SELECT COUNT(DISTINCT workspace) FROM {table}"
                ).fetchone()
                if n > 1:  # several MLflow workspaces: which one is the client's to say
                    raise LookupError(f"{self.path}: {table} holds several workspaces")

    def versions(self, model_name: str) -> list[VersionInfo]:
        if self._conn is None:
            return []
        rows = self._conn.execute(
            "SELECT version, run_id, creation_time FROM model_versions "
            "WHERE name = ? AND (current_stage IS NULL OR current_stage != ?) ORDER BY version",
            (model_name, DELETED_STAGE),
        ).fetchall()
        tags: dict[int, dict[str, str]] = {}
        for version, key, value in self._conn.execute(
            "SELECT version, key, value FROM model_version_tags WHERE name = ?", (model_name,)
        ):
            tags.setdefault(int(version), {})[key] = value
        aliases: dict[int, list[str]] = {}
        for alias, version in self._conn.execute(
            "SELECT alias, version FROM registered_model_aliases WHERE name = ? ORDER BY alias",
            (model_name,),
        ):
            aliases.setdefault(int(version), []).append(alias)
        return [
            VersionInfo(int(v), run_id, created, tags.get(int(v), {}), aliases.get(int(v), []))
            for v, run_id, created in rows
        ]

    def alias_version(self, model_name: str, alias: str) -> int | None:
        if self._conn is None:
            return None
        row = self._conn.execute(
            "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
            (model_name, alias),
        ).fetchone()
        return int(row[0]) if row else None

    def data_versions(self, v: VersionInfo) -> dict[str, dict[str, str]]:
        return _data_versions(v, self._from_artifact)

    def _from_artifact(self, run_id: str | None, digest: str) -> dict[str, dict[str, str]]:
        from mlops import registry

        root = self._artifact_uri(run_id)
        folder = local_folder(root) if root else None
        if folder is None:  # not on this disk (or not in this file): MLflow knows how
            return registry.load_data_versions(self.tracking_uri, run_id, digest)
        path = folder / registry.LINEAGE_ARTIFACT
        try:
            text = path.read_text()
        except OSError as e:
            raise registry.RegistryError(
                f"cannot read run {run_id}'s lineage artifact {path}: {e.strerror or e}; the "
                "version records its input data versions there: restore the run's artifacts"
            ) from None
        return registry.data_versions_from_artifact(text, digest, str(path))

    def _artifact_uri(self, run_id: str | None) -> str | None:
        if self._conn is None or not run_id:
            return None
        try:
            row = self._conn.execute(
                "SELECT artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone()
        except sqlite3.Error:  # a schema without it: the client's turn
            return None
        return row[0] if row and row[0] else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ClientRegistry(_Closing):
    """The same through MlflowClient (any tracking URI MLflow can open)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def versions(self, model_name: str) -> list[VersionInfo]:
        from mlops import registry

        by_version = registry.aliases(self.tracking_uri, model_name)
        return [
            VersionInfo(
                int(mv.version),
                mv.run_id,
                mv.creation_timestamp,
                dict(mv.tags or {}),
                sorted(by_version.get(int(mv.version), [])),
            )
            for mv in registry.search_versions(self.tracking_uri, model_name)
        ]

    def alias_version(self, model_name: str, alias: str) -> int | None:
        from mlops import registry

        return registry.alias_version(self.tracking_uri, model_name, alias)

    def data_versions(self, v: VersionInfo) -> dict[str, dict[str, str]]:
        from mlops import registry

        return _data_versions(
            v, lambda run_id, digest: registry.load_data_versions(self.tracking_uri, run_id, digest)
        )


def local_folder(uri: str) -> Path | None:
    """The folder of a `file:` URI (no host, or localhost) or a plain path; None for any
    other scheme (the artifact store is elsewhere: s3://, mlflow-artifacts:/, ...)."""
    parts = urlsplit(uri)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return Path(unquote(parts.path))
    if len(parts.scheme) <= 1:  # a path (a single letter: a Windows drive)
        return Path(uri)
    return None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a `sqlite:///abs/path` (or `sqlite:///rel/path`) URI; None otherwise."""
    parts = urlsplit(tracking_uri)
    if parts.scheme != "sqlite" or parts.query:
        return None
    path = unquote(parts.path)
    if not path or path == "/" or ":memory:" in path:
        return None
    # SQLAlchemy's rule: sqlite:///x.db is the relative path x.db (from the working
    # directory, as MLflow opens it), sqlite:////abs/x.db the absolute path /abs/x.db.
    return Path(path[1:] if path.startswith("/") else path)


def open_registry(tracking_uri: str) -> Any:
    """A reader of the registry at `tracking_uri`; use it in a `with` block (or close() it)."""
    path = sqlite_path(tracking_uri)
    if path is not None:
        try:
            return SqliteRegistry(path, tracking_uri)
        except (LookupError, sqlite3.Error):
            pass
    return ClientRegistry(tracking_uri)
