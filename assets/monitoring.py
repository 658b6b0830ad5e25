"""Monitoring assets of one spec: drift_report and model_performance, both daily.

Each writes its per-day summary to the lake (`<spec>/<asset>/<day>.json`) beside a Parquet
table; the retraining sensors read those summaries, so the rules see exactly what the UI shows.
"""

import dagster as dg

from assets.metadata import asset_attrs, column_schema, md_table, rounded
from catalog.partitions import daily_partitions
from mlops import model_evaluation, monitoring
from mlops.monitoring import DRIFT_REPORT, MODEL_PERFORMANCE
from mlops.spec import Spec
from resources.lake import LakeResource
from resources.mlflow import MlflowResource


def build_monitoring_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    name = spec.name
    daily = daily_partitions(spec)
    key = lambda a: dg.AssetKey([name, a])  # noqa: E731
    common = {"group_name": name, "code_version": spec.content_hash[:12]}

    @dg.asset(
        key=key(DRIFT_REPORT),
        partitions_def=daily,
        deps=[key("features"), key("batch_predictions"), key("inference_log")],
        kinds={"evidently", "parquet"},
        **common,
        **asset_attrs(spec, DRIFT_REPORT),
    )
    def drift_report(
        context: dg.AssetExecutionContext, lake: LakeResource, mlflow: MlflowResource
    ) -> dg.MaterializeResult:
        """Data and prediction drift of the day's scored inputs against the champion's training set."""
        from mlops import drift

        store, day = lake.get(), context.partition_key
        try:
            d = drift.drift_day(spec, store, mlflow.tracking_uri, day)
        except drift.NothingToCompare as e:
            raise dg.Failure(str(e)) from None
        written, html = drift.save_drift_day(store, spec, day, d)
        logged = drift.log_drift_report(mlflow.tracking_uri, day, d)
        link = (
            {"report": mlflow.artifact_link(logged.experiment_id, logged.run_id, logged.path)}
            if logged
            else {}
        )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={**_drift_metadata(spec, d, html), **link},
        )

    @dg.asset(
        key=key(MODEL_PERFORMANCE),
        partitions_def=daily,
        deps=[key("batch_predictions"), key("inference_log"), key("labels"), key("features")],
        kinds={"parquet"},
        **common,
        **asset_attrs(spec, MODEL_PERFORMANCE),
    )
    def model_performance(
        context: dg.AssetExecutionContext, lake: LakeResource
    ) -> dg.MaterializeResult:
        """Realized metrics of the day's predictions once labels mature, against the champion's evaluation."""
        store, day = lake.get(), context.partition_key
        try:
            p = monitoring.performance_day(spec, store, day)
        except monitoring.NoMatureLabels as e:
            raise dg.Failure(str(e)) from None
        written = monitoring.save_performance_day(store, spec, day, p)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={**_performance_metadata(p), **column_schema(p.table)},
        )

    return [drift_report, model_performance]


def _drift_metadata(spec: Spec, d, html: str) -> dict:
    """What the UI shows of a drift report (d: mlops.drift.DriftDay)."""
    r, pred = d.result, d.result.prediction or {}
    return {
        "drift_share": rounded(r.drift_share),
        "dataset_drift": r.dataset_drift,
        "drift_threshold": spec.monitoring.drift_threshold,
        "drifted_columns": dg.MetadataValue.json(r.drifted_columns),
        "prediction_drift_score": rounded(pred.get("score")),
        "prediction_drifted": pred.get("drifted"),
        "champion_version": d.champion_version,
        "reference_training_set_hash": d.training_set_hash,
        "scored_rows_source": d.source,
        "rows_compared": dg.MetadataValue.json(
            {"reference": r.reference_rows, "current": r.current_rows}
        ),
        "columns": md_table(r.columns.sort("score", descending=True), 12),
        "report": dg.MetadataValue.path(html),  # replaced by the MLflow link when logged there
        "report_path": dg.MetadataValue.path(html),
        **column_schema(r.columns),
    }


def _performance_metadata(p: monitoring.PerformanceDay) -> dict:
    perf = p.performance
    return {
        "realized_" + perf.primary_metric: rounded(perf.realized),
        "baseline_" + perf.primary_metric: rounded(perf.baseline),
        "decline_threshold": rounded(
            monitoring.decline_threshold(perf.primary_metric, perf.baseline, perf.tolerance)
        ),
        "tolerance": perf.tolerance,
        "declined": perf.declined,
        "rows_scored": perf.rows_scored,
        "scored_rows_source": p.source,
        "rows_labelled": perf.rows_labelled,
        "model_versions": dg.MetadataValue.json(perf.model_versions),
        "metrics": dg.MetadataValue.json(perf.metrics),
        "slices": dg.MetadataValue.json(model_evaluation.json_safe(perf.slices)),
    }
