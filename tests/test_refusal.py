"""A refused challenger is an outcome, not a failure (DESIGN §6; issue 12 §4 and §6).

One scenario, built once for the module, through Dagster against a real MLflow registry
(SQLite), lake and instance, with the run-failure sensor ticking around it:
- v1 becomes the first champion (gates that any model passes);
- v2 is trained under a spec whose threshold no model meets (roc_auc >= 0.999): its run
  succeeds, champion_model records the refusal where a user looks (metadata, the version's
  tags, the deployment history, `mlops history`, `mlops lineage`, `mlops status`), the
  challenger alias leaves it, and the sensor raises no alert;
- v3's serving smoke gate raises: that is a failure, with an alert, and champion_model
  materialized alone afterwards refuses v3, naming the gate that recorded no result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from cli.main import main
from mlops import monitoring, promotion, registry
from mlops.lake import Lake
from mlops.registry_reader import open_registry
from mlops.spec import load_spec
from orchestration import status as st
from orchestration.definitions import build_definitions
from orchestration.run_records import InstanceRuns
from resources.alerting import AlertingResource
from sensors.alerts import run_failure_sensor_name
from tests.conftest import QUIET, REPO, make_project, materialization_meta, mlflow_db, small_data

NAME = "machine_failure"
DAYS = 12
TRAINING_JOB = f"{NAME}_training_job"
ALERTS: list[dict] = []


class RecordingAlerts(AlertingResource):
    """The alerting resource, recording what it would send."""

    def alert(self, title: str, text: str, fields: dict | None = None) -> bool:
        ALERTS.append({"title": title, "text": text, "fields": fields or {}})
        return False


@dataclass
class World:
    root: Path
    lake: Lake
    uri: str
    instance: dg.DagsterInstance
    runs: dict[str, dg.ExecuteInProcessResult] = field(default_factory=dict)
    alerts: dict[str, list[dict]] = field(default_factory=dict)  # after which run -> alerts
    seen: dict[str, object] = field(default_factory=dict)  # what a user saw after v2's run
    cursor: str | None = None

    def defs(self, variant: str) -> dg.Definitions:
        return build_definitions(
            self.root / f"specs_{variant}",
            str(self.lake.base_url),
            self.uri,
            str(self.root / ".mlops" / "mlartifacts"),
        )

    def spec(self, variant: str):
        return load_spec(self.root / f"specs_{variant}" / f"{NAME}.yaml")

    def run(
        self, variant: str, selection: list[dg.AssetKey] | None = None
    ) -> dg.ExecuteInProcessResult:
        cfg = {"ops": {f"{NAME}__candidate_model": {"config": {"trials": 2}}}}
        tags = {monitoring.TAG_SPEC: NAME, monitoring.TAG_TRIGGER: "manual"}
        return (
            self.defs(variant)
            .resolve_job_def(TRAINING_JOB)
            .execute_in_process(
                instance=self.instance,
                run_config={**QUIET, **cfg} if selection is None else QUIET,
                raise_on_error=False,
                asset_selection=selection,
                tags=tags,
            )
        )

    def tick(self) -> list[dict]:
        """One tick of the run-failure sensor; the alerts it sent."""
        defs = self.defs("strict")
        sensor = defs.get_repository_def().get_sensor_def(run_failure_sensor_name(self.spec("ok")))
        before = len(ALERTS)
        ctx = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources={"alerting": RecordingAlerts()},
            definitions=defs,
        )
        self.cursor = sensor.evaluate_tick(ctx).cursor or self.cursor
        return ALERTS[before:]


def _variant(root: Path, variant: str, thresholds: dict[str, float]) -> None:
    """Logistic regression only (fast); gates any model passes, but for `thresholds`."""
    data = yaml.safe_load((REPO / "specs" / f"{NAME}.yaml").read_text())
    data["model"]["candidates"] = [
        c for c in data["model"]["candidates"] if c["estimator"] == "logistic_regression"
    ]
    data["gates"].update(
        thresholds=thresholds, min_improvement=-1.0, slice_tolerance=1.0, latency_budget_ms=500
    )
    (root / f"specs_{variant}").mkdir()
    (root / f"specs_{variant}" / f"{NAME}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _cli(w: World, *args: str) -> str:
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_SPECS_DIR", str(w.root / "specs_strict"))
    mp.setenv("MLOPS_LAKE_URL", str(w.lake.base_url))
    mp.setenv("MLOPS_MLFLOW_TRACKING_URI", w.uri)
    try:
        out = CliRunner().invoke(main, list(args))
    finally:
        mp.undo()
    assert out.exit_code == 0, out.output
    return out.output


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("refusal")
    p = make_project(root)
    small_data(p, days=DAYS, machines=16, seed=5)
    for d in range(1, DAYS + 1):
        p.run_day(f"2026-01-{d:02d}")
    _variant(root, "ok", {})
    _variant(root, "strict", {"roc_auc": 0.999})
    w = World(root, p.lake, mlflow_db(root), p.instance)
    w.runs["v1"] = w.run("ok")
    w.tick()  # the sensor starts watching here
    w.runs["v2"] = w.run("strict")
    w.alerts["v2"] = w.tick()
    w.seen["history"] = _cli(w, "history", "--spec", NAME)
    w.seen["lineage"] = _cli(w, "lineage", "--spec", NAME, "--version", "2")
    w.seen["status"] = st.status(
        w.spec("strict"), InstanceRuns(w.instance), w.lake, open_registry(w.uri)
    )
    w.seen["challenger"] = registry.alias_version(w.uri, NAME, registry.CHALLENGER)

    # v3: a gate that raises is a failure, not a refusal.
    def smoke_raises(*args, **kwargs):
        raise RuntimeError("the serving smoke test crashed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(promotion, "serving_smoke_gate", smoke_raises)
        w.runs["v3"] = w.run("ok")
    w.alerts["v3"] = w.tick()
    w.runs["v3_decided_alone"] = w.run("ok", selection=[dg.AssetKey([NAME, "champion_model"])])
    return w


def _key(asset: str) -> dg.AssetKey:
    return dg.AssetKey([NAME, asset])


def _check_evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        e.asset_check_evaluation_data.asset_check_key.name: e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_the_first_model_is_promoted(world):
    r1 = world.runs["v1"]
    assert r1.success
    m1 = materialization_meta(r1, _key("champion_model"))
    assert m1["promoted"] and m1["champion_version"] == 1


def test_a_refused_challenger_ends_a_successful_run_and_the_champion_keeps_serving(world):
    r2 = world.runs["v2"]
    assert r2.success
    checks = _check_evaluations(r2)
    assert len(checks) == 4
    # The failed gate shows in the UI as a failed check, a warning, with its reason.
    thresholds = checks["thresholds_gate_check"]
    assert not thresholds.passed and thresholds.severity == dg.AssetCheckSeverity.WARN
    assert "does not meet >= 0.999" in thresholds.metadata["reason"].value
    assert all(c.passed for n, c in checks.items() if n != "thresholds_gate_check")
    m2 = materialization_meta(r2, _key("champion_model"))
    assert m2["promoted"] is False and m2["evaluated_version"] == 2
    assert m2["champion_version"] == 1
    assert m2["reason"].startswith("thresholds: roc_auc") and "0.999" in m2["reason"]
    assert "| refused | 1 | 2 |" in m2["deployment_history"]
    assert registry.alias_version(world.uri, NAME, registry.CHAMPION) == 1
    tags = registry.version_tags(world.uri, NAME, 2)
    assert tags["mlops.promotion"] == f"refused: {m2['reason']}"
    assert tags["mlops.gate_status"] == "failed"
    # Nothing else was a candidate: the challenger alias is gone (it named v2).
    assert world.seen["challenger"] is None and m2["challenger_version"] == 0


def test_the_refusal_is_in_the_deployment_history_without_moving_rollback(world):
    h = registry.deployment_history(world.lake, NAME)
    rows = h.select("action", "from_version", "to_version").rows()
    assert rows[:2] == [("promote", None, 1), ("refused", 1, 2)]
    refused = h.row(1, named=True)
    assert refused["reason"].startswith("thresholds: roc_auc")
    assert refused["dagster_run_id"] == world.runs["v2"].run_id and refused["mlflow_run_id"]


def test_history_lineage_and_status_say_refused_with_the_reason(world):
    reason = registry.version_tags(world.uri, NAME, 2)["mlops.promotion"].removeprefix("refused: ")
    history = world.seen["history"].splitlines()
    line = next(x for x in history if " refused " in x)
    assert "v2 (v1 kept serving)" in line and reason in line
    assert f"gate             failed; refused: {reason}" in world.seen["lineage"]
    s = world.seen["status"]
    last = s["last_retraining"]
    assert last["run_id"] == world.runs["v2"].run_id and last["status"] == "SUCCESS"
    assert last["version"] == 2 and last["outcome"] == f"refused: {reason}"
    assert s["champion"] == 1 and s["challenger"] is None
    assert s["last_deployment"]["action"] == "promote"  # the last move of the alias
    assert "-> v2 refused: thresholds" in st.render(s)


def test_no_alert_for_a_refusal_but_one_for_a_gate_that_raises(world):
    assert world.alerts["v2"] == []
    r3 = world.runs["v3"]
    assert not r3.success
    assert [a["fields"]["run_id"] for a in world.alerts["v3"]] == [r3.run_id]
    assert world.alerts["v3"][0]["fields"]["job"] == TRAINING_JOB
    # champion_model waited for the gates: it did not run after one raised.
    assert _key("champion_model") not in {
        e.step_materialization_data.materialization.asset_key
        for e in r3.get_asset_materialization_events()
    }
    assert registry.alias_version(world.uri, NAME, registry.CHAMPION) == 1


def test_a_gate_without_a_result_refuses_and_says_which(world):
    alone = world.runs["v3_decided_alone"]
    assert alone.success
    m = materialization_meta(alone, _key("champion_model"))
    assert m["evaluated_version"] == 3 and m["promoted"] is False
    assert m["reason"] == "serving_smoke: no result recorded (its check did not run for v3)"
    assert registry.alias_version(world.uri, NAME, registry.CHAMPION) == 1
    # A result recorded for another evaluation of the version does not count either.
    other = promotion.recorded_gates(world.uri, NAME, 2, evaluation_run_id="0" * 36)
    assert not any(g.passed for g in other)
    assert all("no result recorded for this evaluation" in g.reason for g in other)
    same = promotion.recorded_gates(world.uri, NAME, 2, world.runs["v2"].run_id)
    assert [g.passed for g in same] == [False, True, True, True]


def test_the_model_card_counts_each_split(world):
    r2 = world.runs["v2"]
    ts_hash = materialization_meta(r2, _key("candidate_model"))["training_set_hash"]
    frame = world.lake.read(NAME, "training_set", ts_hash[:16])
    n = {s: frame.filter(pl.col("split") == s).height for s in ("train", "valid", "test")}
    assert all(n.values())
    card = materialization_meta(r2, _key("model_evaluation"))["model_card"]
    assert f"trained on {n['train']:,} rows ({n['valid']:,} valid and {n['test']:,} test" in card
    lines = card.splitlines()
    rows = [f"| {s} | {n[s]:,} |" for s in ("train", "valid", "test")]
    at = lines.index(rows[0])
    assert lines[at : at + 3] == rows


def test_a_rollback_skips_refusals(tmp_path):
    """The champion before the current one comes from promotions only, whatever a refusal
    of the same version recorded since."""
    lake = Lake(str(tmp_path / "lake"))
    for action, a, b in [
        ("promote", None, 1),
        ("promote", 1, 2),
        ("promote", 2, 3),
        ("rollback", 3, 1),  # --to 1
        ("refused", 1, 3),  # v3 re-evaluated against v1 and refused
        ("rollback", 1, 3),  # --to 3
    ]:
        registry.record_deployment(lake, "s", registry.Deployment(action, a, b, "test"))
    assert registry.previous_champion(lake, "s", 3) == 2


def test_gate_tags_read_back_as_written():
    """The one gate-tag codec: what the checks and the decision write, status and lineage
    read back (reasons with `: ` in them included), and a refusal names the failed gates."""
    results = [
        promotion.GateResult("thresholds", True, "roc_auc 0.91 >= 0.7"),
        promotion.GateResult("improvement", False, "roc_auc: 0.80 < 0.82 + 0.01"),
    ]
    tags = promotion.gate_tags(results)
    assert tags["mlops.gate.improvement"] == "failed: roc_auc: 0.80 < 0.82 + 0.01"
    assert tags[promotion.GATE_STATUS_TAG] == "failed"
    read = promotion.read_gate_tags({**tags, promotion.gate_run_tag("slices"): "r"})
    assert [(r.name, r.passed, r.reason) for r in read.values()] == [
        ("improvement", False, "roc_auc: 0.80 < 0.82 + 0.01"),
        ("thresholds", True, "roc_auc 0.91 >= 0.7"),
    ]
    assert promotion.decision_text(tags) == "refused: improvement: roc_auc: 0.80 < 0.82 + 0.01"
