"""Point-in-time correct retrieval and training sets: an ASOF join of (entity, time) rows to
the features in the lake (polars' sorted merge; DuckDB reads label maturity).

Each label row (entity, cut-off t) takes the entity's latest feature row with timestamp
<= t, never a later one, so data recorded after a label's cut-off cannot leak into its
training row. The split is by day, in time order (train, then valid, then test).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlops.features import FEATURE_TIME, historical_features
from mlops.labels import MATURE, entity_column
from mlops.lake import Lake, sha256_bytes
from mlops.spec import Spec

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

SPLIT = "split"
SPLITS = ("train", "valid", "test")
SAMPLE_WEIGHT = "sample_weight"  # optional: per-row training weight (after a change)


class TrainingSetError(ValueError):
    pass


@dataclass
class TrainingWindow:
    days: list[str]  # partition keys of the label days in the window
    feature_partitions: list[str]  # the window plus the feature rows an ASOF may reach back to
    skipped_immature: list[str] = field(default_factory=list)
    policy: dict = field(default_factory=lambda: {"mode": SPEC_WINDOW})


SPEC_WINDOW, FROM_CHANGE, WEIGHTED = "spec_window", "from_change_point", "weighted"


def choose_window(
    spec: Spec,
    label_days: list[str],
    feature_days: list[str],
    mature: dict[str, bool],
    end: str | None = None,
    since: str | None = None,
    min_days: int = 3,
) -> TrainingWindow:
    """The last `training_window_days` days whose labels are mature and whose features
    exist (`since`: only days from then on)."""
    have_features = set(feature_days)
    usable = [d for d in sorted(label_days) if d in have_features and (end is None or d <= end)]
    immature = [d for d in usable if not mature.get(d, False)]
    usable = [d for d in usable if mature.get(d, False) and (since is None or d >= since)]
    if len(usable) < min_days:
        raise TrainingSetError(
            f"{spec.name}: {len(usable)} day(s) with mature labels and features "
            f"({len(immature)} more whose labels are not mature yet); a time-ordered "
            f"train/valid/test split needs at least {min_days}. Materialize more days of labels and "
            "features, or wait for labels to mature."
        )
    days = usable[-spec.model.training_window_days :]
    first = dt.date.fromisoformat(days[0])
    reach = first - dt.timedelta(days=spec.features.lookback_days + 1)
    feature_parts = sorted(d for d in have_features if reach.isoformat() <= d <= days[-1])
    return TrainingWindow(days, feature_parts, [d for d in immature if d > days[-1]])


def split_days(spec: Spec, days: list[str]) -> dict[str, str]:
    """Day -> split, time-ordered, at least one day in each split."""
    n = len(days)
    n_train = max(1, round(n * spec.model.split[0]))
    n_valid = max(1, round(n * spec.model.split[1]))
    n_train = min(n_train, n - 2)
    n_valid = min(n_valid, n - n_train - 1)
    out = {}
    for i, d in enumerate(days):
        out[d] = "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
    return out


def labelled_points(spec: Spec, lake: Lake, window: TrainingWindow) -> pl.DataFrame:
    """The window's mature label rows (entity, cut-off time, label) with their split by day:
    the points a training set asks `historical_features` for (a notebook asks the same)."""
    ent, ts, label = entity_column(spec), spec.source.timestamp_column, spec.labels.name
    splits = split_days(spec, window.days)
    labels = lake.read_many(spec.name, "labels", window.days).filter(pl.col(MATURE))
    return labels.select(ent, ts, label).with_columns(
        pl.col(ts).dt.strftime("%Y-%m-%d").replace_strict(splits).alias(SPLIT)
    )


def build_training_set(spec: Spec, lake: Lake, window: TrainingWindow) -> pl.DataFrame:
    """Mature labels of the window with their point-in-time features, split by day."""
    ent, ts = entity_column(spec), spec.source.timestamp_column
    points = labelled_points(spec, lake, window)
    df = historical_features(spec, lake, points, window.feature_partitions).sort([ts, ent])
    # A label with no feature row at or before it: keep it out rather than train on nulls.
    df = df.filter(pl.col(FEATURE_TIME).is_not_null())
    if len(window.days) < 3:  # too few days to split by day: split the rows in time order
        df = df.with_columns(pl.Series(SPLIT, split_rows(spec, df.height), dtype=pl.String))
    return df


def split_rows(spec: Spec, n: int) -> list[str]:
    """Row -> split for `n` time-ordered rows, by the spec's fractions (each split >= 1)."""
    n_train = min(max(1, round(n * spec.model.split[0])), max(n - 2, 0))
    n_valid = min(max(1, round(n * spec.model.split[1])), max(n - n_train - 1, 0))
    return ["train"] * n_train + ["valid"] * n_valid + ["test"] * (n - n_train - n_valid)


def assemble(
    spec: Spec,
    lake: Lake,
    label_days: list[str],
    feature_days: list[str],
    mature: dict[str, bool],
    end: str | None = None,
    change_point: str | None = None,
) -> tuple[TrainingWindow, pl.DataFrame]:
    """The training set of a training run: the spec window, or after a detected change
    (`change_point`: the episode's first breached day) the rows from the change point on,
    once there are `monitoring.recovery_min_rows` of them with both classes in every split;
    until then the spec window with the post-change rows weighted up to half the weight, so
    a challenger leans to the new regime as soon as it has any of it."""
    window = choose_window(spec, label_days, feature_days, mature, end)
    if change_point is None:
        return window, build_training_set(spec, lake, window)
    policy: dict = {"change_point": change_point}
    try:
        post = choose_window(spec, label_days, feature_days, mature, end, change_point, 1)
        post_df = build_training_set(spec, lake, post)
        problem = _too_small(spec, post_df)
    except TrainingSetError as e:
        post_df, problem = None, str(e)
    if post_df is not None and problem is None:
        post.policy = {**policy, "mode": FROM_CHANGE, "rows_after_change": post_df.height}
        return post, post_df
    df = build_training_set(spec, lake, window)
    ts = spec.source.timestamp_column
    after = pl.col(ts).dt.strftime("%Y-%m-%d") >= change_point
    n_post = df.filter(after).height
    weight = max(1.0, (df.height - n_post) / n_post) if n_post else 1.0
    df = df.with_columns(
        pl.when(after).then(pl.lit(weight)).otherwise(pl.lit(1.0)).alias(SAMPLE_WEIGHT)
    )
    window.policy = {
        **policy,
        "mode": WEIGHTED,
        "rows_after_change": n_post,
        "post_change_weight": round(weight, 3),
        "why_not_from_change_point": problem,
    }
    return window, df


def _too_small(spec: Spec, df: pl.DataFrame) -> str | None:
    """Why rows after a change cannot train and judge a model alone (None: they can)."""
    need = spec.monitoring.recovery_min_rows
    if df.height < need:
        return f"{df.height} labelled rows after the change point, fewer than {need}"
    if spec.model.task == "binary_classification":
        per_class = max(5, need // 10)
        label = spec.labels.name
        for s in SPLITS:
            counts = df.filter(pl.col(SPLIT) == s)[label].cast(pl.Int64).value_counts()
            got = dict(counts.iter_rows())
            low = min(got.get(0, 0), got.get(1, 0))
            if low < (per_class if s == "train" else 1):
                return f"the {s} split after the change point has {low} row(s) of a class"
    return None


def summarize(spec: Spec, df: pl.DataFrame) -> dict[str, dict[str, float]]:
    label = spec.labels.name
    out = {}
    for s in SPLITS:
        part = df.filter(pl.col(SPLIT) == s)
        out[s] = {
            "rows": part.height,
            "label_mean": float(part[label].cast(pl.Float64).mean() or 0.0) if part.height else 0.0,
        }
    return out


def label_maturity(spec: Spec, lake: Lake, days: list[str]) -> dict[str, bool]:
    """Day -> whether every label row of that day is mature (reads one column)."""
    if not days:
        return {}
    sql = (
        f"SELECT filename, bool_and({MATURE}) AS mature "
        f"FROM {lake.relation_sql(spec.name, 'labels', days)[:-1]}, filename = true) "
        "GROUP BY filename"
    )
    by_file = dict(lake.query(sql).iter_rows())
    return {d: bool(by_file.get(lake.url(spec.name, "labels", d), False)) for d in days}


@dataclass(frozen=True)
class SavedTrainingSet:
    written: Any  # the lake's write of the current set (mlops.lake.Written)
    versioned_url: str  # the copy named by its hash, which models record and retrain from
    input_versions: dict[str, dict[str, str]]  # asset -> partition -> content hash
    input_digest: str  # one hash over input_versions


def save(spec: Spec, lake: Lake, window: TrainingWindow, df: pl.DataFrame) -> SavedTrainingSet:
    """The set as `training_set` and as a copy named by its hash: a model can always be traced
    (and retrained) from its exact set, whatever the current one becomes. Records the content
    hash of every input partition, for lineage."""
    written = lake.write(spec.name, "training_set", df)
    version = written.content_hash[:16]
    lake.write(spec.name, "training_set", df, partition=version)
    inputs = {
        a: {d: lake.content_hash(spec.name, a, d) for d in parts}
        for a, parts in (("labels", window.days), ("features", window.feature_partitions))
    }
    digest = sha256_bytes(repr(sorted(inputs.items())).encode())
    return SavedTrainingSet(written, lake.url(spec.name, "training_set", version), inputs, digest)
