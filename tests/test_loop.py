"""The closed loop end to end, at small scale: the demo's story must hold.

Generate stable days then covariate + concept drift, build the first days through the
new-data sensor, promote a champion, replay the rest through the real sensors and
schedules. No retraining before the drift; a retraining soon after it; the champion at the
end beats the first one on the drifted days it never trained on.
"""

import datetime as dt
import json

import dagster as dg
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from cli.main import main as cli
from demo import run as demo
from mlops import monitoring
from mlops.config import mlflow_tracking_uri
from mlops.labels import MATURE, entity_column
from mlops.lake import read_json
from mlops.model_loader import load_model
from tests.conftest import embedded_spec_text, make_project
from tests.test_definitions import _env

BUILD, DRIFT_FROM, DAYS = 12, 15, 30


def _spec_text() -> str:
    return embedded_spec_text(
        ("latency_budget_ms: 50", "latency_budget_ms: 500"),  # a loaded CI machine
        ("trials: 10", "trials: 3"),
        ("training_window_days: 14", "training_window_days: 8"),
        ("retrain_cooldown_partitions: 7", "retrain_cooldown_partitions: 3"),
    )


def test_closed_loop_story(tmp_path, monkeypatch, capsys):
    p = make_project(tmp_path, _spec_text())
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    argv = ["--spec", str(p.spec.path), "--days", str(DAYS), "--build-days", str(BUILD)]
    argv += ["--drift-from", str(DRIFT_FROM), "--machines", "24", "--trials", "3"]
    argv += ["--start", p.spec.source.start_date.isoformat()]  # the days asserted below
    assert demo.main([*argv, "--redeliver", str(BUILD + 3)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "re-delivered" in out and "no run (same content)" in out
    spec = p.spec
    report = tmp_path / ".mlops" / "reports" / spec.name
    timeline = json.loads((report / "timeline.json").read_text())
    assert [r["n"] for r in timeline] == list(range(BUILD + 1, DAYS + 1))

    drift_day = spec.source.start_date + dt.timedelta(days=DRIFT_FROM - 1)
    instance = dg.DagsterInstance.get()
    runs = [
        r
        for r in instance.get_runs(dg.RunsFilter(job_name=f"{spec.name}_training_job"))
        if r.tags.get(monitoring.TAG_TRIGGER) != "initial"
    ]
    parts = sorted(dt.date.fromisoformat(r.tags[monitoring.TAG_PARTITION]) for r in runs)
    # No retraining before the drift, one within the consecutive-days rule after it.
    assert parts, "no retraining at all"
    assert parts[0] >= drift_day, f"retrained before the drift: {parts}"
    assert (parts[0] - drift_day).days <= spec.monitoring.consecutive_drift_days
    # The stream's covariate drift shows in the drift share the day it lands; its concept
    # drift only once labels mature. So the first retraining is the drift sensor's, against
    # the first champion, on drift reports the lake holds.
    chrono = runs[::-1]  # get_runs lists the newest first
    first = chrono[0]
    assert first.tags[monitoring.TAG_TRIGGER] == monitoring.DRIFT, [r.tags for r in chrono]
    ev = json.loads(first.tags[monitoring.TAG_EVIDENCE])
    assert ev["champion_version"] == 1 and ev["threshold"] == spec.monitoring.drift_threshold
    run = ev["partitions"]
    assert ev["change_point"] == run[0] >= drift_day.isoformat()
    assert len(run) >= spec.monitoring.consecutive_drift_days
    shares = [read_json(p.lake, spec.name, monitoring.DRIFT_REPORT, d)["drift_share"] for d in run]
    assert ev["values"] == pytest.approx(shares) and min(shares) > ev["threshold"]
    assert first.tags[monitoring.TAG_REASON].startswith(
        f"drift share breached {ev['threshold']:.3f} for {len(run)} consecutive partition(s) "
        f"{run[0]}..{run[-1]} (champion v1)"
    )
    # Every later retraining names a change trigger and what it saw (no schedule is set).
    what = {monitoring.DRIFT: "drift share", monitoring.METRIC_DECLINE: "realized metric"}
    for r in runs:
        trigger = r.tags[monitoring.TAG_TRIGGER]
        assert trigger in what, r.tags
        assert r.tags[monitoring.TAG_REASON].startswith(f"{what[trigger]} breached "), r.tags
        evidence = json.loads(r.tags[monitoring.TAG_EVIDENCE])
        assert evidence["change_point"] >= drift_day.isoformat(), r.tags
        assert r.tags[monitoring.TAG_EPISODE].startswith(f"{trigger}:v"), r.tags
    # Cooldown: an episode's first retraining comes at least `cooldown` partitions after
    # any earlier one; its retries (a refusal re-arms) need only new breached days.
    cooldown = spec.monitoring.retrain_cooldown_partitions
    for r in runs:
        if r.tags.get(monitoring.TAG_ATTEMPT, "1") != "1":
            continue
        day = dt.date.fromisoformat(r.tags[monitoring.TAG_PARTITION])
        assert all((day - p).days >= cooldown for p in parts if p < day), (day, parts)

    # The last champion against the first on the last drifted days with mature labels.
    final = timeline[-1]["champion"]
    assert final and final != 1, f"the first champion was never replaced: {timeline}"
    last_labelled = dt.date.fromisoformat(timeline[-1]["realized_day"])
    days = [(last_labelled - dt.timedelta(days=i)).isoformat() for i in range(3)]
    keys = [entity_column(spec), spec.source.timestamp_column]
    feats = p.lake.read_many(spec.name, "features", days)
    labels = p.lake.read_many(spec.name, "labels", days).filter(pl.col(MATURE))
    rows = feats.join(labels.select(*keys, spec.labels.name), on=keys)
    y = rows[spec.labels.name].cast(pl.Int64).to_numpy()
    old, new = (
        roc_auc_score(y, load_model(mlflow_tracking_uri(), spec.name, version=v).score(rows))
        for v in (1, final)
    )
    assert np.isfinite(old) and new > old, f"v{final} {new:.3f} vs v1 {old:.3f} on {days}"

    # The timeline PNG, and `mlops status` on the same instance.
    assert (report / "timeline.png").stat().st_size > 10_000
    res = CliRunner().invoke(cli, ["status", "--spec", spec.name, "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["champion"] == final and st["last_drift"]["partition"] == timeline[-1]["day"]
    last = runs[0]  # the newest retraining
    assert st["last_retraining"]["run_id"] == last.run_id
    assert st["last_retraining"]["trigger"] == last.tags[monitoring.TAG_TRIGGER]
    assert st["last_retraining"]["reason"] == last.tags[monitoring.TAG_REASON]
    assert st["last_retraining"]["partition"] == last.tags[monitoring.TAG_PARTITION]


def test_a_second_demo_rebuilds_what_the_first_built(tmp_path, monkeypatch):
    """The demo regenerates the same files, so their run keys repeat: a second `make demo`
    on the same instance must forget the first one's runs, or the sensor's requests would
    all count as already run and nothing would be built."""
    from demo.generate import generate
    from mlops.config import lake_url, mlflow_tracking_uri
    from mlops.lake import Lake
    from orchestration.replay import Feed, Replay

    p = make_project(tmp_path)
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    spec, staging = p.spec, tmp_path / ".mlops" / "staging" / p.spec.name
    day = spec.source.start_date
    instance = dg.DagsterInstance.get()

    def build() -> list[str]:
        lake = demo.fresh_start(spec, staging, p.defs, instance)
        staged = demo.staged_spec(spec, staging)
        generate(staged, days=1, machines=3, seed=1)
        feeds = [Feed(spec.source, staged.landing_dir, spec.landing_dir)]
        replay = Replay(spec, p.defs, instance, lake, mlflow_tracking_uri(), feeds)
        replay.land(day)
        return [r.run_id for r in replay.ingest_round() if r.success]

    first = build()
    assert len(first) == 1
    second = build()
    assert len(second) == 1 and second != first, "the second demo built nothing"
    runs = instance.get_runs(dg.RunsFilter(job_name=f"{spec.name}_data_job"))
    assert [r.run_id for r in runs] == second  # the first demo's run is forgotten
    assert Lake(lake_url()).exists(spec.name, "features", day.isoformat())
