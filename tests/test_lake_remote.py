"""The lake on an object store: an S3 bucket on a moto server on 127.0.0.1, through s3fs.

The same runs on a local lake and on s3:// give the same bytes; writes are single PUTs to the
final key (no rename, which is a copy plus a delete there); DuckDB reads the bucket through
the lake's fsspec filesystem, without its httpfs extension.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import uuid
from collections.abc import Iterator

import dagster as dg
import fsspec
import polars as pl
import pytest

from mlops.lake import Lake, read_json, write_json
from orchestration.definitions import build_definitions
from tests.conftest import Project, make_project, materialization_meta, small_data

DAILY = ("raw_data", "validated_data", "quarantine", "labels", "features")
DAYS = [f"2026-01-0{i}" for i in range(1, 7)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, and the environment that points s3fs at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask a metadata service
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "NO_PROXY": "127.0.0.1",
        }.items():
            mp.setenv(k, v)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch) -> str:
    """A fresh bucket; the lake finds the endpoint through fsspec's environment config."""
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_endpoint)
    name = f"lake-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3", endpoint_url=s3_endpoint).mkdir(name)
    return name


def _frame(n: int = 50, offset: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "entity": [f"m{i % 5}" for i in range(n)],
            "ts": [dt.datetime(2026, 1, 1) + dt.timedelta(minutes=i) for i in range(n)],
            "x": [i * 0.5 + offset for i in range(n)],
        }
    )


def _no_rename(monkeypatch, lake: Lake) -> None:
    """Make any rename/copy on the lake's filesystem fail the test (copy + delete on S3)."""

    def rename(*_a, **_k):
        raise AssertionError("the lake renamed (copy + delete) on an object store")

    # fsspec caches filesystems per options: every Lake on this URL (the Dagster resource's
    # too) shares this instance, so patching it covers their writes.
    assert Lake(lake.base_url).fs is lake.fs
    for method in ("mv", "move", "rename", "copy", "cp_file"):
        monkeypatch.setattr(lake.fs, method, rename)


def test_lake_reads_writes_and_queries_an_s3_bucket(bucket, monkeypatch):
    lake = Lake(f"s3://{bucket}/lake")
    assert lake.is_object_store and not lake.is_local
    _no_rename(monkeypatch, lake)
    a = lake.write("s", "t", _frame(), "2026-01-01")
    b = lake.write("s", "t", _frame(offset=100), "2026-01-02")
    assert a.path == f"s3://{bucket}/lake/s/t/2026-01-01.parquet"
    assert lake.partitions("s", "t") == ["2026-01-01", "2026-01-02"]
    assert lake.read("s", "t", "2026-01-02").equals(_frame(offset=100))
    assert lake.content_hash("s", "t", "2026-01-01") == a.content_hash != b.content_hash
    # Same rows, same bytes as on a local lake.
    assert a.content_hash == Lake("memory://same-bytes").write("s", "t", _frame()).content_hash
    # DuckDB through the registered fsspec filesystem: no httpfs, filenames are lake URLs.
    rel = lake.relation_sql("s", "t", ["2026-01-01", "2026-01-02"])
    out = lake.query(f"SELECT count(*) AS n, max(x) AS mx FROM {rel}")
    assert out.row(0) == (100, 124.5)
    files = lake.query(f"SELECT DISTINCT filename FROM {rel[:-1]}, filename = true) ORDER BY 1")
    assert files["filename"].to_list() == [a.path, b.path]
    con = lake.duckdb()
    try:
        loaded = con.sql(
            "SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'httpfs'"
        ).fetchall()
    finally:
        con.close()
    assert loaded in ([], [(False,)])
    # JSON documents next to partitions, and deletes.
    write_json(lake, "s", "docs", "v1", {"a": 1})
    assert read_json(lake, "s", "docs", "v1") == {"a": 1}
    assert read_json(lake, "s", "docs", "v2") is None
    lake.delete("s", "t", "2026-01-01")
    assert lake.partitions("s", "t") == ["2026-01-02"]
    assert not lake.exists("s", "t", "2026-01-01")


def test_failed_put_leaves_the_old_object(bucket, monkeypatch):
    lake = Lake(f"s3://{bucket}/lake")
    lake.write("s", "t", _frame(), "2026-01-01")
    before = lake.content_hash("s", "t", "2026-01-01")

    def crash(*_a, **_k):  # fault injection: the upload dies
        raise OSError("connection reset")

    monkeypatch.setattr(lake.fs, "pipe_file", crash)
    with pytest.raises(OSError, match="connection reset"):
        lake.write("s", "t", _frame(offset=5.0), "2026-01-01")
    monkeypatch.undo()
    assert lake.content_hash("s", "t", "2026-01-01") == before
    assert lake.fs.find(f"{bucket}/lake") == [f"{bucket}/lake/s/t/2026-01-01.parquet"]


def test_storage_options_override_the_environment(bucket, s3_endpoint, monkeypatch):
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL")
    lake = Lake(f"s3://{bucket}/lake", storage_options={"endpoint_url": s3_endpoint})
    assert lake.fs.endpoint_url == s3_endpoint  # checked before any request leaves
    lake.write("s", "t", _frame(), "2026-01-01")
    assert lake.partitions("s", "t") == ["2026-01-01"]


def _s3_project(files: Project, bucket: str) -> Project:
    """The same specs and landing files, with the lake in the bucket."""
    root = files.root
    url = f"s3://{bucket}/lake"
    defs = build_definitions(
        root / "specs",
        url,
        files.tracking_uri,
        str(root / ".mlops" / "mlartifacts-s3"),
        f"sqlite:///{root / '.mlops' / 'online-s3.db'}",
    )
    return Project(root, files.spec, Lake(url), defs, dg.DagsterInstance.ephemeral())


def test_s3_lake_gives_the_local_lakes_bytes_and_replaces_one_partition(
    tmp_path, bucket, monkeypatch
):
    local = make_project(tmp_path)
    small_data(local, days=len(DAYS), machines=4, bad_rows=0.02)
    remote = _s3_project(local, bucket)
    _no_rename(monkeypatch, remote.lake)
    name = local.spec.name
    for day in DAYS:
        local.run_day(day)
        remote.run_day(day)
    ts_local = materialization_meta(local.run_training_set(), dg.AssetKey([name, "training_set"]))
    ts_remote = materialization_meta(remote.run_training_set(), dg.AssetKey([name, "training_set"]))
    # Same data versions, partition by partition, and the same training set.
    for asset in DAILY:
        assert remote.lake.partitions(name, asset) == local.lake.partitions(name, asset) == DAYS
        for day in DAYS:
            assert remote.lake.content_hash(name, asset, day) == local.lake.content_hash(
                name, asset, day
            ), (asset, day)
    assert ts_remote["window"] == ts_local["window"] and len(ts_local["window"]) >= 3
    assert ts_remote["training_set_hash"] == ts_local["training_set_hash"]
    assert ts_remote["input_data_versions"] == ts_local["input_data_versions"]
    assert remote.lake.read(name, "training_set").equals(local.lake.read(name, "training_set"))
    # Reads and DuckDB queries over the bucket.
    rel = remote.lake.relation_sql(name, "validated_data", DAYS)
    n = remote.lake.query(f"SELECT count(*) AS n FROM {rel}")["n"][0]
    assert n == remote.lake.read_many(name, "validated_data", DAYS).height > 0
    # A corrected day re-materializes exactly its own partitions.
    before = {(a, d): remote.lake.content_hash(name, a, d) for a in DAILY for d in DAYS}
    path = local.spec.landing_dir / "readings_2026-01-03.csv"
    rows = pl.read_csv(path, infer_schema=False)
    rows.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.lit("71.5"))
        .otherwise(pl.col("temperature"))
        .alias("temperature")
    ).write_csv(path)
    remote.run_day("2026-01-03")
    after = {(a, d): remote.lake.content_hash(name, a, d) for a in DAILY for d in DAYS}
    changed = {k for k in before if before[k] != after[k]}
    assert {("raw_data", "2026-01-03"), ("validated_data", "2026-01-03")} <= changed
    assert {d for _, d in changed} == {"2026-01-03"}
    # Only partitions in the bucket: no temporary or leftover objects.
    objects = remote.lake.fs.find(f"{bucket}/lake")
    assert objects and all(o.endswith((".parquet", ".json")) for o in objects)
    assert not [o for o in objects if "/." in o]
