"""`mlops backtest` on specs the project never generated, at small scale: the loop closes on
the user's own files (column labels without an entity, an event feed with one), in an
isolated state folder, and a refused retraining is followed by a promoted one while the
breach persists."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pytest

from demo.generate import generate
from orchestration import backtest
from tests.conftest import embedded_spec_text, make_project

START = dt.date(2026, 5, 1)
ROWS, DAYS, BUILD, ONSET = 150, 11, 5, 8  # onset: the 8th day (1-based)

COLUMN_SPEC = """
name: flip
description: label rule flips at the onset, inputs unchanged
source:
  path: incoming
  format: csv
  file_pattern: "obs_{date}.csv"
  timestamp_column: ts
  start_date: 2026-05-01
schema:
  columns:
    - {name: ts, type: timestamp}
    - {name: x1, type: float}
    - {name: x2, type: float}
    - {name: y, type: int}
labels: {kind: column, column: y, name: target, maturity: 0h}
features:
  lookback_days: 0
  passthrough: [x1, x2]
model:
  candidates:
    - estimator: logistic_regression
  trials: 1
  training_window_days: 5
gates:
  thresholds: {roc_auc: 0.6}
  min_improvement: 0.01
  latency_budget_ms: 500
monitoring:
  # One day after the onset is too few rows to train on alone: the first retraining
  # weighs them up in the spec window, the retry trains from the change point.
  recovery_min_rows: 250
"""


def _write_stream(folder: Path) -> None:
    """Two inputs with one distribution throughout; the label rule flips at ONSET."""
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True)
    for d in range(DAYS):
        day = START + dt.timedelta(days=d)
        x1, x2 = rng.normal(size=ROWS), rng.normal(size=ROWS)
        logit = 2.5 * x1 - x2 if d + 1 < ONSET else -2.5 * x1 + x2
        y = (rng.random(ROWS) < 1 / (1 + np.exp(-logit))).astype(int)
        with (folder / f"obs_{day}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ts", "x1", "x2", "y"])
            for i in range(ROWS):
                ts = dt.datetime.combine(day, dt.time()) + dt.timedelta(seconds=i * 86400 // ROWS)
                w.writerow([ts.isoformat(), f"{x1[i]:.4f}", f"{x2[i]:.4f}", int(y[i])])


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """The backtest sets its state's settings in the environment: undo them afterwards."""
    for key in backtest.isolated_env(tmp_path):
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.delenv("MLOPS_EXECUTOR", raising=False)


def test_backtest_closes_the_loop_on_column_labels_without_an_entity(tmp_path, isolated_env):
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "flip.yaml"
    spec_file.write_text(COLUMN_SPEC)
    _write_stream(tmp_path / "incoming")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "incoming").iterdir())
    out = tmp_path / "out.json"
    argv = ["--spec", str(spec_file), "--build-days", str(BUILD), "--json", str(out)]
    assert backtest.main([*argv, "--plot", str(tmp_path / "t.png")]) == 0

    doc = json.loads(out.read_text())
    assert doc["spec"] == "flip"
    replayed = [(START + dt.timedelta(days=i)).isoformat() for i in range(BUILD, DAYS)]
    assert [d["day"] for d in doc["days"]] == replayed
    for d in doc["days"]:  # every day scored, monitored and, labels being in the rows, evaluated
        assert d["champion_version"] >= 1 and d["drift_share"] is not None
        assert {"accuracy", "roc_auc"} <= set(d["realized"]), d
    onset = (START + dt.timedelta(days=ONSET - 1)).isoformat()
    before_onset = [d for d in doc["days"] if d["day"] < onset]
    assert all(d["realized"]["roc_auc"] > 0.75 for d in before_onset)
    assert [r for r in doc["retrainings"] if r["day"] < onset] == [], "retrained before onset"

    # The change is caught by the realized metric (the inputs do not move), a refusal does
    # not end the episode, and the promoted retry learned the new rule from the change point.
    retrains = doc["retrainings"]
    assert retrains and retrains[0]["trigger"] == "metric_decline" and retrains[0]["day"] == onset
    assert [r["outcome"] for r in retrains[:2]] == ["refused", "promoted"], retrains
    assert retrains[0]["window"]["mode"] == "weighted"
    assert retrains[1]["attempt"] == 2 and retrains[1]["change_point"] == onset
    assert retrains[1]["window"]["mode"] == "from_change_point"
    last = doc["days"][-1]
    assert last["champion_version"] == retrains[1]["version"]
    assert last["realized"]["roc_auc"] > 0.75, "the promoted champion learned the new rule"
    assert (tmp_path / "t.png").stat().st_size > 10_000

    # Isolation: the user's files are untouched, everything else is in the state folder.
    after = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "incoming").iterdir())
    assert after == before
    state = tmp_path / ".mlops" / "backtest" / "flip"
    assert {p.name for p in (tmp_path / ".mlops").iterdir()} == {"backtest"}
    assert {"lake", "dagster", "mlflow.db", "landing", "specs"} <= {p.name for p in state.iterdir()}


def test_backtest_of_an_event_feed_spec_with_entities(tmp_path, isolated_env):
    text = embedded_spec_text(
        ("latency_budget_ms: 50", "latency_budget_ms: 500"),
        ("trials: 10", "trials: 1"),
        ("training_window_days: 14", "training_window_days: 4"),
        ("thresholds: {roc_auc: 0.75, pr_auc: 0.2}", "thresholds: {roc_auc: 0.7}"),  # 4 days
    )
    p = make_project(tmp_path, text)
    generate(p.spec, days=8, machines=16, seed=3)  # into the spec's landing folders
    # Labels mature 72 h after a reading, once the failure feed has arrived: of 7 build days,
    # 4 are labelled when the first champion trains.
    argv = ["--spec", str(p.spec.path), "--build-days", "7", "--json", str(tmp_path / "o.json")]
    assert backtest.main(argv) == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    days = doc["days"]
    assert [d["day"] for d in days] == [
        (p.spec.source.start_date + dt.timedelta(days=i)).isoformat() for i in range(7, 8)
    ]
    assert all(d["champion_version"] == 1 and d["drift_share"] is not None for d in days)
    # The replayed days' failure feeds end with the history: none of them is labelled yet,
    # and nothing says otherwise.
    assert all(d["realized"] is None for d in days)
    assert not (tmp_path / ".mlops" / "lake").exists(), "the live lake was written"


def test_backtest_refuses_what_it_cannot_replay(tmp_path, isolated_env, capsys):
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "flip.yaml"
    spec_file.write_text(COLUMN_SPEC)
    assert backtest.main(["--spec", str(spec_file)]) == 1
    assert "no data for flip" in capsys.readouterr().err
    _write_stream(tmp_path / "incoming")
    assert backtest.main(["--spec", str(spec_file), "--build-days", "20"]) == 1
    assert "leaves none to replay" in capsys.readouterr().err
    assert backtest.main(["--spec", str(tmp_path / "nope.yaml")]) == 2


def test_backtest_of_a_sql_source_sees_each_day_only_once_it_has_happened(
    tmp_path, isolated_env, capsys
):
    """The same stream as rows of a PostgreSQL table: the new-data sensor polls the source
    up to the simulated day, so the build phase builds only the build days."""
    import uuid

    import polars as pl
    import sqlalchemy as sa
    import yaml

    from tests.conftest import POSTGRES_URL, require_postgres

    require_postgres()
    _write_stream(tmp_path / "incoming")
    table = f"backtest_{uuid.uuid4().hex[:8]}"
    days = 6
    rows = pl.concat(
        [
            pl.read_csv(tmp_path / "incoming" / f"obs_{START + dt.timedelta(days=i)}.csv")
            for i in range(days)
        ]
    ).with_columns(pl.col("ts").str.to_datetime())
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.begin() as con:
            con.execute(sa.text(f"CREATE TABLE {table} (ts timestamp, x1 float, x2 float, y int)"))
            con.execute(sa.text(f"INSERT INTO {table} VALUES (:ts, :x1, :x2, :y)"), rows.to_dicts())
        data = yaml.safe_load(COLUMN_SPEC)
        data["source"] = {
            "kind": "sql",
            "url": POSTGRES_URL,
            "query": f"SELECT ts, x1, x2, y FROM {table} WHERE ts >= :start AND ts < :end",
            "timestamp_column": "ts",
            "start_date": START.isoformat(),
        }
        (tmp_path / "specs").mkdir()
        spec_file = tmp_path / "specs" / "flip.yaml"
        spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
        end = (START + dt.timedelta(days=days - 1)).isoformat()
        argv = ["--spec", str(spec_file), "--build-days", "4", "--to", end]
        assert backtest.main([*argv, "--json", str(tmp_path / "o.json")]) == 0
    finally:
        with engine.begin() as con:
            con.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()
    out = capsys.readouterr().out
    assert "days 1-4" in out and ": 4 data runs" in out, out
    doc = json.loads((tmp_path / "o.json").read_text())
    assert [d["day"] for d in doc["days"]] == [
        (START + dt.timedelta(days=i)).isoformat() for i in range(4, days)
    ]
    assert all(d["realized"] and "accuracy" in d["realized"] for d in doc["days"])


def test_a_backtests_partitions_are_the_days_of_its_history(tmp_path, isolated_env, monkeypatch):
    """The staged copy begins where the data begins and ends where it ends (--from/--to
    narrow both), so the backtest's UI lists no empty day before, between or after."""
    from catalog.partitions import daily_partitions
    from mlops.spec import load_spec

    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "flip.yaml"
    spec_file.write_text(COLUMN_SPEC)  # start_date 2026-05-01
    _write_stream(tmp_path / "incoming")
    for day in (START, START + dt.timedelta(days=1)):  # the history begins on the 3rd day
        (tmp_path / "incoming" / f"obs_{day}.csv").unlink()
    staged = []
    monkeypatch.setattr(backtest, "run", lambda landed, *_a, **_k: staged.append(landed))

    def partitions(*argv: str) -> list[str]:
        assert backtest.main(["--spec", str(spec_file), "--build-days", "3", *argv]) == 1
        landed = staged.pop()
        assert landed.source.end_date is not None
        assert load_spec(spec_file).source.end_date is None  # the user's spec is untouched
        return daily_partitions(landed).get_partition_keys()

    days = [(START + dt.timedelta(days=i)).isoformat() for i in range(2, DAYS)]
    assert partitions() == days
    assert partitions("--from", "2026-05-04", "--to", "2026-05-09") == [
        f"2026-05-0{d}" for d in range(4, 10)
    ]
