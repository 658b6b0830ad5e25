"""A second, independent implementation of the spec's features (polars rolling windows):
the test oracle for mlops.features, which computes them with numpy per entity."""

from __future__ import annotations

import datetime as dt

import polars as pl

from mlops.features import feature_names
from mlops.labels import entity_column, with_entity
from mlops.spec import Spec


def _aggregate(col: str, fn: str, window: str, ts: str) -> pl.Expr:
    c = pl.col(col)
    if fn == "mean":
        return c.rolling_mean_by(ts, window_size=window)
    if fn == "std":
        return c.rolling_std_by(ts, window_size=window)
    if fn == "min":
        return c.rolling_min_by(ts, window_size=window)
    if fn == "max":
        return c.rolling_max_by(ts, window_size=window)
    if fn == "sum":
        return c.fill_null(0).rolling_sum_by(ts, window_size=window)
    if fn == "count":
        return c.is_not_null().cast(pl.Int64).rolling_sum_by(ts, window_size=window)
    raise ValueError(f"unknown aggregate function {fn}")


def _transform(kind: str, col: str, other: str | None) -> pl.Expr:
    c = pl.col(col).cast(pl.Float64)
    if kind == "diff":
        return c - c.shift(1)
    if kind == "log1p":
        return pl.when(c > -1).then(c.log1p())
    o = pl.col(other).cast(pl.Float64)
    if kind == "ratio":
        return pl.when(o != 0).then(c / o)
    if kind == "product":
        return c * o
    raise ValueError(f"unknown transform {kind}")


def compute_features(
    spec: Spec, rows: pl.DataFrame, start: dt.datetime | None = None, end: dt.datetime | None = None
) -> pl.DataFrame:
    """Features for every row with start <= timestamp < end, from `rows` (which must hold
    the lookback before `start`). Output: entity, timestamp, feature columns."""
    ent, ts = entity_column(spec), spec.source.timestamp_column
    rows = with_entity(spec, rows).sort([ent, ts])
    exprs: list[pl.Expr] = [pl.col(c).cast(pl.Float64) for c in spec.features.passthrough]
    exprs += [pl.col(c).cast(pl.String) for c in spec.features.categorical]
    for agg in spec.features.aggregates:
        for w in agg.windows:
            for col in agg.columns:
                exprs += [
                    _aggregate(col, fn, w, ts).over(ent).cast(pl.Float64).alias(f"{col}_{fn}_{w}")
                    for fn in agg.functions
                ]
    exprs += [
        _transform(t.kind, t.column, t.other).over(ent).alias(t.name)
        for t in spec.features.transforms
    ]
    out = rows.select(ent, ts, *exprs)
    if start is not None:
        out = out.filter(pl.col(ts) >= start)
    if end is not None:
        out = out.filter(pl.col(ts) < end)
    return out.sort([ts, ent]).select(ent, ts, *feature_names(spec))
