"""The regression path end to end, on a dataset the test makes (numeric target column)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl

from mlops import registry
from mlops.model_loader import load_model
from tests.conftest import make_project, materialization_meta

SPEC = """
name: energy_use
source:
  path: landing/meters
  format: parquet
  file_pattern: "meters_{date}.parquet"
  timestamp_column: ts
  entity_column: meter
  start_date: 2025-02-01
schema:
  columns:
    - {name: ts, type: timestamp}
    - {name: meter, type: string}
    - {name: zone, type: category, categories: [east, west]}
    - {name: outside_temp, type: float, min: -40, max: 50}
    - {name: occupancy, type: float, min: 0, max: 1}
    - {name: kwh, type: float, min: 0}
labels: {kind: column, column: kwh, name: kwh_now}
features:
  lookback_days: 0
  passthrough: [outside_temp, occupancy]
  categorical: [zone]
  aggregates: [{columns: [outside_temp], functions: [mean], windows: [3h]}]
model:
  task: regression
  trials: 3
  seed: 7
  training_window_days: 10
  candidates:
    - {estimator: ridge, search_space: {alpha: {type: float, low: 0.01, high: 10, log: true}}}
    - estimator: xgboost
      params: {n_estimators: 200}
      search_space: {max_depth: {type: int, low: 2, high: 5}}
gates:
  primary_metric: rmse
  thresholds: {rmse: 3.0, r2: 0.5}
  slice_columns: [zone]
  latency_budget_ms: 200
"""


def _write(p, days: int) -> None:
    rng = np.random.default_rng(3)
    folder = p.spec.landing_dir
    folder.mkdir(parents=True)
    for d in range(days):
        day = p.spec.source.start_date + dt.timedelta(days=d)
        n = 24 * 12
        temp = rng.normal(10, 8, n).clip(-30, 45)
        occ = rng.uniform(0, 1, n)
        zone = rng.choice(["east", "west"], n)
        kwh = 5 + 0.02 * (temp - 18) ** 2 + 4 * occ * (zone == "west") + rng.normal(0, 0.5, n)
        pl.DataFrame(
            {
                "ts": [
                    dt.datetime.combine(day, dt.time()) + dt.timedelta(hours=i // 12)
                    for i in range(n)
                ],
                "meter": [f"m{i % 12}" for i in range(n)],
                "zone": zone,
                "outside_temp": temp,
                "occupancy": occ,
                "kwh": kwh.clip(0),
            }
        ).write_parquet(folder / f"meters_{day}.parquet")


def test_regression_trains_gates_promotes_and_scores(tmp_path):
    p = make_project(tmp_path, SPEC, name="energy_use.yaml", with_mlflow=True)
    _write(p, 8)
    for d in range(8):
        p.run_day((p.spec.source.start_date + dt.timedelta(days=d)).isoformat())
    p.run_training_set()
    result = p.run_job("energy_use_training_job")
    ev = materialization_meta(result, dg_key("model_evaluation"))
    assert ev["test_rmse"] < 3.0
    champ = materialization_meta(result, dg_key("champion_model"))
    assert champ["promoted"] and champ["champion_version"] == 1
    model = load_model(p.tracking_uri, "energy_use", alias=registry.CHAMPION)
    assert model.task == "regression" and model.threshold is None
    batch = p.run_job("energy_use_batch_predictions_job", partition="2025-02-08")
    preds = p.lake.read("energy_use", "batch_predictions", "2025-02-08")
    assert materialization_meta(batch, dg_key("batch_predictions"))["rows"] == preds.height == 288
    truth = p.lake.read("energy_use", "validated_data", "2025-02-08").sort(["ts", "meter"])
    err = np.sqrt(
        np.mean((preds.sort(["ts", "meter"])["score"].to_numpy() - truth["kwh"].to_numpy()) ** 2)
    )
    assert err < 3.0
    assert (preds["decision"] == preds["score"]).all()  # regression: the value is the output


def dg_key(asset: str):
    import dagster as dg

    return dg.AssetKey(["energy_use", asset])
