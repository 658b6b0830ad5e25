"""The model half of one spec's graph: training set -> candidate -> evaluation -> gate ->
champion -> batch predictions. Thin wiring over mlops/ (training, promotion, model_loader).

Each step loads the exact model version its upstream materialization recorded, never "the
newest": candidate_model's metadata names the version that evaluation and the gate use.

The steps that write the registry (register a version, move an alias) do so only for a run
that is still alive (`run_alive`): a step orphaned by a killed run worker, or whose run is
being cancelled, stops before the write instead of finishing for a run that never will.
"""

import base64
import multiprocessing
from typing import TYPE_CHECKING

import dagster as dg

from assets.metadata import asset_attrs, column_schema, rounded
from catalog.partitions import daily_partitions
from catalog.pools import registry_pool
from mlops import model_evaluation as evaluation_doc
from mlops import promotion, registry, training
from mlops.lake import Lake
from mlops.spec import MODEL_ASSET_NAMES, Spec
from resources.lake import LakeResource
from resources.mlflow import MlflowResource

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

GATE_DESCRIPTIONS = {
    "thresholds": "Promotion gate: the evaluated version meets the spec's gates.thresholds "
    "on its test split (a bar the champion misses too, and is beaten on, is waived).",
    "improvement": "Promotion gate: the evaluated version beats the champion's primary metric "
    "on the same test rows by gates.min_improvement (the first model: no champion to beat).",
    "slices": "Promotion gate: no gates.slice_columns slice is worse than the champion's by "
    "more than gates.slice_tolerance.",
    "serving_smoke": "Promotion gate: the serving loader loads the version and scores its "
    "input example; single-row p95 latency within gates.latency_budget_ms.",
}
GATE_CHECKS = {
    "thresholds": "thresholds_gate_check",
    "improvement": "improvement_gate_check",
    "slices": "slices_gate_check",
    "serving_smoke": "serving_smoke_gate_check",
}


class TrainConfig(dg.Config):
    """Override the spec's number of Optuna trials (e.g. for a quick run)."""

    trials: int | None = None


def upstream_meta(context, key: dg.AssetKey) -> dict:
    """Metadata of the latest materialization of `key`: how a step finds its exact input."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(
            f"{key.to_user_string()} has never been materialized: materialize it first"
        )
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _in_step_worker() -> bool:
    """Whether this process is a step process of Dagster's multiprocess executor (spawn or
    forkserver; the default executor): a child of the run worker, running Dagster's
    child-process command. Not under the in-process executor (the step runs in the run worker,
    itself a child of the code server that launched it) nor under celery."""
    try:
        from dagster._core.executor.child_process_executor import (
            _execute_command_in_child_process as step_command,
        )
    except ImportError:  # moved in a later Dagster: tests/test_run_hardening.py says so
        return False
    return getattr(multiprocessing.current_process(), "_target", None) is step_command


def run_alive(context) -> training.Alive:
    """Arm the step to die with its run worker, and return the check to call right before a
    registry write: it raises training.RunGone unless the step's launcher still runs (see
    training.ParentWatch) and the run is still STARTED in the instance (not CANCELING or
    CANCELED: a run terminated from the UI, including a stuck one whose worker was killed)."""
    watch = training.ParentWatch(step_process=_in_step_worker())
    how = watch.arm()
    if watch.launcher is not None:
        context.log.debug(f"step dies with its run worker (pid {watch.launcher.pid}): {how}")
    run_id = context.run.run_id
    instance = context.instance

    def alive(action: str) -> None:
        why = watch.gone()
        if why is None:
            run = instance.get_run_by_id(run_id)
            if run is None:
                why = f"run {run_id} is not in the Dagster instance"
            elif run.status != dg.DagsterRunStatus.STARTED:
                why = f"run {run_id} is {run.status.value}"
        if why is not None:
            raise training.RunGone(
                f"did not {action}: {why}. The registry is left to live runs: start a new run."
            )

    return alive


def _png_md(png: bytes, title: str) -> str:
    data = base64.b64encode(png).decode()
    return f"**{title}**\n\n![{title}](data:image/png;base64,{data})\n"


def _candidate_metadata(spec: Spec, cand, ts_hash: str, mlflow: MlflowResource) -> dict:
    """candidate_model's page: the registered version, its search, the set it trained on."""
    model_name = spec.registered_model_name
    return {
        "model_name": model_name,
        "model_version": cand.version,
        "mlflow_run_id": cand.run_id,
        "mlflow_run": mlflow.run_link(cand.run_id, cand.experiment_id),
        "mlflow_model_version": mlflow.model_version_link(model_name, cand.version),
        "model_uri": f"models:/{model_name}/{cand.version}",
        "estimator": cand.estimator,
        "params": dg.MetadataValue.json(cand.params),
        f"valid_{cand.metric}": rounded(cand.valid_score),
        "decision_threshold": rounded(
            cand.threshold if cand.threshold is not None else float("nan")
        ),
        "trials": cand.trials,
        "training_set_hash": ts_hash,
    }


def _evaluation_metadata(rec: evaluation_doc.RecordedEvaluation, mlflow: MlflowResource) -> dict:
    """What the evaluation's page shows: metrics beside the champion's (and the difference,
    per metric, as numbers the UI plots over materializations), plots, model card, links."""
    doc, primary = rec.doc, rec.doc["primary_metric"]
    run_id = doc["challenger"]["run_id"]
    out: dict = {
        "model_version": doc["version"],
        "mlflow_run_id": run_id,
        "mlflow_run": mlflow.run_link(run_id, rec.experiment_id),
        "mlflow_model_version": mlflow.model_version_link(doc["model_name"], doc["version"]),
        "champion_version": (doc["champion"] or {}).get("version") or 0,
        f"test_{primary}": rounded(doc["challenger"]["metrics"].get(primary) or float("nan")),
    }
    out.update({f"delta_{k}": rounded(v) for k, v in evaluation_doc.metric_deltas(doc).items()})
    out.update(
        {
            "metrics": dg.MetadataValue.md(_metrics_table(doc)),
            "plots": dg.MetadataValue.md(
                "\n".join(_png_md(png, n) for n, png in rec.plots.items())
            ),
            "model_card": dg.MetadataValue.md(rec.model_card),
            "evidently_report": mlflow.artifact_link(
                rec.experiment_id, run_id, rec.artifact_paths["evidently_report"]
            ),
            "evaluation_artifacts": mlflow.artifact_link(
                rec.experiment_id, run_id, evaluation_doc.ARTIFACT_DIR
            ),
            "evaluation_path": dg.MetadataValue.path(rec.path),
            "test_rows": doc["test_rows"],
        }
    )
    return out


def _metrics_table(doc: dict) -> str:
    chal = doc["challenger"]["metrics"]
    champ = (doc["champion"] or {}).get("metrics", {})
    champ_v = (doc["champion"] or {}).get("version")
    head = f"| metric | v{doc['version']} (challenger) |" + (
        f" v{champ_v} (champion) |" if champ else ""
    )
    rows = [head, "|---|---|" + ("---|" if champ else "")]
    for k in sorted(chal):
        a = chal[k]
        line = f"| {k} | {'n/a' if a is None else round(a, 4)} |"
        if champ:
            b = champ.get(k)
            line += f" {'n/a' if b is None else round(b, 4)} |"
        rows.append(line)
    return "\n".join(rows)


def build_model_assets(spec: Spec) -> list:
    name = spec.name
    model_name = spec.registered_model_name
    daily = daily_partitions(spec)
    key = {a: dg.AssetKey([name, a]) for a in ("training_set", "features", *MODEL_ASSET_NAMES)}
    common = {"group_name": name, "code_version": spec.content_hash[:12]}

    def attrs(asset: str) -> dict:
        return {**common, **asset_attrs(spec, asset)}

    @dg.asset(
        key=key["candidate_model"],
        deps=[key["training_set"]],
        kinds={"mlflow", "xgboost"},
        pool=registry_pool(spec),
        **attrs("candidate_model"),
    )
    def candidate_model(
        context: dg.AssetExecutionContext,
        config: TrainConfig,
        lake: LakeResource,
        mlflow: MlflowResource,
    ) -> dg.MaterializeResult:
        """Optuna search over the spec's candidates; the best refit, registered as challenger."""
        alive = run_alive(context)
        ts_meta = upstream_meta(context, key["training_set"])
        ts_hash = ts_meta["training_set_hash"]
        store = lake.get()
        frame = store.read(name, "training_set", ts_hash[:16])
        lineage = training.run_lineage(
            ts_meta,
            context.run.run_id,
            context.run.tags,
            mlflow.dagster_run_url(context.run.run_id),
        )
        try:
            cand = training.train_candidate(
                spec,
                frame,
                lineage,
                mlflow.tracking_uri,
                mlflow.artifact_root,
                trials=config.trials,
                training_set_path=store.url(name, "training_set", ts_hash[:16]),
                alive=alive,
            )
        except (training.RunGone, ValueError) as e:  # ValueError: data that cannot train
            raise dg.Failure(f"{name}: {e}") from None
        return dg.MaterializeResult(metadata=_candidate_metadata(spec, cand, ts_hash, mlflow))

    @dg.asset(
        key=key["model_evaluation"],
        deps=[key["candidate_model"]],
        kinds={"mlflow"},
        **attrs("model_evaluation"),
    )
    def model_evaluation(
        context: dg.AssetExecutionContext, lake: LakeResource, mlflow: MlflowResource
    ) -> dg.MaterializeResult:
        """Test-split metrics, slices, plots, Evidently report and model card, champion beside."""
        version = int(upstream_meta(context, key["candidate_model"])["model_version"])
        rec = evaluation_doc.record_evaluation(
            spec,
            lake.get(),
            mlflow.tracking_uri,
            version,
            mlflow.dagster_run_url(context.run.run_id),
        )
        return dg.MaterializeResult(metadata=_evaluation_metadata(rec, mlflow))

    def _gate_check(gate: str):
        # A failed gate is an outcome, not a failure (DESIGN §6): it reports severity WARN, so
        # it never stops downstream work nor fails the run; champion_model refuses the
        # challenger and records why. `blocking=True` is kept only for what Dagster does with
        # it besides gating ERROR results: champion_model waits for the four checks, so it
        # decides on this evaluation's results (a check that raises still fails the run).
        @dg.asset_check(
            asset=key["model_evaluation"],
            name=GATE_CHECKS[gate],
            blocking=True,
            description=GATE_DESCRIPTIONS[gate],
        )
        def check(
            context: dg.AssetCheckExecutionContext, lake: LakeResource, mlflow: MlflowResource
        ) -> dg.AssetCheckResult:
            version = int(upstream_meta(context, key["model_evaluation"])["model_version"])
            evaluated = context.instance.get_latest_materialization_event(key["model_evaluation"])
            try:
                result = promotion.judge_gate(
                    gate, spec, lake.get(), mlflow.tracking_uri, version, evaluated.run_id
                )
            except promotion.PromotionError as e:
                raise dg.Failure(str(e)) from None
            return dg.AssetCheckResult(
                passed=result.passed,
                severity=dg.AssetCheckSeverity.WARN,
                description=result.reason,
                metadata={
                    "model_version": version,
                    "reason": result.reason,
                    "details": dg.MetadataValue.json(evaluation_doc.json_safe(result.details)),
                },
            )

        return check

    @dg.asset(
        key=key["champion_model"],
        deps=[key["model_evaluation"]],
        kinds={"mlflow"},
        pool=registry_pool(spec),
        **attrs("champion_model"),
    )
    def champion_model(
        context: dg.AssetExecutionContext, lake: LakeResource, mlflow: MlflowResource
    ) -> dg.MaterializeResult:
        """Moves alias `champion` to the evaluated version if every gate passed, else records why."""
        alive = run_alive(context)
        version = int(upstream_meta(context, key["model_evaluation"])["model_version"])
        evaluated = context.instance.get_latest_materialization_event(key["model_evaluation"])
        try:
            out = promotion.decide_on_evaluation(
                spec, lake.get(), mlflow.tracking_uri, version, evaluated.run_id,
                context.run.run_id, before_move=alive,
                dagster_run_url=mlflow.dagster_run_url(context.run.run_id),
            )  # fmt: skip
        except (promotion.PromotionError, training.RunGone) as e:
            raise dg.Failure(f"{name}: {e}") from None
        if not out.decision.promoted:
            context.log.info(
                f"v{version} not promoted, v{out.champion or '-'} keeps serving: {out.decision.reason}"
            )
        return dg.MaterializeResult(
            metadata=_champion_metadata(spec, lake.get(), version, out, mlflow)
        )

    @dg.asset(
        key=key["batch_predictions"],
        partitions_def=daily,
        kinds={"parquet"},
        deps=[key["features"], key["champion_model"]],
        **attrs("batch_predictions"),
    )
    def batch_predictions(
        context: dg.AssetExecutionContext, lake: LakeResource, mlflow: MlflowResource
    ) -> dg.MaterializeResult:
        """The day's feature rows scored by the champion; each row names the model version."""
        from mlops import scoring

        store = lake.get()
        try:
            model = scoring.load_champion(spec, mlflow.tracking_uri)
        except scoring.ChampionUnavailable as e:
            raise dg.Failure(str(e)) from None
        out = scoring.score_frame(spec, model, store.read(name, "features", context.partition_key))
        written = store.write(name, "batch_predictions", out, context.partition_key)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={
                "rows": out.height,
                "model_version": model.version,
                "mean_score": rounded(float(out["score"].mean() or 0.0)),
                "decision_rate": rounded(float(out["decision"].cast(pl.Float64).mean() or 0.0)),
                "path": dg.MetadataValue.path(written.path),
                **column_schema(out),
            },
        )

    @dg.op(name=f"{name}_rollback", pool=registry_pool(spec))
    def rollback_op(
        context: dg.OpExecutionContext,
        config: RollbackConfig,
        lake: LakeResource,
        mlflow: MlflowResource,
    ) -> None:
        """Point alias champion back at the previous champion (or config.to_version)."""
        alive = run_alive(context)
        try:
            alive(f"roll back alias {registry.CHAMPION} of {model_name}")
            d = promotion.rollback(
                spec,
                lake.get(),
                mlflow.tracking_uri,
                config.to_version,
                reason=config.reason,
                dagster_run_id=context.run.run_id,
                actor="dagster",
            )
        except (promotion.PromotionError, registry.RegistryError, training.RunGone) as e:
            raise dg.Failure(str(e)) from None
        context.log.info(f"champion v{d.from_version} -> v{d.to_version}: {d.reason}")

    @dg.job(name=f"{name}_rollback_job", description=f"{name}: roll the champion back.")
    def rollback_job():
        rollback_op()

    checks = [_gate_check(g) for g in GATE_CHECKS]
    return [
        candidate_model,
        model_evaluation,
        *checks,
        champion_model,
        batch_predictions,
        rollback_job,
    ]


class RollbackConfig(dg.Config):
    to_version: int | None = None
    reason: str = ""


def _champion_metadata(spec: Spec, store: Lake, version: int, out, mlflow: MlflowResource) -> dict:
    """champion_model's page: the aliases after the decision, each gate, the history."""
    d = out.decision
    model_name = spec.registered_model_name
    links = {"evaluated_model_version": mlflow.model_version_link(model_name, version)}
    if out.champion:
        links["champion_model_version"] = mlflow.model_version_link(model_name, out.champion)
    return {
        **links,
        "champion_version": out.champion or 0,
        "challenger_version": out.challenger or 0,
        "evaluated_version": version,
        "promoted": d.promoted,
        "reason": d.reason,
        "gates": dg.MetadataValue.json(
            [
                g["name"] + ": " + ("passed" if g["passed"] else "failed - " + g["reason"])
                for g in d.as_dict()["gates"]
            ]
        ),
        "deployment_history": dg.MetadataValue.md(_history_md(store, spec.name)),
        "model_uri": f"models:/{spec.registered_model_name}@{registry.CHAMPION}",
    }


def _history_md(store: Lake, spec_name: str) -> str:
    """Alias moves and refusals, newest first: `champion before` kept serving on a refusal."""
    h = registry.deployment_history(store, spec_name)
    if h.height == 0:
        return "no deployments yet"
    rows = [
        "| when | action | champion before | version | reason | run |",
        "|---|---|---|---|---|---|",
    ]
    for r in h.sort("time", descending=True).head(20).iter_rows(named=True):
        reason = str(r["reason"]).replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| {r['time']:%Y-%m-%d %H:%M} | {r['action']} | {r['from_version'] or '-'} "
            f"| {r['to_version']} | {reason} | {r['dagster_run_id'][:8]} |"
        )
    return "\n".join(rows)
