"""Read-only views of the model registry for the CLI's report verbs, without importing MLflow.

`mlops status`, `history`, `lineage` and `impact` only read: aliases, versions and their tags.
Importing mlflow and opening its SQLAlchemy store takes seconds (alembic checks the schema on
every open); the default profile's registry is one SQLite file. So a `sqlite:///` tracking URI
is read straight from its tables, read-only, and every other URI (the MLflow server, PostgreSQL)
goes through MlflowClient: the same answers, only slower. A file whose tables are not the
expected ones (another MLflow schema, workspaces in use) goes through the client too.

Writes never come here: they go through mlops/registry.py and MLflow.
"""

from __future__ import annotations

import sqlite3
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


class _Closing:
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SqliteRegistry(_Closing):
    """A `sqlite:///` MLflow backend store, opened read-only (a missing file: no models)."""

    def __init__(self, path: Path) -> None:
        self.path = path
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
            return SqliteRegistry(path)
        except (LookupError, sqlite3.Error):
            pass
    return ClientRegistry(tracking_uri)
