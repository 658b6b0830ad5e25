"""Online features: the newest reading of an entity over its stored state, through the same
kernel as the offline path (mlops.features.entity_features), with a fallback policy.

The store holds, per entity, the valid rows the features of the next reading can need: rows
within the longest window before the newest one, plus the newest row (for diffs). Serving a
reading appends it to the state, so the next request sees it at once.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlops import features as feats
from mlops.labels import entity_column, with_entity
from mlops.online_store import EntityState, OnlineStore
from mlops.spec import Spec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import polars as pl

TS = "ts"  # the timestamp's key inside stored rows


# Why a reading is scored without its entity's state (a metric label and an error code each).
UNKNOWN_ENTITY, STALE_STATE, OUT_OF_ORDER = "unknown_entity", "stale_state", "out_of_order"
FALLBACK_CODES = (UNKNOWN_ENTITY, STALE_STATE, OUT_OF_ORDER)


class FeatureRejected(ValueError):
    """The fallback policy is `reject` and the entity has no usable state; `code` is one of
    FALLBACK_CODES."""

    def __init__(self, entity: str, reason: str, code: str = UNKNOWN_ENTITY):
        self.entity, self.reason, self.code = entity, reason, code
        super().__init__(f"entity {entity!r}: {reason}")


@dataclass
class OnlineResult:
    entity: str
    features: dict[str, Any]
    as_of: dt.datetime | None  # the state's newest row before this reading
    fallback: str | None = None  # why the state was not used, when it was not
    fallback_code: str | None = None  # ... as one of FALLBACK_CODES


def retention(spec: Spec) -> dt.timedelta:
    """How far behind the newest row the state must reach."""
    return feats.max_window(spec)


def staleness_limit(spec: Spec) -> dt.timedelta:
    """A state older than this (before the reading) no longer counts as history."""
    return max(dt.timedelta(days=max(spec.features.lookback_days, 1)), feats.max_window(spec))


def state_row(spec: Spec, reading: dict[str, Any]) -> dict[str, Any]:
    """A validated reading -> the stored row: its timestamp and the feature inputs."""
    ts_col = spec.source.timestamp_column
    ts = reading[ts_col]
    if isinstance(ts, str):
        ts = dt.datetime.fromisoformat(ts)
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
    row = {TS: ts}
    for c in feats.state_columns(spec):
        v = reading.get(c)
        row[c] = None if v is None or (isinstance(v, float) and np.isnan(v)) else v
    return row


def vector(spec: Spec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Features of the last of `rows` (sorted by time) through the one feature kernel."""
    ts = np.array([_epoch_us(r[TS]) for r in rows], dtype="int64")
    num = {
        c: np.array([np.nan if r.get(c) is None else float(r[c]) for r in rows], dtype="float64")
        for c in feats.state_columns(spec)
        if c not in spec.features.categorical
    }
    cat = {c: np.array([r.get(c) for r in rows], dtype=object) for c in spec.features.categorical}
    out = feats.entity_features(spec, ts, num, cat, np.array([len(rows) - 1]))
    return {n: _scalar(out[n][0]) for n in feats.feature_names(spec)}


def _minus(t: dt.datetime, delta: dt.timedelta) -> dt.datetime:
    """t - delta, or the earliest datetime when that is before year 1."""
    try:
        return t - delta
    except OverflowError:
        return dt.datetime.min


def _epoch_us(t: dt.datetime) -> int:
    return (t - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)


def _scalar(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if np.isnan(v) else float(v)
    return v


class OnlineFeatures:
    """get(entity, reading) -> features, appending the reading to the entity's state."""

    def __init__(self, spec: Spec, store: OnlineStore, fallback: str | None = None):
        self.spec, self.store = spec, store
        self.fallback = fallback or spec.features.online_fallback
        self.counts: Counter[str] = Counter()

    def get(self, entity: str, reading: dict[str, Any], append: bool = True) -> OnlineResult:
        return self._serve(entity, reading, self.store.get_state(self.spec.name, entity), append)

    def get_many(
        self, readings: list[tuple[str, dict[str, Any]]], append: bool = True
    ) -> list[OnlineResult | FeatureRejected]:
        """A batch: every entity's state in one store round trip; a rejection per item."""
        states = self.store.get_states(self.spec.name, sorted({e for e, _ in readings}))
        out: list[OnlineResult | FeatureRejected] = []
        for entity, reading in readings:
            try:
                out.append(self._serve(entity, reading, states.get(entity), append))
            except FeatureRejected as e:
                out.append(e)
        return out

    def _serve(
        self, entity: str, reading: dict[str, Any], state: EntityState | None, append: bool
    ) -> OnlineResult:
        row = state_row(self.spec, reading)
        why = code = None
        window = retention(self.spec)
        if state is None or not state.rows:
            code, why = UNKNOWN_ENTITY, "unknown entity: no state in the online store"
        elif row[TS] - state.as_of > staleness_limit(self.spec):
            code = STALE_STATE
            why = (
                f"stale state: newest row {state.as_of:%Y-%m-%d %H:%M} is more than "
                f"{staleness_limit(self.spec)} before the reading"
            )
        elif row[TS] < _minus(state.as_of, window):
            # Out of order beyond the feature window: the rows its windows need were trimmed
            # when newer readings came, so its features would silently lack its history.
            code = OUT_OF_ORDER
            why = (
                f"out of order: the reading at {row[TS]:%Y-%m-%d %H:%M} is more than the "
                f"feature window ({window}) before the entity's newest row "
                f"{state.as_of:%Y-%m-%d %H:%M}; its history is no longer in the store"
            )
        if why is not None:
            self.counts[f"fallback_{code}"] += 1
            if self.fallback == "reject":
                self.counts["rejected"] += 1
                raise FeatureRejected(entity, why + " (features.online_fallback: reject)", code)
            history: list[dict[str, Any]] = []
        else:
            history = [r for r in state.rows if r[TS] < row[TS]]
        values = vector(self.spec, [*history, row])
        self.counts["served"] += 1
        if append and code != OUT_OF_ORDER:  # a row that old would not count for any reading
            self.store.append_row(
                self.spec.name,
                entity,
                row,
                keep_from=_minus(row[TS], window),
                keep_last=1,
                want_state=False,
            )
        return OnlineResult(
            entity, values, state.as_of if state else None, fallback=why, fallback_code=code
        )


def states_from_rows(spec: Spec, rows: pl.DataFrame) -> list[EntityState]:
    """Each entity's state from its valid rows: what the next reading's features need (the
    rows within the longest window before its newest row, and the row before those)."""
    ent, ts_col = entity_column(spec), spec.source.timestamp_column
    rows = with_entity(spec, rows).sort([ent, ts_col])
    newest = pl.col(ts_col).max().over(ent)
    recent = pl.col(ts_col) >= newest - retention(spec)
    # The newest row before the window: diffs of the next reading need it.
    before = (~recent) & (pl.col(ts_col) == pl.col(ts_col).filter(~recent).max().over(ent))
    kept = rows.filter(recent | before).select(
        ent, pl.col(ts_col).alias(TS), *feats.state_columns(spec)
    )
    out: list[EntityState] = []
    ids = kept[ent].to_list()
    records = kept.drop(ent).to_dicts()
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            chunk = records[start:i]
            out.append(EntityState(entity=str(ids[start]), as_of=chunk[-1][TS], rows=chunk))
            start = i
    return out


_SERVICES: dict[tuple[str, str], OnlineFeatures] = {}


def get_online_features(
    spec: Spec, entity: str, reading: dict[str, Any], store_url: str | None = None
) -> OnlineResult:
    """The feature vector of a new reading (appended to the entity's state), through the
    store at `store_url` (default: MLOPS_ONLINE_STORE_URL). Raises FeatureRejected when
    the spec's fallback policy is `reject` and the entity has no usable state."""
    from mlops.config import online_store_url
    from mlops.online_store import make_store

    url = store_url or online_store_url()
    key = (spec.content_hash, url)
    if key not in _SERVICES:  # one store connection per process and spec
        _SERVICES[key] = OnlineFeatures(spec, make_store(url))
    return _SERVICES[key].get(entity, reading)


@dataclass(frozen=True)
class StateRefresh:
    entities_written: int
    entities_skipped: int  # the store already held a newer state (served readings)
    rows_written: int


def refresh_states(spec: Spec, store: OnlineStore, rows: pl.DataFrame) -> StateRefresh:
    """Write each entity's state as of the rows' end, never moving a state back in time: a
    state the service has already advanced past these rows (by serving readings) is kept."""
    states = states_from_rows(spec, rows)
    current = store.get_states(spec.name, [s.entity for s in states])
    newer = [s for s in states if s.entity not in current or current[s.entity].as_of <= s.as_of]
    written = store.write_states(spec.name, newer)
    return StateRefresh(written, len(states) - len(newer), sum(len(s.rows) for s in newer))
