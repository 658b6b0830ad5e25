"""The data half of one spec's asset graph: landing files -> training set.

Thin wiring: each asset reads from the lake, calls mlops/, writes one partition and
returns metadata. Keys are prefixed with the spec name (e.g. machine_failure/features).
"""

import datetime as dt
from typing import TYPE_CHECKING

import dagster as dg

from assets.metadata import asset_attrs, column_schema, md_table, rounded
from catalog.partitions import daily_partitions, lookback_mapping
from catalog.pools import online_store_pool
from mlops import features as feats
from mlops import ingest, labels, online, sources, sql_source, training_set, validation
from mlops.dates import day_bounds
from mlops.monitoring import TAG_CHANGE_POINT
from mlops.spec import ASSET_NAMES, FileSource, Spec
from resources.lake import LakeResource
from resources.online_store import OnlineStoreResource

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

EXTERNAL_ASSET_NAMES = ("landing_files", "label_events")
ROWS_RECONCILE_CHECK = "rows_reconcile_check"
QUARANTINE_RATE_CHECK = "quarantine_rate_check"


class TrainingSetConfig(dg.Config):
    """Pin the training window's last day (YYYY-MM-DD; default: the latest mature day), or
    train from a change point (default: the triggering run's `mlops/change_point` tag)."""

    end_date: str | None = None
    change_point: str | None = None


def _day(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> dt.date:
    return dt.date.fromisoformat(context.partition_key)


def build_data_assets(
    spec: Spec,
) -> list[dg.AssetSpec | dg.AssetsDefinition | dg.AssetChecksDefinition]:
    name = spec.name
    daily = daily_partitions(spec)
    version = spec.content_hash[:12]
    key = {a: dg.AssetKey([name, a]) for a in (*ASSET_NAMES, *EXTERNAL_ASSET_NAMES)}
    common = {"group_name": name, "code_version": version}

    def attrs(asset: str) -> dict:
        return {**common, **asset_attrs(spec, asset)}

    # The source as an external asset: the UI's lineage starts at the files (or the SQL
    # table; the key stays landing_files for both kinds so selections and sensors agree).
    src = spec.source
    if isinstance(src, FileSource):
        landing = dg.AssetSpec(
            key["landing_files"],
            group_name=name,
            **asset_attrs(spec, "landing_files"),
            description=f"Landing files {src.file_pattern} in {src.path} (external).",
            metadata={"path": dg.MetadataValue.path(str(spec.landing_dir))},
        )
    else:
        landing = dg.AssetSpec(
            key["landing_files"],
            group_name=name,
            **asset_attrs(spec, "landing_files"),
            description="The source table: rows a SQL query returns per day (external).",
            kinds={"sql"},
            metadata={
                "source": sql_source.describe(src),
                "query": dg.MetadataValue.md(f"```sql\n{src.query.strip()}\n```"),
            },
        )
    externals = [landing]
    label_deps = [key["validated_data"]]
    if spec.labels.events is not None:
        events = spec.labels.events
        externals.append(
            dg.AssetSpec(
                key["label_events"],
                group_name=name,
                **asset_attrs(spec, "label_events"),
                description=f"Late-arriving label events {events.file_pattern} in {events.path} (external).",
                metadata={"path": dg.MetadataValue.path(str(spec.resolve(events.path)))},
            )
        )
        label_deps.append(key["label_events"])
    if spec.labels.uses_feedback:
        label_deps.append(dg.AssetKey([name, "label_feedback"]))

    @dg.asset(
        key=key["raw_data"],
        partitions_def=daily,
        kinds={"parquet"},
        deps=[key["landing_files"]],
        **attrs("raw_data"),
    )
    def raw_data(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
        """The day's source rows as they arrived (all values kept as text)."""
        try:
            batch = sources.load_partition(spec, _day(context))
        except (sources.NoRowsForDay, sql_source.SqlSourceError) as e:
            raise dg.Failure(str(e)) from None
        written = lake.get().write(name, "raw_data", batch.frame, context.partition_key)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(batch.content_hash),
            metadata={
                "rows": written.rows,
                "source_files": dg.MetadataValue.json(batch.file_rows),
                "content_hash": batch.content_hash,
                "path": dg.MetadataValue.path(written.path),
                **column_schema(batch.frame),
            },
        )

    @dg.multi_asset(
        specs=[
            dg.AssetSpec(
                key["validated_data"],
                deps=[key["raw_data"]],
                kinds={"parquet"},
                description="Rows that passed the spec's schema, typed.",
                **attrs("validated_data"),
            ),
            dg.AssetSpec(
                key["quarantine"],
                deps=[key["raw_data"]],
                kinds={"parquet"},
                description="Rejected rows with column, check, value, file and row.",
                **attrs("quarantine"),
            ),
        ],
        partitions_def=daily,
        name=f"{name}__validate",
    )
    def validate(context: dg.AssetExecutionContext, lake: LakeResource):
        """Split the day's raw rows into valid rows and quarantine (pandera, from the spec)."""
        store, part = lake.get(), context.partition_key
        # The raw partition a column at a time, never whole (see validation.validate).
        raw = validation.RawColumns(
            store.columns(name, "raw_data", part),
            lambda c: store.read(name, "raw_data", part, [c])[c],
        )
        try:
            result = validation.validate(spec, raw, _day(context))
        except validation.SchemaMismatchError as e:
            raise dg.Failure(str(e)) from None
        valid_w = store.write(name, "validated_data", result.valid, part)
        quar_w = store.write(name, "quarantine", result.quarantine, part)
        yield from _validation_results(key, result, valid_w, quar_w)

    @dg.asset_check(
        asset=key["validated_data"],
        name=ROWS_RECONCILE_CHECK,
        blocking=True,
        partitions_def=daily,
        additional_deps=[key["quarantine"], key["raw_data"]],
    )
    def rows_reconcile_check(
        context: dg.AssetCheckExecutionContext, lake: LakeResource
    ) -> dg.AssetCheckResult:
        """Every raw row is either valid or quarantined, exactly once."""
        store, part = lake.get(), context.partition_key
        # Only the identity columns: a large day's whole raw partition is 3x its file.
        ident = [ingest.SOURCE_FILE, ingest.ROW_NUMBER]
        r = validation.reconcile(
            *(
                store.read(name, a, part, ident)
                for a in ("raw_data", "validated_data", "quarantine")
            )
        )
        return dg.AssetCheckResult(
            passed=r.ok,
            metadata={
                "rows_in": r.rows_in,
                "rows_valid": r.rows_valid,
                "rows_quarantined": r.rows_quarantined,
                "in_both": r.in_both,
                "lost": r.lost,
                "unknown": r.unknown,
            },
        )

    @dg.asset_check(
        asset=key["validated_data"],
        name=QUARANTINE_RATE_CHECK,
        blocking=True,
        partitions_def=daily,
        additional_deps=[key["quarantine"]],
    )
    def quarantine_rate_check(
        context: dg.AssetCheckExecutionContext, lake: LakeResource
    ) -> dg.AssetCheckResult:
        """Quarantined share of the day's rows stays under the spec's max_quarantine_rate."""
        store = lake.get()
        one = [ingest.ROW_NUMBER]  # a column is enough to count the rows
        n_valid = store.read(name, "validated_data", context.partition_key, one).height
        n_quar = store.read(name, "quarantine", context.partition_key, one).height
        rate = validation.quarantine_rate(n_valid, n_quar)
        limit = spec.schema_.max_quarantine_rate
        return dg.AssetCheckResult(
            passed=rate <= limit,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if rate <= limit
            else (
                f"{rate:.2%} of rows quarantined, above schema.max_quarantine_rate {limit:.2%}: "
                f"inspect {name}/quarantine for {context.partition_key}"
            ),
            metadata={"quarantine_rate": rounded(rate), "threshold": limit},
        )

    @dg.asset(
        key=key["labels"],
        partitions_def=daily,
        deps=label_deps,
        kinds={"parquet"},
        **attrs("labels"),
    )
    def labels_asset(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
        """Label per prediction point (a column, an event within the horizon, or field feedback), with maturity."""
        store = lake.get()
        part = context.partition_key
        # Feedback alone labels readings that only the online service saw.
        valid = (
            store.read(name, "validated_data", part)
            if spec.labels.kind != "feedback" or store.exists(name, "validated_data", part)
            else pl.DataFrame()
        )
        built = store.partitions(name, "validated_data")
        through = dt.date.fromisoformat(built[-1]) if built else None
        fed = (
            store.read(name, "label_feedback", part)
            if spec.labels.uses_feedback and store.exists(name, "label_feedback", part)
            else None
        )
        rows, info = labels.build_labels(
            spec, valid, _day(context), data_through=through, feedback=fed
        )
        written = store.write(name, "labels", rows, context.partition_key)
        mature = int(rows[labels.MATURE].sum()) if rows.height else 0
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={
                "rows": rows.height,
                "rows_mature": mature,
                "mature": rows.height > 0 and mature == rows.height,
                "positive_rate": rounded(rows[spec.labels.name].cast(pl.Float64).mean() or 0.0),
                "label_source": dg.MetadataValue.json(info),
                "path": dg.MetadataValue.path(written.path),
                **column_schema(rows),
            },
        )

    @dg.asset(
        key=key["features"],
        partitions_def=daily,
        kinds={"parquet"},
        deps=[dg.AssetDep(key["validated_data"], partition_mapping=lookback_mapping(spec))],
        **attrs("features"),
    )
    def features_asset(
        context: dg.AssetExecutionContext, lake: LakeResource
    ) -> dg.MaterializeResult:
        """Per-entity rolling-window features for the day, from its lookback window."""
        store, day = lake.get(), _day(context)
        plan = feats.plan_lookback(spec, lambda d: store.exists(name, "validated_data", d), day)
        if plan.unbuilt:
            raise dg.Failure(
                f"features for {day} need validated_data for {plan.unbuilt}: materialize "
                f"{name}/validated_data for those days first"
            )
        if plan.gaps:
            context.log.warning(f"{day}: no data for lookback day(s) {plan.gaps}; computed without")
        rows = store.read_many(name, "validated_data", plan.read)
        out = feats.compute_features(spec, rows, *day_bounds(day))
        written = store.write(name, "features", out, context.partition_key)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(written.content_hash),
            metadata={
                "rows": out.height,
                "features": len(feats.feature_names(spec)),
                "lookback_partitions": dg.MetadataValue.json(plan.read),
                "lookback_gaps": dg.MetadataValue.json(plan.gaps),
                "preview": md_table(out, 5, cols=12),
                "path": dg.MetadataValue.path(written.path),
                **column_schema(out),
            },
        )

    @dg.asset(
        key=key["online_features"],
        partitions_def=daily,
        deps=[
            key["features"],
            dg.AssetDep(key["validated_data"], partition_mapping=lookback_mapping(spec)),
        ],
        kinds={"sqlite", "redis"},
        pool=online_store_pool(spec),
        **attrs("online_features"),
    )
    def online_features(
        context: dg.AssetExecutionContext, lake: LakeResource, online_store: OnlineStoreResource
    ) -> dg.MaterializeResult:
        """Each entity's state as of the day's end in the online store (never moved back)."""
        store, day = lake.get(), _day(context)
        parts = [d.isoformat() for d in feats.lookback_days(spec, day)]
        rows = store.read_many(
            name, "validated_data", [p for p in parts if store.exists(name, "validated_data", p)]
        )
        target = online_store.get()
        try:
            done = online.refresh_states(spec, target, rows)
            stats = target.stats(name)
        finally:
            target.close()
        return dg.MaterializeResult(
            metadata={
                "entities_written": done.entities_written,
                "entities_skipped_newer_in_store": done.entities_skipped,
                "rows_written": done.rows_written,
                "store_entities": stats.entities,
                "store_bytes": stats.bytes,
                "oldest_as_of": str(stats.oldest_as_of),
                "store": online_store.url.split("@")[-1],
            }
        )

    @dg.asset(
        key=key["training_set"],
        deps=[key["features"], key["labels"]],
        kinds={"parquet", "duckdb"},
        **attrs("training_set"),
    )
    def training_set_asset(
        context: dg.AssetExecutionContext, config: TrainingSetConfig, lake: LakeResource
    ) -> dg.MaterializeResult:
        """Point-in-time correct features + mature labels over the window, split by time."""
        store = lake.get()
        label_days = store.partitions(name, "labels")
        # A retraining after a detected change trains from its change point (run tag).
        change_point = config.change_point or context.run.tags.get(TAG_CHANGE_POINT) or None
        try:
            window, df = training_set.assemble(
                spec,
                store,
                label_days,
                store.partitions(name, "features"),
                training_set.label_maturity(spec, store, label_days),
                end=config.end_date,
                change_point=change_point,
            )
        except training_set.TrainingSetError as e:
            raise dg.Failure(str(e)) from None
        saved = training_set.save(spec, store, window, df)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(saved.written.content_hash),
            metadata=_training_set_metadata(spec, df, window, saved),
        )

    return [
        *externals,
        raw_data,
        validate,
        rows_reconcile_check,
        quarantine_rate_check,
        labels_asset,
        features_asset,
        online_features,
        training_set_asset,
    ]


def _validation_results(key: dict, result, valid_w, quar_w):
    """validate's two materializations (result: mlops.validation.ValidationResult)."""
    yield dg.MaterializeResult(
        asset_key=key["validated_data"],
        data_version=dg.DataVersion(valid_w.content_hash),
        metadata={
            "rows_in": result.rows_in,
            "rows_valid": result.rows_valid,
            "rows_quarantined": result.rows_quarantined,
            "dagster/row_count": result.rows_valid,
            "path": dg.MetadataValue.path(valid_w.path),
            **column_schema(result.valid),
        },
    )
    preview = result.quarantine.select(
        ingest.SOURCE_FILE, ingest.ROW_NUMBER, "column", "check", "value"
    )
    yield dg.MaterializeResult(
        asset_key=key["quarantine"],
        data_version=dg.DataVersion(quar_w.content_hash),
        metadata={
            "rows_quarantined": result.rows_quarantined,
            "quarantine_rate": rounded(
                validation.quarantine_rate(result.rows_valid, result.rows_quarantined)
            ),
            "reasons": dg.MetadataValue.json(result.reasons()),
            "preview": md_table(preview, 5),
            "path": dg.MetadataValue.path(quar_w.path),
            **column_schema(result.quarantine),
        },
    )


def _training_set_metadata(spec: Spec, df, window, saved) -> dict:
    """training_set's page: size, window and splits, and what a model will record of it."""
    return {
        "rows": df.height,
        "training_set_hash": saved.written.content_hash,
        "window": dg.MetadataValue.json(window.days),
        "splits": dg.MetadataValue.json(training_set.summarize(spec, df)),
        "input_data_versions": dg.MetadataValue.json(saved.input_versions),
        "input_data_version_digest": saved.input_digest,
        "skipped_immature_days": dg.MetadataValue.json(window.skipped_immature),
        "window_policy": dg.MetadataValue.json(window.policy),
        "path": dg.MetadataValue.path(saved.written.path),
        "versioned_path": dg.MetadataValue.path(saved.versioned_url),
        **column_schema(df),
    }
