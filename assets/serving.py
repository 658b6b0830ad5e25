"""The online service's side of one spec's graph: the request log, ingested by day.

The service (serving/, `mlops serve`) appends every request to JSON-lines files; this asset
reads one day of them (by the readings' event time) into the lake and compares the routes
(champion, canary, shadow) in its metadata. Logic in mlops.inference_log.
"""

from typing import TYPE_CHECKING

import dagster as dg

from assets.metadata import asset_attrs, column_schema, md_table
from catalog.partitions import daily_partitions
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

    return [inference_log]
