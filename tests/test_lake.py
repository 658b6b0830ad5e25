"""Lake storage: deterministic, atomic, exact partition replacement, any fsspec filesystem."""

from __future__ import annotations

import datetime as dt

import fsspec
import polars as pl
import pytest

from mlops.lake import Lake


def _frame(n: int = 100, offset: float = 0.0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "entity": [f"m{i % 7}" for i in range(n)],
            "ts": [dt.datetime(2026, 1, 1) + dt.timedelta(minutes=i) for i in range(n)],
            "x": [i * 0.5 + offset for i in range(n)],
        }
    )


def test_same_rows_same_bytes_and_exact_replacement(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    a = lake.write("s", "t", _frame(), "2026-01-01")
    b = lake.write("s", "t", _frame(), "2026-01-02")
    assert a.content_hash == b.content_hash
    again = lake.write("s", "t", _frame(), "2026-01-01")
    assert again.content_hash == a.content_hash == lake.content_hash("s", "t", "2026-01-01")
    changed = lake.write("s", "t", _frame(offset=1.0), "2026-01-01")
    assert changed.content_hash != a.content_hash
    assert lake.content_hash("s", "t", "2026-01-02") == b.content_hash  # neighbour untouched
    assert lake.partitions("s", "t") == ["2026-01-01", "2026-01-02"]
    assert lake.read("s", "t", "2026-01-01").equals(_frame(offset=1.0))


def test_failed_write_leaves_old_partition_and_no_partial_file(tmp_path, monkeypatch):
    lake = Lake(str(tmp_path / "lake"))
    lake.write("s", "t", _frame(), "2026-01-01")
    before = lake.content_hash("s", "t", "2026-01-01")

    def crash(*_a, **_k):  # fault injection: the process dies between write and rename
        raise OSError("disk went away")

    monkeypatch.setattr(lake.fs, "mv", crash)
    with pytest.raises(OSError, match="disk went away"):
        lake.write("s", "t", _frame(offset=5.0), "2026-01-01")
    assert lake.content_hash("s", "t", "2026-01-01") == before
    assert sorted(p.name for p in (tmp_path / "lake" / "s" / "t").iterdir()) == [
        "2026-01-01.parquet"
    ]


def test_temporary_files_are_never_listed_or_read(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write("s", "t", _frame(), "2026-01-01")
    (tmp_path / "lake" / "s" / "t" / ".tmp-abc-2026-01-02.parquet").write_bytes(b"half")
    assert lake.partitions("s", "t") == ["2026-01-01"]


def test_missing_partition_says_what_to_materialize(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(FileNotFoundError, match="materialize s/t for partition 2026-01-09"):
        lake.read("s", "t", "2026-01-09")


def test_non_local_filesystem_with_duckdb(tmp_path):
    fsspec.filesystem("memory").store.clear()
    lake = Lake("memory://lake")
    assert not lake.is_local
    lake.write("s", "t", _frame(10), "2026-01-01")
    lake.write("s", "t", _frame(10, offset=100), "2026-01-02")
    assert lake.partitions("s", "t") == ["2026-01-01", "2026-01-02"]
    out = lake.query(
        f"SELECT count(*) AS n, max(x) AS mx FROM "
        f"{lake.relation_sql('s', 't', ['2026-01-01', '2026-01-02'])}"
    )
    assert out.row(0) == (20, 104.5)
