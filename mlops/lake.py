"""The lake: one Parquet file per asset partition under a base URL (any fsspec filesystem).

Layout: <base>/<spec>/<asset>/<partition>.parquet. Writes are atomic, so readers never see a
half-written file and a re-materialization replaces exactly one partition: on a local (or
other rename-capable) filesystem a file is written under a hidden temporary name in the
same folder and renamed into place; on an object store (s3://, gs://, az://, ...), where a
rename is a copy plus a delete, the object is written with one PUT to its final key, and an
object store makes an object visible only once its upload completes. Files are written
deterministically (same rows -> same bytes), so a partition's content hash is its data
version.

Every file the platform writes goes through the same atomic path: lake partitions
(`Lake.write`), documents and reports beside them (`Lake.put_bytes` / `put_text`, `write_json`)
and files outside the lake, local or remote (`put_file`, e.g. an evaluation's plots before
they go to MLflow). A write that fails half-way leaves the previous file as it was.

Remote lakes take fsspec storage options from `Lake(url, storage_options=...)` and from
fsspec's environment configuration, read when the Lake is made: FSSPEC_<PROTOCOL>_<OPTION>,
e.g. FSSPEC_S3_ENDPOINT_URL=http://minio:9000 for an S3-compatible store (credentials the
usual way: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role). DuckDB reads
remote partitions through the same fsspec filesystem (registered on each connection), so no
DuckDB extension (httpfs) is needed or downloaded.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import duckdb
    import fsspec
    import polars as pl
else:
    from mlops.lazy import duckdb, fsspec
    from mlops.lazy import polars as pl

UNPARTITIONED = "__all__"
T = TypeVar("T")
# Filesystems where an object appears whole when its single upload completes, and where a
# rename is a copy plus a delete: written with one PUT to the final key.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2", "memory"}
)


@dataclass(frozen=True)
class WriteResult:
    path: str
    rows: int
    content_hash: str  # sha256 of the file's bytes: the partition's data version


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def env_storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for a protocol from the environment now (FSSPEC_S3_ENDPOINT_URL=...)."""
    conf: dict[str, dict[str, Any]] = {}
    fsspec.config.set_conf_env(conf)
    return dict(conf.get(protocol, {}))


class Lake:
    """Parquet partitions under `base_url` (a local path or any fsspec URL).

    `storage_options` go to the fsspec filesystem (for s3://: endpoint_url, key, secret,
    client_kwargs, ...); they override FSSPEC_<PROTOCOL>_<OPTION> environment variables.
    """

    def __init__(self, base_url: str, storage_options: Mapping[str, Any] | None = None):
        from fsspec.implementations.local import LocalFileSystem

        self.base_url = base_url.rstrip("/")
        protocol = fsspec.core.split_protocol(self.base_url)[0] or "file"
        options = {**env_storage_options(protocol), **(storage_options or {})}
        self.fs, root = fsspec.core.url_to_fs(self.base_url, **options)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.is_object_store = _is_object_store(self.fs)

    # Paths -------------------------------------------------------------------------------
    def path(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> str:
        return f"{self.root}/{spec}/{asset}/{partition}.parquet"

    def url(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> str:
        """A path DuckDB and humans can use: plain path for local, protocol URL otherwise."""
        p = self.path(spec, asset, partition)
        if self.is_local:
            return p
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{p}"

    def exists(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> bool:
        path = self.path(spec, asset, partition)
        self._forget_listing(path)
        return self.fs.exists(path)

    def _forget_listing(self, path: str) -> None:
        # Remote filesystems cache listings per process; another process may have written.
        if not self.is_local:
            self.fs.invalidate_cache(path.rsplit("/", 1)[0])

    def partitions(self, spec: str, asset: str) -> list[str]:
        """Partition keys present for an asset, sorted (temporary files are not listed)."""
        folder = f"{self.root}/{spec}/{asset}"
        self._forget_listing(f"{folder}/")
        if not self.fs.exists(folder):
            return []
        names = [Path(p).name for p in self.fs.ls(folder, detail=False)]
        return sorted(n.removesuffix(".parquet") for n in names if _visible(n))

    # Writes ------------------------------------------------------------------------------
    def write(
        self, spec: str, asset: str, df: pl.DataFrame, partition: str = UNPARTITIONED
    ) -> WriteResult:
        """Atomically replace one partition with `df`."""
        final = self.path(spec, asset, partition)
        # No statistics timestamps or writer ids in the file: same frame -> same bytes.
        if self.is_local:  # straight to the temporary file: the bytes are never in memory

            def write(tmp: str) -> str:
                df.write_parquet(tmp, compression="zstd", statistics=True)
                with open(tmp, "rb") as f:
                    return hashlib.file_digest(f, "sha256").hexdigest()

            digest = _replace_local(self.fs, final, write)
        else:
            buf = io.BytesIO()
            df.write_parquet(buf, compression="zstd", statistics=True)
            with buf.getbuffer() as data:  # a view of the buffer: no second copy of the file
                self.put_atomic(final, data)
                digest = sha256_bytes(data)
        return WriteResult(
            path=self.url(spec, asset, partition), rows=df.height, content_hash=digest
        )

    def put_atomic(self, final: str, data: bytes | memoryview) -> None:
        """Make `final` (a path in this lake's filesystem) hold `data`, all or nothing."""
        _put_atomic(self.fs, final, data, self.is_object_store)

    def key_path(self, key: str) -> str:
        """The path of `key` (`<spec>/<asset>/<name>`, relative to the base URL)."""
        parts = key.strip("/").split("/")
        if not key.strip("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"lake key {key!r}: give <spec>/<asset>/<file>, no '..' or '//'")
        return f"{self.root}/{'/'.join(parts)}"

    def put_bytes(self, key: str, data: bytes) -> str:
        """Atomically make the file at `key` (relative to the base URL) hold `data`; its path."""
        final = self.key_path(key)
        self.put_atomic(final, data)
        return final

    def put_text(self, key: str, text: str) -> str:
        """`put_bytes` of UTF-8 text (an HTML report, a JSON or Markdown document)."""
        return self.put_bytes(key, text.encode("utf-8"))

    def delete(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> None:
        p = self.path(spec, asset, partition)
        if self.fs.exists(p):
            self.fs.rm(p)

    # Reads -------------------------------------------------------------------------------
    def read(
        self,
        spec: str,
        asset: str,
        partition: str = UNPARTITIONED,
        columns: list[str] | None = None,
    ) -> pl.DataFrame:
        """One partition (only `columns`, in that order, when given)."""
        p = self._existing(spec, asset, partition)
        if self.is_local:  # by path: polars reads only the columns' pages, not the whole file
            return pl.read_parquet(p, columns=columns)
        with self.fs.open(p, "rb") as f:
            return pl.read_parquet(f, columns=columns)

    def columns(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> list[str]:
        """A partition's column names, from the file's footer (no data read)."""
        with self.fs.open(self._existing(spec, asset, partition), "rb") as f:
            return list(pl.read_parquet_schema(f))

    def _existing(self, spec: str, asset: str, partition: str) -> str:
        p = self.path(spec, asset, partition)
        self._forget_listing(p)
        if not self.fs.exists(p):
            raise FileNotFoundError(
                f"{self.url(spec, asset, partition)} does not exist: materialize "
                f"{spec}/{asset} for partition {partition} first"
            )
        return p

    def read_many(self, spec: str, asset: str, partitions: Iterable[str]) -> pl.DataFrame:
        frames = [self.read(spec, asset, p) for p in partitions]
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="vertical_relaxed")

    def content_hash(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> str:
        with self.fs.open(self.path(spec, asset, partition), "rb") as f:
            return sha256_bytes(f.read())

    # DuckDB ------------------------------------------------------------------------------
    def duckdb(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection that can read this lake's files.

        In-memory on purpose: Dagster runs steps in separate processes and DuckDB allows
        one writer per database file, so nothing keeps a DuckDB file open. A remote lake's
        fsspec filesystem is registered with the connection, so DuckDB reads s3://... (or
        any protocol) through it, with the lake's credentials and endpoint, and needs no
        extension; extensions are never downloaded for it.
        """
        con = duckdb.connect()
        if not self.is_local:
            con.execute("SET autoinstall_known_extensions = false")
            con.register_filesystem(self.fs)
        return con

    def relation_sql(self, spec: str, asset: str, partitions: Iterable[str]) -> str:
        """`read_parquet([...])` over the given partitions, for use inside a DuckDB query."""
        urls = [self.url(spec, asset, p) for p in partitions]
        if not urls:
            raise ValueError(f"no partitions of {spec}/{asset} to read")
        listed = ", ".join("'" + u.replace("'", "''") + "'" for u in urls)
        return f"read_parquet([{listed}], union_by_name = true)"

    def query(self, sql: str) -> pl.DataFrame:
        con = self.duckdb()
        try:
            return con.sql(sql).pl()
        finally:
            con.close()


def _visible(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(".")


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & OBJECT_STORE_PROTOCOLS)


def _put_atomic(
    fs: fsspec.AbstractFileSystem, final: str, data: bytes | memoryview, object_store: bool
) -> None:
    """The one atomic write: every file the platform writes ends here."""
    if object_store:
        data = bytes(data)  # fsspec object stores' pipe_file takes bytes
        # One PUT to the final key: the object appears whole or not at all (a rename
        # would be a copy plus a delete, with a window where both exist).
        fs.pipe_file(final, data)
        return

    def write(tmp: str) -> None:
        with fs.open(tmp, "wb") as f:
            f.write(data)

    _replace_local(fs, final, write)


def _replace_local(fs: fsspec.AbstractFileSystem, final: str, write: Callable[[str], T]) -> T:
    """`write` a file under a hidden temporary name beside `final`, then rename it into place
    (a rename-capable filesystem); a failure removes the temporary file. `write`'s result."""
    folder, name = final.rsplit("/", 1) if "/" in final else (".", final)
    # Hidden, and not *.parquet: a glob over the folder (duckdb, polars) never reads it.
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}.partial"
    fs.makedirs(folder, exist_ok=True)
    try:
        out = write(tmp)
        fs.mv(tmp, final)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return out


def put_file(
    url: str | Path, data: bytes | str, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Atomically make the file at `url` (a local path or any fsspec URL) hold `data` (text
    is written as UTF-8), as the lake writes its partitions; returns `url` as a string.

    For files outside the lake: reports, plots, summaries, a generated spec."""
    url = str(url)
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = {**env_storage_options(protocol), **(storage_options or {})}
    fs, path = fsspec.core.url_to_fs(url, **options)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    _put_atomic(fs, path, payload, _is_object_store(fs))
    return url


def write_json(lake: Lake, spec: str, asset: str, key: str, doc: dict) -> str:
    """Atomically write a small JSON document next to an asset's partitions."""
    import json

    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    return lake.put_text(f"{spec}/{asset}/{key}.json", text)


def read_json(lake: Lake, spec: str, asset: str, key: str) -> dict | None:
    import json

    path = f"{lake.root}/{spec}/{asset}/{key}.json"
    lake._forget_listing(path)
    if not lake.fs.exists(path):
        return None
    with lake.fs.open(path, "r") as f:
        return json.loads(f.read())
