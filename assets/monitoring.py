"""Monitoring assets of one spec: drift_report and model_performance, both daily.

Each writes its per-day summary to the lake (`<spec>/<asset>/<day>.json`) beside a Parquet
table; the retraining sensors read those summaries, so the rules see exactly what the UI shows.
"""

from typing import TYPE_CHECKING

import dagster as dg

from assets.metadata import md_table
from mlops import monitoring, promotion, registry
from mlops.labels import entity_column
from mlops.lake import write_json
from mlops.monitoring import DRIFT_REPORT, MODEL_PERFORMANCE
from mlops.spec import Spec
from orchestration.partitions import daily_partitions
from resources.lake import LakeResource
from resources.mlflow import MlflowResource

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl


def scored_version(predictions: "pl.DataFrame") -> int:
    """The model version that scored most of the day's rows."""
    counts = predictions.group_by("model_version").len().sort("len", descending=True)
    return int(counts["model_version"][0])


def _predictions(store, spec: Spec, day: str) -> "tuple[pl.DataFrame, str]":
    """The day's scored rows: what the online service served when it served any (the
    inference_log asset), else the batch predictions."""
    if store.exists(spec.name, "inference_log", day):
        served = monitoring.served_rows(spec, store.read(spec.name, "inference_log", day))
        if served.height:
            return served, "served"
    return store.read(spec.name, "batch_predictions", day), "batch"


def build_monitoring_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    name = spec.name
    daily = daily_partitions(spec)
    key = lambda a: dg.AssetKey([name, a])  # noqa: E731
    common = {"group_name": name, "code_version": spec.content_hash[:12]}
    model_name = spec.registered_model_name

    @dg.asset(
        key=key(DRIFT_REPORT),
        partitions_def=daily,
        deps=[key("features"), key("batch_predictions"), key("inference_log")],
        kinds={"evidently", "parquet"},
        **common,
    )
    def drift_report(
        context: dg.AssetExecutionContext, lake: LakeResource, mlflow: MlflowResource
    ) -> dg.MaterializeResult:
        """Data and prediction drift of the day's scored inputs against the champion's training set."""
        from mlops.drift import compute_drift, drift_columns, drift_config
        from mlops.model_loader import load_model

        store, day = lake.get(), context.partition_key
        preds, source = _predictions(store, spec, day)
        if preds.height == 0:
            raise dg.Failure(f"{name} {day}: no scored rows ({source}): nothing to compare")
        version = scored_version(preds)
        lineage = registry.lineage_from_tags(
            registry.version_tags(mlflow.tracking_uri, model_name, version)
        )
        ts_hash = lineage.get("training_set_hash")
        if not ts_hash:
            raise dg.Failure(f"{model_name} v{version} has no training_set_hash tag")
        reference = store.read(name, "training_set", ts_hash[:16])
        model = load_model(mlflow.tracking_uri, model_name, version=version)
        sample = reference.sample(
            min(reference.height, spec.monitoring.drift_sample_rows), seed=0, shuffle=False
        )
        sample = sample.with_columns(pl.Series("score", model.score(sample), dtype=pl.Float64))
        if source == "served":  # what the service actually saw and answered
            current = preds
        else:
            keys = [entity_column(spec), spec.source.timestamp_column]
            current = store.read(name, "features", day).join(
                preds.select(*keys, "score"), on=keys, how="inner"
            )
        cols = drift_columns(spec)
        result = compute_drift(
            sample,
            current,
            numeric=cols["numeric"],
            categorical=cols["categorical"],
            prediction_column="score",
            **drift_config(spec),
        )
        summary = {
            **result.summary(),
            "partition": day,
            "champion_version": version,
            "reference_training_set_hash": ts_hash,
            "threshold": spec.monitoring.drift_threshold,
            "source": source,
        }
        written = store.write(name, DRIFT_REPORT, result.columns, day)
        write_json(store, name, DRIFT_REPORT, day, summary)
        # Atomic like the table beside it: a failed write leaves the previous report whole.
        html = store.put_text(f"{name}/{DRIFT_REPORT}/{day}.html", result.html)
        drifted = result.columns.filter(pl.col("drifted"))["column"].to_list()
        pred = result.prediction or {}
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={
                "drift_share": result.drift_share,
                "dataset_drift": result.dataset_drift,
                "drift_threshold": spec.monitoring.drift_threshold,
                "drifted_columns": dg.MetadataValue.json(drifted),
                "prediction_drift_score": pred.get("score"),
                "prediction_drifted": pred.get("drifted"),
                "champion_version": version,
                "reference_training_set_hash": ts_hash,
                "scored_rows_source": source,
                "rows_compared": dg.MetadataValue.json(
                    {"reference": result.reference_rows, "current": result.current_rows}
                ),
                "columns": md_table(result.columns.sort("score", descending=True), 12),
                "report": dg.MetadataValue.path(html),
            },
        )

    @dg.asset(
        key=key(MODEL_PERFORMANCE),
        partitions_def=daily,
        deps=[key("batch_predictions"), key("inference_log"), key("labels"), key("features")],
        kinds={"parquet"},
        **common,
    )
    def model_performance(
        context: dg.AssetExecutionContext, lake: LakeResource
    ) -> dg.MaterializeResult:
        """Realized metrics of the day's predictions once labels mature, against the champion's evaluation."""
        store, day = lake.get(), context.partition_key
        preds, source = _predictions(store, spec, day)
        labels = store.read(name, "labels", day)
        version = scored_version(preds) if preds.height else None
        doc = promotion.load_evaluation(store, spec, version) if version else None
        block = (doc or {}).get("challenger") or {}
        from mlops.modeling import primary_metric

        metric = primary_metric(spec)
        perf = monitoring.realized_performance(
            spec,
            preds,
            labels,
            store.read(name, "features", day),
            baseline=block.get("metrics", {}).get(metric),
            threshold=block.get("threshold"),
            baseline_rows=(doc or {}).get("test_rows"),
        )
        if perf.rows_labelled == 0:
            raise dg.Failure(
                f"{name} {day}: none of the {perf.rows_scored} scored rows has a mature label "
                f"yet (labels mature {spec.labels.maturity} after the row). Re-run "
                f"{name}/labels for {day} once the label feed has arrived, then this asset."
            )
        summary = {
            **perf.summary(),
            "partition": day,
            "champion_version": version,
            "source": source,
        }
        table = pl.DataFrame(
            {"partition": [day], "model_version": [version], "rows_labelled": [perf.rows_labelled]}
        ).with_columns(*[pl.lit(v, dtype=pl.Float64).alias(k) for k, v in perf.metrics.items()])
        written = store.write(name, MODEL_PERFORMANCE, table, day)
        write_json(store, name, MODEL_PERFORMANCE, day, promotion.json_safe(summary))
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={
                "realized_" + perf.primary_metric: perf.realized,
                "baseline_" + perf.primary_metric: perf.baseline,
                "tolerance": perf.tolerance,
                "declined": perf.declined,
                "rows_scored": perf.rows_scored,
                "scored_rows_source": source,
                "rows_labelled": perf.rows_labelled,
                "model_versions": dg.MetadataValue.json(perf.model_versions),
                "metrics": dg.MetadataValue.json(perf.metrics),
                "slices": dg.MetadataValue.json(promotion.json_safe(perf.slices)),
            },
        )

    return [drift_report, model_performance]
