"""Point-in-time correct training sets: labels ASOF-joined to features in DuckDB.

Each label row (entity, cut-off t) takes the entity's latest feature row with timestamp
<= t, never a later one, so data recorded after a label's cut-off cannot leak into its
training row. The split is by day, in time order (train, then valid, then test).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import polars as pl

from mlops.features import feature_names
from mlops.labels import MATURE, entity_column
from mlops.lake import Lake
from mlops.spec import Spec

FEATURE_TIME = "feature_time"
SPLIT = "split"
SPLITS = ("train", "valid", "test")


class TrainingSetError(ValueError):
    pass


@dataclass
class TrainingWindow:
    days: list[str]  # partition keys of the label days in the window
    feature_partitions: list[str]  # the window plus the feature rows an ASOF may reach back to
    skipped_immature: list[str] = field(default_factory=list)


def choose_window(
    spec: Spec,
    label_days: list[str],
    feature_days: list[str],
    mature: dict[str, bool],
    end: str | None = None,
) -> TrainingWindow:
    """The last `training_window_days` days whose labels are mature and whose features exist."""
    have_features = set(feature_days)
    usable = [d for d in sorted(label_days) if d in have_features and (end is None or d <= end)]
    immature = [d for d in usable if not mature.get(d, False)]
    usable = [d for d in usable if mature.get(d, False)]
    if len(usable) < 3:
        raise TrainingSetError(
            f"{spec.name}: {len(usable)} day(s) with mature labels and features "
            f"({len(immature)} more whose labels are not mature yet); a time-ordered "
            "train/valid/test split needs at least 3. Materialize more days of labels and "
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


def build_training_set(spec: Spec, lake: Lake, window: TrainingWindow) -> pl.DataFrame:
    ent, ts, label = entity_column(spec), spec.source.timestamp_column, spec.labels.name
    feats = feature_names(spec)
    splits = split_days(spec, window.days)
    labels_sql = lake.relation_sql(spec.name, "labels", window.days)
    features_sql = lake.relation_sql(spec.name, "features", window.feature_partitions)
    q = _quote
    feature_cols = ", ".join(f"f.{q(c)}" for c in feats)
    cases = " ".join(f"WHEN '{d}' THEN '{s}'" for d, s in splits.items())
    sql = f"""
        SELECT l.{q(ent)}, l.{q(ts)}, {feature_cols}, f.{q(ts)} AS {FEATURE_TIME},
               l.{q(label)},
               CASE strftime(l.{q(ts)}, '%Y-%m-%d') {cases} END AS {SPLIT}
        FROM (SELECT * FROM {labels_sql} WHERE {MATURE}) AS l
        ASOF LEFT JOIN {features_sql} AS f
          ON l.{q(ent)} = f.{q(ent)} AND f.{q(ts)} <= l.{q(ts)}
        ORDER BY l.{q(ts)}, l.{q(ent)}
    """
    df = lake.query(sql)
    missing = df.filter(pl.col(FEATURE_TIME).is_null()).height
    if missing:
        # A label with no feature row at or before it: keep it out rather than train on nulls.
        df = df.filter(pl.col(FEATURE_TIME).is_not_null())
    return df


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


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
