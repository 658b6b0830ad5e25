"""Online features: the newest reading of an entity over its stored state, through the same
kernel as the offline path (mlops.features.entity_features), with a fallback policy.

The store holds, per entity, the valid rows the features of the next reading can need: rows
within the longest window before the newest one, plus the newest row (for diffs). Serving a
reading appends it to the state, so the next request sees it at once.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any

from mlops import features as feats
from mlops.labels import entity_column, with_entity
from mlops.online_store import (
    Append,
    EntityState,
    OnlineStore,
    StoredState,
    encode_state,
    from_us,
    merge_row,
    raw_row,
)
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


def state_row(
    spec: Spec, reading: dict[str, Any], columns: list[str] | None = None
) -> dict[str, Any]:
    """A validated reading -> the stored row: its timestamp and the feature inputs
    (`columns`: feats.state_columns(spec), when the caller has them)."""
    ts_col = spec.source.timestamp_column
    ts = reading[ts_col]
    if isinstance(ts, str):
        ts = dt.datetime.fromisoformat(ts)
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
    row = {TS: ts}
    for c in feats.state_columns(spec) if columns is None else columns:
        v = reading.get(c)
        row[c] = None if v is None or (isinstance(v, float) and v != v) else v  # NaN: None
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


@dataclass
class OnlineBatch:
    """A batch's features: one result per reading (in request order), and the same values
    as columns (one kernel output per feature, a value per reading) to build a model
    matrix from without going through the dicts."""

    results: list[OnlineResult]
    columns: dict[str, np.ndarray]


class BatchRejected(ValueError):
    """Readings of a batch without a usable state under the `reject` policy, as
    (index in the batch, FeatureRejected). Nothing of the batch was appended."""

    def __init__(self, rejected: list[tuple[int, FeatureRejected]]):
        self.rejected = rejected
        super().__init__("; ".join(str(e) for _, e in rejected))


@dataclass
class _Entity:
    """One entity's state while a batch is worked through: as stored, then as each of the
    batch's appended readings leaves it (what the next request would read)."""

    stored: StoredState | None
    as_of_us: int | None
    rows: list[dict[str, Any]]  # raw: "ts" in epoch µs, sorted
    appended: list[tuple[dict[str, Any], int]]  # (raw row, keep_from_us), in order
    open: int | None = None  # the segment the entity's next in-order reading extends


_SEPARATOR: dict[str, Any] = {}  # a row of nothing between two segments (see _kernel)

# Payload bytes of decoded states a process keeps. With the decoded rows, a state takes
# about 4 times its payload in memory: 16 MiB (about 64 MB) holds about 4,000 entities of
# the example's state (26 hourly rows, 3.9 kB).
STATE_CACHE_BYTES = 16 << 20


class StateCache:
    """The states this process last read or wrote, least recently used first, up to `limit`
    payload bytes. `read_states` reuses one whose payload is still the stored one byte for
    byte, so an entity served again is not decoded again; a state another writer changed
    since no longer matches and is decoded as usual."""

    def __init__(self, limit: int = STATE_CACHE_BYTES):
        self.limit = limit
        self.states: OrderedDict[str, StoredState] = OrderedDict()
        self.size = 0
        self._lock = threading.Lock()

    def put(self, states: list[StoredState]) -> None:
        with self._lock:
            for st in states:
                old = self.states.pop(st.entity, None)
                if old is not None:
                    self.size -= len(old.payload)
                if len(st.payload) <= self.limit:
                    self.states[st.entity] = st
                    self.size += len(st.payload)
            while self.size > self.limit:
                _, old = self.states.popitem(last=False)
                self.size -= len(old.payload)


class OnlineFeatures:
    """Features of readings over their entities' stored state, appending each reading.

    Any number of readings costs two store round trips: every entity's state is read once
    (`read_states`) and every new state written once (`append_rows`, one atomic step that
    never loses a concurrent writer's rows), with one call of the feature kernel over all
    of them in between. Readings of one entity are served in request order, each over the
    state the ones before it left: exactly what one request per reading would give."""

    def __init__(
        self,
        spec: Spec,
        store: OnlineStore,
        fallback: str | None = None,
        cache_bytes: int = STATE_CACHE_BYTES,
    ):
        self.spec, self.store = spec, store
        self.cache = StateCache(cache_bytes)
        self.fallback = fallback or spec.features.online_fallback
        self.counts: Counter[str] = Counter()
        self._names = feats.feature_names(spec)
        self._columns = feats.state_columns(spec)
        self._numeric = [c for c in self._columns if c not in spec.features.categorical]
        self._window_us = _us(retention(spec))
        self._stale_us = _us(staleness_limit(spec))

    def get(self, entity: str, reading: dict[str, Any], append: bool = True) -> OnlineResult:
        """One reading; raises FeatureRejected under the `reject` policy."""
        try:
            items, _ = self._run([(entity, reading)], append, all_or_nothing=True)
        except BatchRejected as e:
            raise e.rejected[0][1] from None
        return items[0]  # type: ignore[return-value]

    def get_many(
        self, readings: list[tuple[str, dict[str, Any]]], append: bool = True
    ) -> list[OnlineResult | FeatureRejected]:
        """A batch: a result or a rejection per reading; the served ones are appended."""
        return self._run(readings, append, all_or_nothing=False)[0]

    def serve_batch(self, readings: list[tuple[str, dict[str, Any]]]) -> OnlineBatch:
        """A batch, all or nothing: every reading served and appended, or BatchRejected
        (the `reject` policy refused one or more) and nothing appended."""
        items, columns = self._run(readings, True, all_or_nothing=True)
        return OnlineBatch(items, columns)  # type: ignore[arg-type]

    # The batch ---------------------------------------------------------------------------
    def _run(
        self, readings: list[tuple[str, dict[str, Any]]], append: bool, all_or_nothing: bool
    ) -> tuple[list[OnlineResult | FeatureRejected], dict[str, np.ndarray]]:
        spec = self.spec
        rows = [raw_row(state_row(spec, reading, self._columns)) for _, reading in readings]
        wanted = list(dict.fromkeys(e for e, _ in readings))
        stored = self.store.read_states(spec.name, wanted, known=self.cache.states)
        entities: dict[str, _Entity] = {}
        segments: list[list[dict[str, Any]]] = []
        where: list[tuple[int, int]] = []  # (segment, position) of each computed reading
        items: list[OnlineResult | FeatureRejected | None] = []
        flags: list[tuple[int | None, str | None, str | None]] = []  # (as_of_us, why, code)
        rejected: list[tuple[int, FeatureRejected]] = []
        for i, (entity, _) in enumerate(readings):
            row, ts = rows[i], rows[i]["ts"]
            st = entities.get(entity)
            if st is None:
                found = stored.get(entity)
                st = entities[entity] = _Entity(
                    found, found.as_of_us if found else None, found.rows if found else [], []
                )
            code, why = self._fallback(st, ts)
            if why is not None:
                self.counts[f"fallback_{code}"] += 1
                if self.fallback == "reject":
                    self.counts["rejected"] += 1
                    e = FeatureRejected(entity, why + " (features.online_fallback: reject)", code)
                    rejected.append((i, e))
                    items.append(e)
                    flags.append((st.as_of_us, why, code))
                    continue
            newest = code is None and st.as_of_us is not None and ts > st.as_of_us
            if newest and st.open is not None:
                # In order after the entity's previous reading of this batch: its history
                # is that reading's segment (rows trimmed since are outside every window).
                seg = st.open
            else:
                history = [] if code is not None else _before(st.rows, ts)
                seg = len(segments)
                segments.append(history)
            segments[seg].append(row)
            where.append((seg, len(segments[seg]) - 1))
            items.append(None)
            flags.append((st.as_of_us, why, code))
            if append and code != OUT_OF_ORDER:  # a row that old would not count for any reading
                keep_from = ts - self._window_us
                st.rows = merge_row(st.rows, row, keep_from, 1)
                st.as_of_us = st.rows[-1]["ts"]
                st.appended.append((row, keep_from))
                # Its segment holds the entity's new state (and older rows), newest last.
                st.open = seg if newest else None
        if rejected and all_or_nothing:
            raise BatchRejected(rejected)
        columns = self._kernel(segments, where)
        values = self._dicts(columns)
        k = 0
        for i, (entity, _) in enumerate(readings):
            if items[i] is not None:
                continue
            as_of_us, why, code = flags[i]
            items[i] = OnlineResult(
                entity,
                values[k],
                from_us(as_of_us) if as_of_us is not None else None,
                fallback=why,
                fallback_code=code,
            )
            k += 1
        self.counts["served"] += k
        written: dict[str, StoredState] = {}
        if append:
            appends = [
                Append(
                    e,
                    st.appended,
                    1,
                    st.stored.payload if st.stored else None,
                    encode_state(st.rows, st.stored),
                    st.as_of_us,  # type: ignore[arg-type]
                )
                for e, st in entities.items()
                if st.appended
            ]
            if appends:
                self.store.append_rows(spec.name, appends)
                written = {
                    a.entity: StoredState(a.entity, a.as_of_us, entities[a.entity].rows, a.payload)
                    for a in appends
                }
        # Each entity's state as this process last saw it, what its next read most likely
        # finds: what it wrote, else what it read.
        self.cache.put([*written.values(), *(s for e, s in stored.items() if e not in written)])
        return items, columns  # type: ignore[return-value]

    def _fallback(self, st: _Entity, ts: int) -> tuple[str | None, str | None]:
        """(code, reason) when the entity's state cannot serve a reading at `ts`."""
        if st.as_of_us is None or not st.rows:
            return UNKNOWN_ENTITY, "unknown entity: no state in the online store"
        as_of = from_us(st.as_of_us)
        if ts - st.as_of_us > self._stale_us:
            return STALE_STATE, (
                f"stale state: newest row {as_of:%Y-%m-%d %H:%M} is more than "
                f"{staleness_limit(self.spec)} before the reading"
            )
        if ts < st.as_of_us - self._window_us:
            # Out of order beyond the feature window: the rows its windows need were trimmed
            # when newer readings came, so its features would silently lack its history.
            return OUT_OF_ORDER, (
                f"out of order: the reading at {from_us(ts):%Y-%m-%d %H:%M} is more than the "
                f"feature window ({retention(self.spec)}) before the entity's newest row "
                f"{as_of:%Y-%m-%d %H:%M}; its history is no longer in the store"
            )
        return None, None

    def _kernel(
        self, segments: list[list[dict[str, Any]]], where: list[tuple[int, int]]
    ) -> dict[str, np.ndarray]:
        """The feature kernel once over every segment (a reading's history and the reading,
        or an entity's history and its in-order readings).

        The kernel computes features of rows of ONE entity; the segments become one series
        it cannot tell apart from an entity's own: a row of nothing (NaN, None) before each
        segment, so a diff never reaches into the one before, and time compressed so that
        no window spans two segments: every gap between consecutive rows is capped at the
        longest window + 1 µs (a gap that wide already has no window spanning it, so no
        window gains or loses a row), and each segment starts that far after the last."""
        if not where:
            return {n: np.array([], dtype="float64") for n in self._names}
        rows: list[dict[str, Any]] = []
        starts: list[int] = []
        for seg in segments:
            rows.append(_SEPARATOR)
            starts.append(len(rows))
            rows.extend(seg)
        gap = self._window_us + 1
        get = dict.get  # map(get, rows, repeat(c)): a column of the row dicts, None if absent
        ts = np.fromiter(map(get, rows, repeat(TS), repeat(0)), "int64", len(rows))
        step = np.minimum(np.diff(ts, prepend=ts[:1]), gap)
        first = np.asarray(starts, dtype="int64")
        step[first - 1] = gap  # the separators
        step[first] = gap  # each segment's first row
        ts = np.cumsum(step)
        num = {c: np.array(list(map(get, rows, repeat(c))), "float64") for c in self._numeric}
        cat = {}
        for c in self.spec.features.categorical:
            a = np.empty(len(rows), dtype=object)
            a[:] = list(map(get, rows, repeat(c)))
            cat[c] = a
        at = np.fromiter((starts[s] + k for s, k in where), dtype="int64", count=len(where))
        return feats.entity_features(self.spec, ts, num, cat, at)

    def _dicts(self, columns: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Kernel outputs -> one feature dict per reading (NaN -> None), in feature order."""
        lists = []
        for n in self._names:
            v = columns[n]
            if v.dtype == object:
                lists.append([_scalar(x) for x in v])
            else:
                lists.append([None if x != x else x for x in v.tolist()])
        names = self._names
        return [dict(zip(names, vals, strict=True)) for vals in zip(*lists, strict=True)]


def _before(rows: list[dict[str, Any]], ts: int) -> list[dict[str, Any]]:
    """The rows (sorted by "ts") before `ts`."""
    k = len(rows)
    while k > 0 and rows[k - 1][TS] >= ts:
        k -= 1
    return rows[:k]


def _us(delta: dt.timedelta) -> int:
    return delta // dt.timedelta(microseconds=1)


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
