"""Features, labels and the point-in-time training set on small hand-made frames."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest

from mlops import features as feats
from mlops import labels, training_set
from mlops.dates import day_bounds
from mlops.lake import Lake
from tests.conftest import make_project

T0 = dt.datetime(2026, 1, 1)


def _rows(n: int = 48, entity: str = "M1", start: dt.datetime = T0, step_h: float = 1.0):
    return pl.DataFrame(
        {
            "timestamp": [start + dt.timedelta(hours=i * step_h) for i in range(n)],
            "machine_id": [entity] * n,
            "machine_type": ["A"] * n,
            "firmware": ["1.0"] * n,
            "temperature": [50.0 + (i % 5) for i in range(n)],
            "vibration": [1.0 + 0.1 * i for i in range(n)],
            "pressure": [100.0] * n,
            "rpm": [1000.0 + i for i in range(n)],
            "voltage": [220.0] * n,
        }
    ).with_columns(pl.col("timestamp").cast(pl.Datetime("us")))


@pytest.fixture
def spec(tmp_path):
    return make_project(tmp_path).spec


def test_rolling_features_match_a_brute_force_window(spec):
    rows = pl.concat([_rows(), _rows(entity="M2", start=T0 + dt.timedelta(minutes=30))])
    out = feats.compute_features(spec, rows)
    r = out.filter(
        (pl.col("machine_id") == "M1") & (pl.col("timestamp") == T0 + dt.timedelta(hours=30))
    )
    window = [50.0 + (i % 5) for i in range(25, 31)]  # (t-6h, t]
    assert r["temperature_mean_6h"][0] == pytest.approx(sum(window) / 6, abs=1e-12)
    assert r["temperature_max_6h"][0] == max(window)
    mean = sum(window) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in window) / 5)
    assert r["temperature_std_6h"][0] == pytest.approx(std, abs=1e-12)
    assert r["temperature_delta"][0] == pytest.approx((50 + 30 % 5) - (50 + 29 % 5))
    assert r["power_proxy"][0] == pytest.approx((1000 + 30) * 220.0)
    assert out.columns[2:] == feats.feature_names(spec)


def test_later_rows_never_change_earlier_features(spec):
    rows = _rows(30)
    before = feats.compute_features(spec, rows)
    later = _rows(10, start=T0 + dt.timedelta(hours=29, minutes=30)).with_columns(
        pl.lit(149.0).alias("temperature"), pl.lit(49.0).alias("vibration")
    )
    after = feats.compute_features(spec, pl.concat([rows, later]))
    assert after.filter(pl.col("timestamp") <= rows["timestamp"].max()).equals(before)


def test_entities_do_not_leak_into_each_other(spec):
    a = _rows(10)
    b = _rows(10, entity="M2").with_columns(pl.lit(140.0).alias("temperature"))
    alone = feats.compute_features(spec, a)
    mixed = feats.compute_features(spec, pl.concat([a, b])).filter(pl.col("machine_id") == "M1")
    assert mixed.equals(alone)


def test_event_labels_use_the_horizon_and_maturity(spec):
    points = _rows(6, step_h=6)  # 00:00, 06:00, ... 30:00
    events = pl.DataFrame(
        {"machine_id": ["M1"], "event_time": [T0 + dt.timedelta(hours=24)]},
        schema={"machine_id": pl.String, "event_time": pl.Datetime("us")},
    )
    as_of = T0 + dt.timedelta(days=4)
    out = labels.event_labels(spec, points, events, as_of)
    # (t, t + 24h] contains 24:00 for t = 0, 6, 12, 18 but not for t = 24 (exclusive) or 30.
    assert out["failure_24h"].to_list() == [1, 1, 1, 1, 0, 0]
    # mature when t + 72h <= as_of (day 4 00:00): t <= day 1 00:00.
    assert out["label_mature"].to_list() == [True, True, True, True, True, False]
    other = events.with_columns(pl.lit("M9").alias("machine_id"))
    assert labels.event_labels(spec, points, other, as_of)["failure_24h"].sum() == 0


def test_label_maturity_waits_for_the_late_feed(spec, tmp_path):
    folder = spec.resolve(spec.labels.events.path)
    folder.mkdir(parents=True)
    header = "machine_id,failure_time,reported_at,failure_mode\n"
    (folder / "failures_2026-01-01.csv").write_text(header)
    # Arrives two days late, in the file of the day it was reported.
    (folder / "failures_2026-01-03.csv").write_text(
        header + "M1,2026-01-01T20:00:00,2026-01-03T10:00:00,bearing\n"
    )
    valid = _rows(24)
    # Only day 1's file has arrived: nothing can be final, and the event is not known yet.
    partial = labels.load_events(spec, dt.date(2026, 1, 1))
    assert partial.as_of == dt.datetime(2026, 1, 2)
    (folder / "failures_2026-01-02.csv").write_text(header)
    (folder / "failures_2026-01-04.csv").write_text(header)
    out, info = labels.build_labels(spec, valid, dt.date(2026, 1, 1))
    assert info["event_files"] == [f"failures_2026-01-0{i}.csv" for i in range(1, 5)]
    assert out.filter(pl.col("timestamp") < T0 + dt.timedelta(hours=20))["failure_24h"].min() == 1
    assert out["label_mature"].all()


def _training_inputs(spec, lake: Lake):
    for day in range(1, 6):
        d = dt.date(2026, 1, day)
        start = dt.datetime.combine(d, dt.time())
        rows = pl.concat([_rows(24, "M1", start), _rows(24, "M2", start)])
        f = feats.compute_features(spec, rows)
        lake.write(spec.name, "features", f, d.isoformat())
        lab = rows.select("machine_id", "timestamp").with_columns(
            (pl.col("timestamp").dt.hour() % 5 == 0).cast(pl.Int8).alias("failure_24h"),
            pl.lit(True).alias("label_mature"),
            pl.lit(None, dtype=pl.Datetime("us")).alias("label_as_of"),
        )
        lake.write(spec.name, "labels", lab, d.isoformat())


def _build(spec, lake):
    days = lake.partitions(spec.name, "labels")
    window = training_set.choose_window(
        spec,
        days,
        lake.partitions(spec.name, "features"),
        training_set.label_maturity(spec, lake, days),
    )
    return training_set.build_training_set(spec, lake, window)


def test_data_after_a_label_cutoff_cannot_change_its_training_row(spec, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    _training_inputs(spec, lake)
    before = _build(spec, lake)
    row = before.filter(
        (pl.col("machine_id") == "M1") & (pl.col("timestamp") == dt.datetime(2026, 1, 3, 10))
    )
    assert row.height == 1
    # Record feature values just after that cut-off (and a wild late row) in the lake.
    f = lake.read(spec.name, "features", "2026-01-03")
    late = f.filter(
        (pl.col("machine_id") == "M1") & (pl.col("timestamp") == dt.datetime(2026, 1, 3, 10))
    ).with_columns(
        pl.col("timestamp") + dt.timedelta(seconds=1), pl.lit(9999.0).alias("temperature")
    )
    lake.write(spec.name, "features", pl.concat([f, late]).sort("timestamp"), "2026-01-03")
    after = _build(spec, lake)
    key = ["machine_id", "timestamp"]
    assert after.filter(pl.col("timestamp") <= dt.datetime(2026, 1, 3, 10)).equals(
        before.filter(pl.col("timestamp") <= dt.datetime(2026, 1, 3, 10))
    )
    assert (
        after.join(row.select(key), on=key)["temperature"].to_list() == row["temperature"].to_list()
    )
    # Sensitivity: a change AT the cut-off is visible, so the join really reads these files.
    at = f.with_columns(
        pl.when(
            (pl.col("machine_id") == "M1") & (pl.col("timestamp") == dt.datetime(2026, 1, 3, 10))
        )
        .then(7777.0)
        .otherwise(pl.col("temperature"))
        .alias("temperature")
    )
    lake.write(spec.name, "features", at, "2026-01-03")
    assert _build(spec, lake).join(row.select(key), on=key)["temperature"].to_list() == [7777.0]


def test_split_is_time_ordered_with_every_split_present(spec):
    days = [f"2026-01-{d:02d}" for d in range(1, 11)]
    s = training_set.split_days(spec, days)
    order = [s[d] for d in days]
    assert order == sorted(order, key=training_set.SPLITS.index)
    assert set(order) == set(training_set.SPLITS)
    assert training_set.split_days(spec, days[:3]) == dict(
        zip(days[:3], training_set.SPLITS, strict=True)
    )


def test_too_few_mature_days_is_a_clear_error(spec):
    with pytest.raises(training_set.TrainingSetError, match="at least 3"):
        training_set.choose_window(
            spec,
            ["2026-01-01", "2026-01-02"],
            ["2026-01-01", "2026-01-02"],
            {"2026-01-01": True, "2026-01-02": True},
        )


def test_feature_kernel_matches_an_independent_polars_implementation(tmp_path):
    from mlops import ingest, validation
    from tests.conftest import small_data
    from tests.feature_oracle import compute_features as oracle

    p = make_project(tmp_path)
    small_data(p, days=3, machines=12, bad_rows=0.02)
    spec = p.spec
    valid = []
    for d in range(3):
        day = spec.source.start_date + dt.timedelta(days=d)
        batch = ingest.load_day(spec.source, spec.landing_dir, day)
        valid.append(validation.validate(spec, batch.frame, day).valid)
    rows = pl.concat(valid)
    start, end = day_bounds(dt.date(2026, 1, 3))
    ours, ref = feats.compute_features(spec, rows, start, end), oracle(spec, rows, start, end)
    assert ours.height == ref.height > 0
    assert ours.select("machine_id", "timestamp").equals(ref.select("machine_id", "timestamp"))
    for c in feats.feature_names(spec):
        if c in spec.features.categorical:
            assert ours[c].equals(ref[c])
            continue
        a, b = ours[c].to_numpy(), ref[c].cast(pl.Float64).to_numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)), c
        assert np.nanmax(np.abs(a - b)) <= 1e-9, c
