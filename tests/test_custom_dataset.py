"""Datasets this project did not generate: their own names, formats and label sources."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import numpy as np
import polars as pl
import pytest

from tests.conftest import make_project, materialization_meta

JSONL_COLUMN_LABEL = """
name: pump_health
source:
  path: landing/pumps
  format: jsonl
  file_pattern: "pumps-{date}.jsonl"
  date_format: "%Y%m%d"
  timestamp_column: event_ts
  entity_column: pump
  start_date: 2025-06-01
schema:
  unknown_columns: ignore
  columns:
    - {name: event_ts, type: timestamp}
    - {name: pump, type: string}
    - {name: site, type: category, categories: [north, south]}
    - {name: flow_lpm, type: float, min: 0}
    - {name: head_m, type: float, nullable: true}
    - {name: clogged, type: int, min: 0, max: 1}
labels: {kind: column, column: clogged, name: clogged_now}
features:
  lookback_days: 0
  passthrough: [flow_lpm, head_m]
  categorical: [site]
  aggregates: [{columns: [flow_lpm], functions: [mean, min, count], windows: [3h]}]
  transforms: [{name: flow_per_head, kind: ratio, column: flow_lpm, other: head_m}]
model:
  task: binary_classification
  training_window_days: 10
  candidates: [{estimator: logistic_regression}]
"""

PARQUET_EVENTS_NO_ENTITY = """
name: line_stops
source:
  path: data/line
  format: parquet
  file_pattern: "line_{date}.parquet"
  timestamp_column: t
  start_date: 2025-03-01
schema:
  columns:
    - {name: t, type: timestamp}
    - {name: speed, type: float, min: 0, max: 10}
    - {name: temp, type: float}
labels:
  kind: event_feed
  name: stop_2h
  horizon: 2h
  maturity: 26h
  events: {path: data/stops, format: csv, file_pattern: "stops_{date}.csv", timestamp_column: at}
features:
  lookback_days: 1
  passthrough: [speed, temp]
  aggregates: [{columns: [speed], functions: [mean, std], windows: [1h, 12h]}]
model:
  task: binary_classification
  training_window_days: 5
  candidates: [{estimator: random_forest}]
"""


def _write_pumps(p, days: int) -> None:
    rng = np.random.default_rng(0)
    folder = p.spec.landing_dir
    folder.mkdir(parents=True)
    for d in range(days):
        day = p.spec.source.start_date + dt.timedelta(days=d)
        lines = []
        for h in range(0, 24, 2):
            for pump in ("P-1", "P-2", "P-3"):
                flow = float(rng.normal(100, 10))
                rec = {
                    "event_ts": f"{day}T{h:02d}:15:00Z"[:-1],
                    "pump": pump,
                    "site": "north" if pump != "P-3" else "south",
                    "flow_lpm": flow,
                    "head_m": float(rng.uniform(5, 20)),
                    "clogged": int(flow < 90),
                    "vendor_note": "extra column, ignored",
                }
                lines.append(json.dumps(rec))
        lines.append(
            json.dumps(
                {
                    "event_ts": f"{day}T23:59:00",
                    "pump": "P-1",
                    "site": "east",
                    "flow_lpm": 5,
                    "head_m": None,
                    "clogged": 0,
                }
            )
        )
        (folder / f"pumps-{day.strftime('%Y%m%d')}.jsonl").write_text("\n".join(lines) + "\n")


def _write_line(p, days: int) -> None:
    rng = np.random.default_rng(1)
    data, stops = p.spec.landing_dir, p.spec.resolve("data/stops")
    data.mkdir(parents=True)
    stops.mkdir(parents=True)
    for d in range(days):
        day = p.spec.source.start_date + dt.timedelta(days=d)
        start = dt.datetime.combine(day, dt.time())
        ts = [start + dt.timedelta(minutes=10 * i) for i in range(144)]
        pl.DataFrame(
            {"t": ts, "speed": rng.uniform(0, 10, 144), "temp": rng.normal(40, 2, 144)}
        ).write_parquet(data / f"line_{day}.parquet")
        at = start + dt.timedelta(hours=int(rng.integers(1, 23)))
        (stops / f"stops_{day}.csv").write_text(f"at\n{at.isoformat()}\n")


@pytest.mark.parametrize(
    ("spec_text", "writer", "days", "ts_col", "label"),
    [
        (JSONL_COLUMN_LABEL, _write_pumps, 5, "event_ts", "clogged_now"),
        (PARQUET_EVENTS_NO_ENTITY, _write_line, 6, "t", "stop_2h"),
    ],
    ids=["jsonl-entity-target-column", "parquet-no-entity-event-feed"],
)
def test_own_columns_flow_to_a_training_set(tmp_path, spec_text, writer, days, ts_col, label):
    p = make_project(tmp_path, spec_text, name="custom.yaml")
    writer(p, days)
    for d in range(days):
        day = (p.spec.source.start_date + dt.timedelta(days=d)).isoformat()
        result = p.run_day(day)
        meta = materialization_meta(result, dg.AssetKey([p.spec.name, "validated_data"]))
        assert meta["rows_in"] == meta["rows_valid"] + meta["rows_quarantined"]
    ts = p.run_training_set()
    meta = materialization_meta(ts, dg.AssetKey([p.spec.name, "training_set"]))
    df = p.lake.read(p.spec.name, "training_set")
    assert meta["rows"] == df.height > 0
    assert ts_col in df.columns and label in df.columns
    assert (df["feature_time"] <= df[ts_col]).all()
    assert set(df["split"].unique()) == {"train", "valid", "test"}
    if p.spec.name == "pump_health":
        # The site 'east' row of each day is quarantined; the extra vendor column is ignored.
        q = p.lake.read(p.spec.name, "quarantine", p.spec.source.start_date.isoformat())
        assert q["check"].to_list() == ["category"]
        assert "vendor_note" not in df.columns
    assert df[label].sum() > 0
