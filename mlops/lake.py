"""The lake: one Parquet file per asset partition under a base URL (any fsspec filesystem).

Layout: <base>/<spec>/<asset>/<partition>.parquet. Writes go to a hidden temporary name in
the same folder and are renamed into place, so readers never see a half-written file and a
re-materialization replaces exactly one partition. Files are written deterministically
(same rows -> same bytes), so a partition's content hash is its data version.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem

UNPARTITIONED = "__all__"


@dataclass(frozen=True)
class WriteResult:
    path: str
    rows: int
    content_hash: str  # sha256 of the file's bytes: the partition's data version


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Lake:
    """Parquet partitions under `base_url` (a local path or any fsspec URL)."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.base_url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

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
        return self.fs.exists(self.path(spec, asset, partition))

    def partitions(self, spec: str, asset: str) -> list[str]:
        """Partition keys present for an asset, sorted (temporary files are not listed)."""
        folder = f"{self.root}/{spec}/{asset}"
        if not self.fs.exists(folder):
            return []
        names = [Path(p).name for p in self.fs.ls(folder, detail=False)]
        return sorted(n.removesuffix(".parquet") for n in names if _visible(n))

    # Writes ------------------------------------------------------------------------------
    def write(
        self, spec: str, asset: str, df: pl.DataFrame, partition: str = UNPARTITIONED
    ) -> WriteResult:
        """Atomically replace one partition with `df`."""
        buf = io.BytesIO()
        # No statistics timestamps or writer ids in the file: same frame -> same bytes.
        df.write_parquet(buf, compression="zstd", statistics=True)
        data = buf.getvalue()
        final = self.path(spec, asset, partition)
        folder = final.rsplit("/", 1)[0]
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{Path(final).name}"
        self.fs.makedirs(folder, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        return WriteResult(
            path=self.url(spec, asset, partition), rows=df.height, content_hash=sha256_bytes(data)
        )

    def delete(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> None:
        p = self.path(spec, asset, partition)
        if self.fs.exists(p):
            self.fs.rm(p)

    # Reads -------------------------------------------------------------------------------
    def read(self, spec: str, asset: str, partition: str = UNPARTITIONED) -> pl.DataFrame:
        p = self.path(spec, asset, partition)
        if not self.fs.exists(p):
            raise FileNotFoundError(
                f"{self.url(spec, asset, partition)} does not exist: materialize "
                f"{spec}/{asset} for partition {partition} first"
            )
        with self.fs.open(p, "rb") as f:
            return pl.read_parquet(f)

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
        one writer per database file, so nothing keeps a DuckDB file open.
        """
        con = duckdb.connect()
        if not self.is_local:
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


def write_json(lake: Lake, spec: str, asset: str, key: str, doc: dict) -> str:
    """Atomically write a small JSON document next to an asset's partitions."""
    import json

    folder = f"{lake.root}/{spec}/{asset}"
    final = f"{folder}/{key}.json"
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{key}.json"
    lake.fs.makedirs(folder, exist_ok=True)
    with lake.fs.open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True, default=str))
    lake.fs.mv(tmp, final)
    return final


def read_json(lake: Lake, spec: str, asset: str, key: str) -> dict | None:
    import json

    path = f"{lake.root}/{spec}/{asset}/{key}.json"
    if not lake.fs.exists(path):
        return None
    with lake.fs.open(path, "r") as f:
        return json.loads(f.read())
