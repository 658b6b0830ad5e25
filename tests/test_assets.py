"""The data half of the graph through Dagster: real runs, real Parquet, real checks."""

from __future__ import annotations

import dagster as dg
import polars as pl

from assets.data import QUARANTINE_RATE_CHECK, ROWS_RECONCILE_CHECK
from mlops import validation
from tests.conftest import materialization_meta, small_data

DAILY = ("raw_data", "validated_data", "quarantine", "labels", "features")


def _key(p, asset):
    return dg.AssetKey([p.spec.name, asset])


def _check(result, name):
    evals = [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    return next(e for e in evals if e.asset_check_key.name == name)


def test_days_flow_to_a_training_set(project):
    small_data(project, days=7, machines=6, bad_rows=0.02)
    for i in range(1, 8):
        result = project.run_day(f"2026-01-0{i}")
        assert _check(result, ROWS_RECONCILE_CHECK).passed
        assert _check(result, QUARANTINE_RATE_CHECK).passed
        meta = materialization_meta(result, _key(project, "validated_data"))
        assert meta["rows_in"] == meta["rows_valid"] + meta["rows_quarantined"]
        raw_meta = materialization_meta(result, _key(project, "raw_data"))
        assert raw_meta["source_files"] == {f"readings_2026-01-0{i}.csv": meta["rows_in"]}
        # Each lake table's page lists its columns and types, as the written file has them.
        for asset in DAILY:
            schema = materialization_meta(result, _key(project, asset))["dagster/column_schema"]
            written = project.lake.read(project.spec.name, asset, f"2026-01-0{i}").schema
            assert [(c.name, c.type) for c in schema.columns] == [
                (n, str(t)) for n, t in written.items()
            ], asset
    ts = project.run_training_set()
    meta = materialization_meta(ts, _key(project, "training_set"))
    # Labels need 72 h of the late event feed: the last 3 days are not mature yet.
    assert meta["window"] == [f"2026-01-0{i}" for i in range(1, 5)]
    assert meta["skipped_immature_days"] == ["2026-01-05", "2026-01-06", "2026-01-07"]
    df = project.lake.read(project.spec.name, "training_set")
    assert df.height == meta["rows"] > 0
    columns = meta["dagster/column_schema"].columns
    assert [c.name for c in columns] == df.columns and len(columns) > 10
    assert set(df["split"].unique()) == {"train", "valid", "test"}
    # Time-ordered split: every train row precedes every valid row precedes every test row.
    bounds = df.group_by("split").agg(
        pl.col("timestamp").min().alias("lo"), pl.col("timestamp").max().alias("hi")
    )
    b = {r["split"]: r for r in bounds.to_dicts()}
    assert b["train"]["hi"] < b["valid"]["lo"] and b["valid"]["hi"] < b["test"]["lo"]
    assert (df["feature_time"] <= df["timestamp"]).all()
    versions = meta["input_data_versions"]
    assert set(versions["labels"]) == set(meta["window"])
    assert versions["features"]["2026-01-02"] == project.lake.content_hash(
        project.spec.name, "features", "2026-01-02"
    )
    assert project.lake.read(
        project.spec.name, "training_set", meta["training_set_hash"][:16]
    ).equals(df)
    pinned = project.run_training_set(end_date="2026-01-03")
    assert materialization_meta(pinned, _key(project, "training_set"))["window"] == [
        "2026-01-01",
        "2026-01-02",
        "2026-01-03",
    ]
    too_early = project.run_training_set(end_date="2026-01-02", raise_on_error=False)
    assert not too_early.success
    assert "needs at least 3" in _failure_message(too_early)


def test_rematerializing_a_partition_keeps_every_file_hash(project):
    small_data(project, days=3, machines=5, bad_rows=0.03)
    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        project.run_day(day)
    name = project.spec.name
    before = {a: project.lake.content_hash(name, a, "2026-01-02") for a in DAILY}
    others = project.lake.content_hash(name, "features", "2026-01-03")
    result = project.run_day("2026-01-02")
    after = {a: project.lake.content_hash(name, a, "2026-01-02") for a in DAILY}
    assert before == after
    assert project.lake.content_hash(name, "features", "2026-01-03") == others
    versions = {
        e.step_materialization_data.materialization.asset_key.path[
            -1
        ]: e.step_materialization_data.materialization.tags.get("dagster/data_version")
        for e in result.get_asset_materialization_events()
    }
    assert versions["features"] == after["features"]


def test_rows_lost_by_validation_fail_the_blocking_reconcile_check(project, monkeypatch):
    small_data(project, days=1, machines=4, bad_rows=0.05)
    real = validation.validate

    def lossy(*args, **kwargs):  # fault injection: a bug that drops one valid row
        result = real(*args, **kwargs)
        result.valid = result.valid.slice(1)
        return result

    monkeypatch.setattr(validation, "validate", lossy)
    result = project.run_day("2026-01-01", raise_on_error=False)
    check = _check(result, ROWS_RECONCILE_CHECK)
    assert not check.passed
    assert check.metadata["lost"].value == 1
    # Blocking: nothing downstream of validated_data was built from the bad partition.
    assert not project.lake.exists(project.spec.name, "features", "2026-01-01")
    assert not project.lake.exists(project.spec.name, "labels", "2026-01-01")


def test_quarantine_rate_above_spec_threshold_blocks_downstream(project):
    small_data(project, days=1, machines=4, bad_rows=0.2)
    result = project.run_day("2026-01-01", raise_on_error=False)
    check = _check(result, QUARANTINE_RATE_CHECK)
    assert not check.passed
    assert check.metadata["quarantine_rate"].value > project.spec.schema_.max_quarantine_rate
    assert _check(result, ROWS_RECONCILE_CHECK).passed
    assert not project.lake.exists(project.spec.name, "features", "2026-01-01")


def _failure_message(result) -> str:
    return "\n".join(
        str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure
    )


def test_missing_required_column_fails_the_run_naming_column_and_file(project):
    small_data(project, days=1, machines=3)
    path = project.spec.landing_dir / "readings_2026-01-01.csv"
    pl.read_csv(path).drop("pressure").write_csv(path)
    result = project.run_day("2026-01-01", raise_on_error=False)
    assert not result.success
    msg = _failure_message(result)
    assert "'pressure' is missing from landing file readings_2026-01-01.csv" in msg
    assert not project.lake.exists(project.spec.name, "validated_data", "2026-01-01")


def test_day_without_landing_file_fails_with_what_to_do(project):
    small_data(project, days=1, machines=3)
    result = project.run_day("2026-01-05", raise_on_error=False)
    assert not result.success
    assert "no landing file for 2026-01-05" in _failure_message(result)
