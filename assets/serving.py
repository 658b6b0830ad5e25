"""The online service's side of one spec's graph: the request log, ingested by day.

The service (serving/, `mlops serve`) appends every request to JSON-lines files; this asset
reads one day of them (by the readings' event time) into the lake and compares the routes
(champion, canary, shadow) in its metadata. Logic in mlops.inference_log.
"""

from typing import TYPE_CHECKING

import dagster as dg

from assets.metadata import asset_attrs, column_schema, md_table, rounded
from catalog.partitions import daily_partitions
from mlops import feedback
from mlops.inference_log import compare_routes, inference_log_dir, read_day
from mlops.spec import Spec
from resources.lake import LakeResource

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl


def build_serving_assets(spec: Spec) -> list[dg.AssetsDefinition]:
    name = spec.name

    @dg.asset(
        key=dg.AssetKey([name, "inference_log"]),
        partitions_def=daily_partitions(spec),
        deps=[dg.AssetKey([name, "champion_model"])],
        kinds={"parquet"},
        group_name=name,
        code_version=spec.content_hash[:12],
        **asset_attrs(spec, "inference_log"),
    )
    def inference_log(
        context: dg.AssetExecutionContext, lake: LakeResource
    ) -> dg.MaterializeResult:
        """The online service's requests and answers for the day, with a route comparison."""
        folder = inference_log_dir(name)
        log = read_day(folder, context.partition_key)
        written = lake.get().write(name, "inference_log", log, context.partition_key)
        routes = compare_routes(log)
        served = log.filter(pl.col("route") != "shadow")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={
                "rows": log.height,
                "requests": served["request_id"].n_unique(),
                "model_versions": dg.MetadataValue.json(
                    sorted(log["model_version"].drop_nulls().unique().to_list())
                ),
                "fallbacks": served.filter(pl.col("fallback").is_not_null()).height,
                "route_comparison": md_table(routes),
                "routes": dg.MetadataValue.json(routes.to_dicts()),
                "log_dir": dg.MetadataValue.path(str(folder)),
                "path": dg.MetadataValue.path(written.path),
                **column_schema(log),
                "preview": md_table(
                    log.select(
                        "event_time", "entity", "route", "model_version", "score", "decision"
                    ),
                    5,
                ),
            },
        )

    if not spec.labels.uses_feedback:
        return [inference_log]

    @dg.asset(
        key=dg.AssetKey([name, "label_feedback"]),
        partitions_def=daily_partitions(spec),
        deps=[dg.AssetKey([name, "inference_log"])],
        kinds={"parquet"},
        group_name=name,
        code_version=spec.content_hash[:12],
        **asset_attrs(spec, "label_feedback"),
    )
    def label_feedback(
        context: dg.AssetExecutionContext, lake: LakeResource
    ) -> dg.MaterializeResult:
        """Field feedback on the day's readings (newest per reading), and what could not be used."""
        folder = feedback.feedback_dir(name)
        got = feedback.ingest_day(spec, folder, context.partition_key)
        store = lake.get()
        written = store.write(name, "label_feedback", got.accepted, context.partition_key)
        rejected = store.write(name, "label_feedback_rejected", got.rejected, context.partition_key)
        if got.rejected.height:
            context.log.warning(
                f"{got.rejected.height} feedback line(s) received {context.partition_key} "
                f"cannot be used; kept with their reason in {rejected.path}"
            )
        acc = got.accepted
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={
                "rows": acc.height,
                "feedback_lines": got.lines,
                "superseded": got.superseded,
                "rejected": got.rejected.height,
                "unreadable_lines": got.unreadable,
                "positive_rate": rounded(acc["label"].mean()) if acc.height else None,
                "by_source": dg.MetadataValue.json(
                    dict(acc.group_by("source").len().sort("source").iter_rows())
                ),
                "files": dg.MetadataValue.json(got.files),
                "log_dir": dg.MetadataValue.path(str(folder)),
                "path": dg.MetadataValue.path(written.path),
                "rejected_path": dg.MetadataValue.path(rejected.path),
                **column_schema(acc),
                "preview": md_table(
                    acc.select("event_time", "entity", "label", "source", "score"), 5
                ),
                "rejected_preview": md_table(got.rejected.select("request_id", "reason"), 5),
            },
        )

    return [inference_log, label_feedback]
