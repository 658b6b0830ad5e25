"""Validation and quarantine on generated and hand-made rows."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest

from mlops import ingest
from mlops.validation import SchemaMismatchError, validate
from tests.conftest import small_data

EXPECTED_CHECK = {
    "null": {"not_null"},
    "out_of_range": {"min", "max"},
    "wrong_type": {"type"},
    "unknown_category": {"category"},
    "duplicate": {"duplicate"},
    "unparseable_timestamp": {"type"},
}


def test_every_injected_bad_row_kind_is_quarantined_with_its_reason(project):
    report = small_data(project, days=3, machines=10, bad_rows=0.05)
    kinds = {b.kind for b in report.bad_rows}
    assert kinds == set(EXPECTED_CHECK), kinds
    spec = project.spec
    quarantined: dict[tuple[str, int], dict] = {}
    for i in range(3):
        day = spec.source.start_date + dt.timedelta(days=i)
        batch = ingest.load_day(spec.source, spec.landing_dir, day)
        result = validate(spec, batch.frame, day)
        assert result.rows_in == result.rows_valid + result.rows_quarantined == batch.frame.height
        for row in result.quarantine.iter_rows(named=True):
            quarantined[(row[ingest.SOURCE_FILE], row[ingest.ROW_NUMBER])] = row
    for bad in report.bad_rows:
        row = quarantined.get((bad.file, bad.row_number))
        assert row is not None, f"{bad} was not quarantined"
        checks = {e["check"] for e in json.loads(row["errors"])}
        assert checks & EXPECTED_CHECK[bad.kind], (bad, checks)
        assert row["reason"] and row["column"]
        record = json.loads(row["record"])
        assert bad.column in record or bad.kind == "duplicate"
    # Nothing else: good rows are never quarantined.
    assert set(quarantined) == {(b.file, b.row_number) for b in report.bad_rows}


def _raw(rows: list[dict], columns: list[str] | None = None) -> pl.DataFrame:
    columns = columns or list(rows[0])
    df = pl.DataFrame(rows, schema={c: pl.String for c in columns})
    return df.with_columns(
        pl.lit("f.csv").alias(ingest.SOURCE_FILE),
        pl.int_range(1, df.height + 1, dtype=pl.Int64).alias(ingest.ROW_NUMBER),
        pl.lit(",".join(columns)).alias(ingest.FILE_COLUMNS),
    )


GOOD = {
    "timestamp": "2026-01-01T00:00:00",
    "machine_id": "M1",
    "machine_type": "A",
    "firmware": "1.0",
    "temperature": "50",
    "vibration": "1",
    "pressure": "100",
    "rpm": "1000",
    "voltage": "220",
}


def test_offending_value_and_location_are_kept(project):
    rows = [
        GOOD,
        {**GOOD, "timestamp": "2026-01-01T01:00:00", "temperature": "abc"},
        {**GOOD, "timestamp": "2026-01-03T01:00:00"},
    ]
    result = validate(project.spec, _raw(rows), dt.date(2026, 1, 1))
    q = result.quarantine.sort(ingest.ROW_NUMBER).to_dicts()
    assert [(r[ingest.ROW_NUMBER], r["column"], r["check"], r["value"]) for r in q] == [
        (2, "temperature", "type", "abc"),
        (3, "timestamp", "partition_day", "2026-01-03T01:00:00"),
    ]
    assert "'abc' is not a valid float" in q[0]["reason"]
    assert result.valid.height == 1
    assert result.valid.schema["temperature"] == pl.Float64


def test_missing_required_column_names_column_and_file(project):
    rows = [{k: v for k, v in GOOD.items() if k != "vibration"}]
    with pytest.raises(
        SchemaMismatchError, match=r"'vibration' is missing from landing file f\.csv"
    ):
        validate(project.spec, _raw(rows), dt.date(2026, 1, 1))


def test_empty_day_reconciles(project):
    result = validate(project.spec, _raw([GOOD]).head(0), dt.date(2026, 1, 1))
    assert (result.rows_in, result.rows_valid, result.rows_quarantined) == (0, 0, 0)


def test_type_parsing_of_every_column_type(tmp_path):
    from tests.conftest import make_project

    spec_text = """
name: typed
source: {path: in, file_pattern: "d_{date}.csv", timestamp_column: ts, start_date: 2026-01-01}
schema:
  columns:
    - {name: ts, type: timestamp}
    - {name: n, type: int, min: 0}
    - {name: ok, type: bool}
    - {name: x, type: float, nullable: true}
labels: {kind: column, column: ok}
features: {lookback_days: 0, passthrough: [n]}
model: {candidates: [{estimator: logistic_regression}]}
"""
    spec = make_project(tmp_path, spec_text, name="typed.yaml").spec
    rows = [
        {"ts": "2026-01-01T00:00:00Z", "n": "1", "ok": "yes", "x": ""},
        {"ts": "2026-01-01 01:00:00", "n": "1.5", "ok": "true", "x": "2"},
        {"ts": "2026-01-01T02:00:00", "n": "2", "ok": "maybe", "x": "2"},
        {"ts": "2026-01-01T03:00:00.250", "n": "-1", "ok": "0", "x": "nan"},
        {"ts": "2026-01-01T04:00:00+02:00", "n": "3", "ok": "F", "x": "1e3"},
    ]
    raw = _raw(rows).with_columns(pl.col("x").replace("", None))
    result = validate(spec, raw, dt.date(2026, 1, 1))
    q = {r[ingest.ROW_NUMBER]: (r["column"], r["check"]) for r in result.quarantine.to_dicts()}
    assert q == {2: ("n", "type"), 3: ("ok", "type"), 4: ("x", "type")}  # 'nan' is no value
    row4 = result.quarantine.filter(pl.col(ingest.ROW_NUMBER) == 4)["errors"][0]
    # Rules run on rows that parse: a row that does not is rejected for its parse failures.
    assert [(e["column"], e["check"]) for e in json.loads(row4)] == [("x", "type")]
    v = result.valid.sort(ingest.ROW_NUMBER)
    assert v["ok"].to_list() == [True, False]
    assert v["ts"].to_list() == [dt.datetime(2026, 1, 1, 0), dt.datetime(2026, 1, 1, 2)]
    assert v["x"].to_list() == [None, 1000.0]
    assert v.schema["n"] == pl.Int64
