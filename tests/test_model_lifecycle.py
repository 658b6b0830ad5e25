"""The model half through Dagster against a real MLflow registry (SQLite) and lake.

One scenario, built once for the module: v1 (logistic regression) becomes the first
champion on thresholds alone; v2 (xgboost, clearly better on this non-linear data) passes
every gate and takes over; v3 (logistic regression again) is worse and is refused: an
outcome of a successful run, recorded, not a failure (tests/test_refusal.py goes further).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
from click.testing import CliRunner
from mlflow import artifacts as mlflow_artifacts

from cli.main import main
from mlops import lineage, model_evaluation, promotion, registry, training
from mlops.lake import Lake
from mlops.model_loader import load_model
from mlops.spec import load_spec
from orchestration.definitions import build_definitions
from tests.conftest import (
    QUIET,
    REPO,
    forget_defs_state_storage,
    make_project,
    materialization_meta,
    mlflow_db,
    small_data,
)

NAME = "machine_failure"
DAYS = 14


@dataclass
class Lifecycle:
    root: Path
    lake: Lake
    uri: str
    instance: dg.DagsterInstance
    results: dict[str, dg.ExecuteInProcessResult]

    def defs(self, variant: str) -> dg.Definitions:
        forget_defs_state_storage()  # the CI failure this guards was in this module
        return build_definitions(
            self.root / f"specs_{variant}",
            str(self.lake.base_url),
            self.uri,
            str(self.root / ".mlops" / "mlartifacts"),
        )

    def spec(self, variant: str):
        return load_spec(self.root / f"specs_{variant}" / f"{NAME}.yaml")

    def train(self, variant: str, trials: int = 3) -> dg.ExecuteInProcessResult:
        job = self.defs(variant).resolve_job_def(f"{NAME}_training_job")
        cfg = {"ops": {f"{NAME}__candidate_model": {"config": {"trials": trials}}}}
        return job.execute_in_process(
            instance=self.instance, run_config={**QUIET, **cfg}, raise_on_error=False
        )


def _variant(root: Path, variant: str, candidates: list[str]) -> None:
    data = yaml.safe_load((REPO / "specs" / f"{NAME}.yaml").read_text())
    data["model"]["candidates"] = [
        c for c in data["model"]["candidates"] if c["estimator"] in candidates
    ]
    data["gates"]["thresholds"] = {"roc_auc": 0.55}
    data["gates"]["latency_budget_ms"] = 200  # a loaded CI machine must not fail the smoke test
    (root / f"specs_{variant}").mkdir()
    (root / f"specs_{variant}" / f"{NAME}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def life(tmp_path_factory) -> Lifecycle:
    root = tmp_path_factory.mktemp("life")
    p = make_project(root)
    small_data(p, days=DAYS, machines=20, seed=5)
    for d in range(1, DAYS + 1):
        p.run_day(f"2026-01-{d:02d}")
    _variant(root, "lr", ["logistic_regression"])
    _variant(root, "xgb", ["xgboost"])
    uri = mlflow_db(root)
    life = Lifecycle(root, p.lake, uri, dg.DagsterInstance.ephemeral(), {})
    ts_job = life.defs("lr").resolve_job_def(f"{NAME}_training_set_job")
    ts_job.execute_in_process(instance=life.instance, run_config=QUIET)
    for run, variant in (("v1", "lr"), ("v2", "xgb"), ("v3", "lr")):
        life.results[run] = life.train(variant)
    return life


def _checks(result) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.asset_check_key.name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def _key(asset: str) -> dg.AssetKey:
    return dg.AssetKey([NAME, asset])


def test_first_model_then_a_better_one_become_champion(life):
    r1, r2 = life.results["v1"], life.results["v2"]
    assert r1.success and r2.success
    assert all(_checks(r1).values()) and all(_checks(r2).values())
    assert materialization_meta(r1, _key("champion_model"))["champion_version"] == 1
    m2 = materialization_meta(r2, _key("champion_model"))
    assert m2["promoted"] and m2["champion_version"] == 2
    ev = materialization_meta(r2, _key("model_evaluation"))
    assert ev["model_version"] == 2 and ev["champion_version"] == 1
    assert "data:image/png;base64," in ev["plots"] and "# Model card" in ev["model_card"]
    h = registry.deployment_history(life.lake, NAME)
    assert h.select("action", "from_version", "to_version").rows() == [
        ("promote", None, 1),
        ("promote", 1, 2),
        ("refused", 2, 3),  # v3's run: the champion v2 kept serving
    ]


def test_the_uis_link_each_other_and_show_what_each_version_is(life):
    from mlops.links import DAGSTER_RUN_URL_TAG
    from mlops.settings import settings

    mlflow_ui, dagster_ui = settings().mlflow_ui_url.rstrip("/"), settings().dagster_url
    c = registry.client(life.uri)
    r2, r3 = life.results["v2"], life.results["v3"]
    cand = materialization_meta(r2, _key("candidate_model"))
    run = c.get_run(cand["mlflow_run_id"])
    exp, run_id = run.info.experiment_id, run.info.run_id
    # Dagster -> MLflow: the run, the version and the evaluation's artifacts are links.
    assert cand["mlflow_run"] == f"{mlflow_ui}/#/experiments/{exp}/runs/{run_id}"
    assert cand["mlflow_model_version"] == f"{mlflow_ui}/#/models/{NAME}/versions/2"
    ev = materialization_meta(r2, _key("model_evaluation"))
    assert ev["mlflow_run"] == cand["mlflow_run"]
    report = "evaluation/evidently_report.html"
    assert ev["evidently_report"] == f"{cand['mlflow_run']}/artifacts/{report}"
    assert report in {f.path for f in c.list_artifacts(run_id, "evaluation")}
    champ = materialization_meta(r2, _key("champion_model"))
    assert champ["champion_model_version"] == f"{mlflow_ui}/#/models/{NAME}/versions/2"
    # MLflow -> Dagster: the run, its trials and the version carry the Dagster run's page.
    url = f"{dagster_ui}/runs/{r2.run_id}"
    assert run.data.tags[DAGSTER_RUN_URL_TAG] == url
    assert registry.version_tags(life.uri, NAME, 2)[DAGSTER_RUN_URL_TAG] == url
    trials = c.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")
    assert trials and all(t.data.tags[DAGSTER_RUN_URL_TAG] == url for t in trials)
    assert run.data.tags["mlops.evaluation_dagster_run_url"] == url
    # A classic experiment (not GenAI), runs named by trigger and day.
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    window = json.loads(run.data.tags["mlops.training_partitions"])
    assert run.info.run_name == f"manual {window[-1]}"
    # The gate's outcome in each version's description, with the deciding run's link.
    promoted = c.get_model_version(NAME, "2").description
    assert promoted.startswith("**Promoted to champion** (champion before: v1)")
    assert "| improvement | passed |" in promoted and f"]({url})" in promoted
    refused = c.get_model_version(NAME, "3").description
    assert refused.startswith(
        "**Refused by the promotion gate** (champion before: v2): improvement"
    )
    assert "| improvement | FAILED | roc_auc" in refused
    assert f"]({dagster_ui}/runs/{r3.run_id})" in refused
    # Deltas per metric, numbers the UI can plot, rounded.
    doc = model_evaluation.load_evaluation(life.lake, life.spec("xgb"), 2)
    chal, old = doc["challenger"]["metrics"], doc["champion"]["metrics"]
    deltas = {k.removeprefix("delta_"): v for k, v in ev.items() if k.startswith("delta_")}
    assert set(deltas) == {k for k in chal if chal[k] is not None and old.get(k) is not None}
    assert {"roc_auc", "log_loss", "f1"} <= set(deltas)
    for k, v in deltas.items():
        assert isinstance(v, float) and v == round(chal[k] - old[k], 4), k
    assert ev["test_roc_auc"] == round(chal["roc_auc"], 4)
    # The model card lists the version's hyperparameters and what it was trained on.
    params = {
        k: v for k, v in run.data.params.items() if k not in model_evaluation.NOT_HYPERPARAMETERS
    }
    assert params, run.data.params
    card = ev["model_card"]
    parameters = card.split("## Parameters")[1].split("## Metrics")[0]
    listed = [ln.split("|")[1].strip() for ln in parameters.splitlines() if ln.startswith("| ")]
    assert listed[1:] == sorted(params)  # after the header
    assert f"trained on {doc['rows']['train']:,} rows" in card
    assert (
        f"({doc['rows']['valid']:,} valid and {doc['rows']['test']:,} test rows held out)" in card
    )


def test_worse_challenger_does_not_move_the_alias_and_says_why(life):
    r3 = life.results["v3"]
    checks = _checks(r3)
    assert checks["improvement_gate_check"] is False
    assert checks["thresholds_gate_check"] and checks["serving_smoke_gate_check"]
    # A refusal is an outcome: the run succeeds, champion_model records why, v2 keeps serving.
    assert r3.success
    m3 = materialization_meta(r3, _key("champion_model"))
    assert m3["promoted"] is False and m3["evaluated_version"] == 3
    assert m3["champion_version"] == 2 and m3["reason"].startswith("improvement: roc_auc")
    assert "| refused | 2 | 3 |" in m3["deployment_history"]
    assert registry.alias_version(life.uri, NAME, registry.CHAMPION) == 2
    assert registry.alias_version(life.uri, NAME, registry.CHALLENGER) is None  # no candidate
    tags = registry.version_tags(life.uri, NAME, 3)
    assert tags["mlops.gate.improvement"].startswith("failed: roc_auc")
    assert tags["mlops.promotion"] == f"refused: {m3['reason']}"
    # The same decision through champion_model's own logic (e.g. materialized alone).
    doc = model_evaluation.load_evaluation(life.lake, life.spec("lr"), 3)
    d = promotion.decide_promotion(life.spec("lr"), life.lake, life.uri, 3, doc)
    assert not d.promoted and "improvement" in d.reason
    assert registry.alias_version(life.uri, NAME, registry.CHAMPION) == 2
    assert registry.version_tags(life.uri, NAME, 3)["mlops.promotion"].startswith("refused:")


def test_every_version_carries_the_lineage_contract(life):
    ts_meta = materialization_meta(
        life.defs("lr")
        .resolve_job_def(f"{NAME}_training_set_job")
        .execute_in_process(instance=life.instance, run_config=QUIET),
        _key("training_set"),
    )
    inputs = ts_meta["input_data_versions"]
    assert sum(len(p) for p in inputs.values()) > DAYS  # more than one per training day
    for v in (1, 2, 3):
        tags = registry.version_tags(life.uri, NAME, v)
        for t in registry.LINEAGE_TAGS:
            assert tags.get(f"mlops.{t}"), f"v{v} lacks mlops.{t}"
        # The data versions are one artifact on the run, named by one digest tag: what training
        # registers is a fixed set of tags however many partitions it read (the gate adds two
        # per gate and the decision a few: 27-29 in all here, against ~50 with a tag each).
        assert not [k for k in tags if "data_version." in k]
        assert [k for k in tags if "digest" in k] == [registry.DATA_VERSIONS_DIGEST_TAG]
        assert tags[registry.DATA_VERSIONS_DIGEST_TAG] == registry.data_versions_digest(inputs)
        assert int(tags[registry.DATA_PARTITIONS_TAG]) == sum(len(p) for p in inputs.values())
        decided = ("mlops.gate", "mlops.promotion", "mlops.decision_", "mlops.deploy")
        assert len([k for k in tags if not k.startswith(decided)]) <= 20, sorted(tags)
        assert len(tags) <= 30, sorted(tags)
        lin = registry.version_lineage(life.uri, NAME, v)
        assert lin["training_partitions"] == ts_meta["window"]
        assert lin["data_versions"] == inputs
        assert lin["training_set_hash"] == ts_meta["training_set_hash"]
        run = registry.client(life.uri).get_run(tags["mlops.mlflow_run_id"])
        artifact = mlflow_artifacts.load_dict(
            f"{run.info.artifact_uri}/{registry.LINEAGE_ARTIFACT}"
        )
        assert artifact["data_versions"] == inputs
        assert not [k for k in run.data.tags if "data_version." in k]
        assert (
            run.data.tags[registry.DATA_VERSIONS_DIGEST_TAG]
            == tags[registry.DATA_VERSIONS_DIGEST_TAG]
        )
        assert run.data.tags["mlops.training_set_hash"] == lin["training_set_hash"]
        assert run.data.tags["mlops.dagster_run_id"] == lin["dagster_run_id"]
        assert any(i.dataset.name == f"{NAME}/training_set" for i in run.inputs.dataset_inputs)
    children = registry.client(life.uri).search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 3  # one nested run per trial


def test_evaluation_loads_the_exact_upstream_version(life):
    spec = life.spec("xgb")
    # A newer version appears in the registry (and takes the challenger alias) outside the
    # graph: evaluation must still evaluate what candidate_model recorded.
    frame = life.lake.read(NAME, "training_set")
    extra = training.train_candidate(
        spec, frame, {"training_set_hash": "x" * 64}, life.uri, str(life.root / "arts"), trials=1
    )
    assert registry.alias_version(life.uri, NAME, registry.CHALLENGER) == extra.version
    job = life.defs("lr").resolve_job_def(f"{NAME}_training_job")
    result = job.execute_in_process(
        instance=life.instance,
        run_config=QUIET,
        raise_on_error=False,
        asset_selection=[_key("model_evaluation")],
    )
    assert materialization_meta(result, _key("model_evaluation"))["model_version"] == 3


def test_batch_predictions_use_the_champion_and_keep_keys(life):
    job = life.defs("xgb").resolve_job_def(f"{NAME}_batch_predictions_job")
    result = job.execute_in_process(
        partition_key="2026-01-12", instance=life.instance, run_config=QUIET
    )
    meta = materialization_meta(result, _key("batch_predictions"))
    preds = life.lake.read(NAME, "batch_predictions", "2026-01-12")
    feats = life.lake.read(NAME, "features", "2026-01-12")
    keys = ["machine_id", "timestamp"]
    assert preds.select(keys).equals(feats.select(keys))
    assert preds["model_version"].unique().to_list() == [2] == [meta["model_version"]]
    assert preds["score"].is_between(0, 1).all()
    assert set(preds["decision"].unique().to_list()) <= {0.0, 1.0}


def test_raising_the_decisive_sensor_raises_predicted_risk(life):
    model = load_model(life.uri, NAME, alias=registry.CHAMPION)
    rows = life.lake.read(NAME, "training_set").filter(pl.col("split") == "test")
    vib = [c for c in rows.columns if c.startswith("vibration") and c != "vibration_delta"]
    hot = rows.with_columns([(pl.col(c) + 3.0) for c in vib])
    base, high = model.score(rows), model.score(hot)
    assert high.mean() > base.mean() + 0.05
    assert np.mean(high >= base) > 0.8


def test_reproduce_is_exact_and_lineage_cli(life, monkeypatch):
    monkeypatch.setenv("MLOPS_SPECS_DIR", str(life.root / "specs_xgb"))
    monkeypatch.setenv("MLOPS_LAKE_URL", str(life.lake.base_url))
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", life.uri)
    report = lineage.reproduce(life.spec("xgb"), life.lake, life.uri, 2)
    assert report["exact"], report
    runner = CliRunner()
    out = runner.invoke(main, ["lineage", "--spec", NAME, "--version", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["version"] == 2 and "champion" in data["aliases"]
    assert data["data_versions"]["features"] and not data["data_changed_since"]


def _expected_impact(life: Lifecycle, partition: str) -> tuple[dict, list]:
    """What used a partition, from the versions' lineage tags and the prediction files
    themselves: (version -> (assets, aliases), [(prediction day, versions that scored it)])."""
    c = registry.client(life.uri)
    versions = {}
    for mv in c.search_model_versions(f"name = '{NAME}'"):
        lin = registry.version_lineage(life.uri, NAME, int(mv.version))
        if partition in lin.get("training_partitions", []):
            # search_model_versions leaves the aliases out; get_model_version has them.
            aliases = c.get_model_version(NAME, mv.version).aliases
            versions[int(mv.version)] = (sorted(lin["data_versions"]), sorted(aliases))
    predictions = []
    for day in sorted(life.lake.partitions(NAME, "batch_predictions")):
        used = sorted(life.lake.read(NAME, "batch_predictions", day)["model_version"].unique())
        if set(used) & set(versions) or day == partition:
            predictions.append((day, used))
    return versions, predictions


def test_impact_names_the_versions_and_predictions_that_used_a_partition(life, monkeypatch):
    monkeypatch.setenv("MLOPS_SPECS_DIR", str(life.root / "specs_xgb"))
    monkeypatch.setenv("MLOPS_LAKE_URL", str(life.lake.base_url))
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", life.uri)
    # Predictions for one day, scored by the champion (v2): idempotent, so this test does not
    # depend on test_batch_predictions_use_the_champion_and_keep_keys having run.
    life.defs("xgb").resolve_job_def(f"{NAME}_batch_predictions_job").execute_in_process(
        partition_key="2026-01-12", instance=life.instance, run_config=QUIET
    )
    window = registry.lineage_from_tags(registry.version_tags(life.uri, NAME, 2))[
        "training_partitions"
    ]
    assert "2026-01-03" in window and "2026-01-12" not in window
    runner = CliRunner()
    for partition in ("2026-01-03", "2026-01-12", "2026-01-14"):
        imp = runner.invoke(main, ["impact", "--spec", NAME, "--partition", partition, "--json"])
        assert imp.exit_code == 0, imp.output
        found = json.loads(imp.output)
        versions, predictions = _expected_impact(life, partition)
        assert found["partition"] == partition
        got = {v["version"]: (v["assets"], sorted(v["aliases"])) for v in found["model_versions"]}
        assert got == versions, partition
        assert [
            (p["partition"], p["model_versions"]) for p in found["prediction_partitions"]
        ] == predictions, partition
        why = {p["partition"]: p["why"] for p in found["prediction_partitions"]}
        if partition in window:  # v1-v3 trained on the same training set
            assert set(versions) == {1, 2, 3} and versions[2][1] == ["champion"]
            assert predictions == [("2026-01-12", [2])] and why == {"2026-01-12": "scored by v2"}
        elif partition == "2026-01-12":  # after the window: only its own predictions
            assert versions == {} and predictions == [("2026-01-12", [2])]
            assert why == {"2026-01-12": "features of this partition"}
        else:
            assert versions == {} and predictions == []


def test_rollback_force_promote_and_a_changed_input(life, monkeypatch):
    monkeypatch.setenv("MLOPS_SPECS_DIR", str(life.root / "specs_xgb"))
    monkeypatch.setenv("MLOPS_LAKE_URL", str(life.lake.base_url))
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", life.uri)
    runner = CliRunner()
    out = runner.invoke(main, ["rollback", "--spec", NAME])
    assert out.exit_code == 0, out.output
    assert registry.alias_version(life.uri, NAME, registry.CHAMPION) == 1
    # The rollback job, with run config, back to v2.
    job = life.defs("xgb").resolve_job_def(f"{NAME}_rollback_job")
    job.execute_in_process(
        instance=life.instance,
        run_config={
            **QUIET,
            "ops": {f"{NAME}_rollback": {"config": {"to_version": 2, "reason": "test"}}},
        },
    )
    assert registry.alias_version(life.uri, NAME, registry.CHAMPION) == 2
    # A gate failure can be overridden only with a reason, and the override is recorded.
    no_reason = runner.invoke(main, ["promote", "--spec", NAME, "--version", "3", "--force"])
    assert no_reason.exit_code == 1 and "--reason" in no_reason.output
    plain = runner.invoke(main, ["promote", "--spec", NAME, "--version", "3"])
    assert plain.exit_code == 1 and "FAIL improvement" in plain.output
    assert registry.alias_version(life.uri, NAME, registry.CHAMPION) == 2
    forced = runner.invoke(
        main, ["promote", "--spec", NAME, "--version", "3", "--force", "--reason", "incident 42"]
    )
    assert forced.exit_code == 0, forced.output
    assert registry.alias_version(life.uri, NAME, registry.CHAMPION) == 3
    h = registry.deployment_history(life.lake, NAME)
    assert h.select("action", "from_version", "to_version").rows()[-4:] == [
        ("rollback", 2, 1),
        ("rollback", 1, 2),
        ("refused", 2, 3),  # the plain `mlops promote` above: recorded, nothing moved
        ("force_promote", 2, 3),
    ]
    assert "incident 42" in h["reason"][-1]
    # Default rollback from a forced champion returns to the one it replaced.
    assert runner.invoke(main, ["rollback", "--spec", NAME]).exit_code == 0
    assert registry.alias_version(life.uri, NAME, registry.CHAMPION) == 2
    # A changed input partition makes reproduce say so (and not claim exactness).
    f = life.lake.read(NAME, "features", "2026-01-03")
    life.lake.write(NAME, "features", f.with_columns(pl.col("temperature") + 1), "2026-01-03")
    report = lineage.reproduce(life.spec("xgb"), life.lake, life.uri, 2)
    assert not report["exact"] and report["changed_inputs"] == ["features/2026-01-03"]
