"""The online feature store: each entity's recent validated rows ("state"), keyed by spec.

A daily asset bulk-writes every entity's state; the online service reads an entity's state to
compute features for a new reading and appends that reading, so the next request sees it.
Several server worker processes share one store, so `append_row` is atomic per entity (SQLite:
`BEGIN IMMEDIATE`; Redis: one Lua script) and never loses a concurrent update.

The service's path is two round trips per request, whatever its number of readings:
`read_states` (every entity's state, with the payload bytes it was decoded from) and
`append_rows` (every entity's new state, computed by the caller from what it read, in one
atomic step). `append_rows` writes a caller's state only where the stored payload is still
the one read (compare-and-set, no decoding); where another writer got there first it
merges the caller's rows into the current state inside the same atomic step, exactly as
`append_row` would, so a concurrent update is never lost and nothing is retried.

Two backends behind one `OnlineStore` protocol: SQLite (one local file, no server) and Redis
(shared, in memory). Both store one payload per entity: compact JSON rows, oldest first, each
an object whose first key is "ts" (integer epoch microseconds), values as JSON numbers, strings
or null. Python's json writes floats with repr precision, so values round-trip exactly.

Nothing connects or creates files at import or construction: connections open on first use,
once per process (and thread, for SQLite), so forked or spawned workers get their own.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from pydantic_core import from_json

if TYPE_CHECKING:
    import redis

EPOCH = datetime.datetime(1970, 1, 1)
SQLITE_BATCH = 1000  # states per transaction in write_states
REDIS_CHUNK = 1000  # commands per pipeline round trip
SQLITE_MAX_IN = 5000  # entities per `IN (...)`: far below SQLite's variable limit
SUPPORTED_SCHEMES = "sqlite:///abs/path.db, a plain file path, redis:// or rediss://"


@dataclass
class EntityState:
    entity: str
    as_of: datetime.datetime  # naive UTC: time of the newest row in `rows`
    rows: list[dict[str, Any]]  # oldest first; "ts" (naive datetime) plus column -> value


@dataclass
class StoredState:
    """An entity's state as `read_states` returns it: rows with "ts" still in epoch µs (as
    stored), and the payload bytes they were decoded from (what `append_rows` compares)."""

    entity: str
    as_of_us: int
    rows: list[dict[str, Any]]
    payload: bytes


@dataclass(frozen=True)
class Append:
    """Readings to append to one entity's state, with the state the caller computed from.

    rows: (row with "ts" as epoch µs, keep_from_us) in the order they are appended; each is
    merged as `append_row` merges one (`merge_row` with `keep_last`). seen: the payload the
    caller read (None: the entity had no state). payload / as_of_us: the state after those
    merges, computed by the caller from `seen` (`encode_state`); stored as is while the
    stored payload is still `seen`."""

    entity: str
    rows: list[tuple[dict[str, Any], int]]
    keep_last: int
    seen: bytes | None
    payload: bytes
    as_of_us: int


@dataclass(frozen=True)
class StoreStats:
    entities: int
    bytes: int  # stored payload bytes (the rows JSON), not counting keys or indexes
    oldest_as_of: datetime.datetime | None
    newest_as_of: datetime.datetime | None


class StoreUnavailable(RuntimeError):
    """The store's server cannot be reached: the message names the URL and how to start it."""


@runtime_checkable
class OnlineStore(Protocol):
    def write_states(self, spec_name: str, states: Iterable[EntityState]) -> int: ...

    def get_state(self, spec_name: str, entity: str) -> EntityState | None: ...

    def get_states(self, spec_name: str, entities: list[str]) -> dict[str, EntityState]: ...

    def append_row(
        self,
        spec_name: str,
        entity: str,
        row: dict[str, Any],
        keep_from: datetime.datetime,
        keep_last: int = 1,
        want_state: bool = True,
    ) -> EntityState | None: ...

    def read_states(
        self,
        spec_name: str,
        entities: list[str],
        known: Mapping[str, StoredState] | None = None,
    ) -> dict[str, StoredState]: ...

    def append_rows(self, spec_name: str, appends: list[Append]) -> int: ...

    def stats(self, spec_name: str) -> StoreStats: ...

    def delete_spec(self, spec_name: str) -> None: ...

    def close(self) -> None: ...


def make_store(url: str) -> OnlineStore:
    """Open the store a URL names, so settings carry one string for either backend."""
    if url.startswith(("redis://", "rediss://")):
        return RedisOnlineStore(url)
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise ValueError(
                f"online store URL {url!r}: write an absolute path as sqlite:///abs/path.db"
            )
        return SQLiteOnlineStore(path)
    if url and "://" not in url:
        return SQLiteOnlineStore(url)
    raise ValueError(f"online store URL {url!r} is not supported: use one of {SUPPORTED_SCHEMES}")


# Encoding ------------------------------------------------------------------------------------
def to_us(ts: datetime.datetime) -> int:
    """Naive-UTC datetime -> epoch microseconds (aware datetimes are converted to UTC)."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(datetime.UTC).replace(tzinfo=None)
    d = ts - EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def from_us(us: int) -> datetime.datetime:
    return EPOCH + datetime.timedelta(microseconds=us)


def _row_ts(row: dict[str, Any]) -> int:
    ts = row.get("ts")
    if not isinstance(ts, datetime.datetime):
        raise ValueError(f"online store row needs 'ts' as a datetime, got {ts!r} in {row!r}")
    return to_us(ts)


def _clean_value(column: str, value: Any) -> Any:
    kind = type(value)
    if kind is float:  # the common case first: this runs for every value written
        if math.isfinite(value):
            return value
        if math.isnan(value):
            return None
        raise ValueError(f"online store column {column!r}: {value} cannot be stored (not finite)")
    if value is None or kind is str or kind is int or kind is bool:
        return value
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return _clean_value(column, value.item())  # numpy scalars -> Python scalars
    if isinstance(value, float):  # subclasses: json would write their repr or value as is
        return _clean_value(column, float(value))
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str.__str__(value)
    raise ValueError(
        f"online store column {column!r}: {kind.__name__} values are not supported "
        "(use float, str or None)"
    )


def _raw_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as stored: "ts" first, as epoch µs. The Redis Lua script relies on that order."""
    raw: dict[str, Any] = {"ts": _row_ts(row)}
    for column, value in row.items():
        if column != "ts":
            raw[column] = _clean_value(column, value)
    return raw


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)


def _encode_rows(rows: list[dict[str, Any]]) -> str:
    raw = sorted((_raw_row(r) for r in rows), key=lambda r: r["ts"])
    return _dumps(raw)


def _corrupt(spec_name: str, entity: str, detail: str) -> ValueError:
    return ValueError(
        f"online store: corrupt state for spec {spec_name!r}, entity {entity!r} ({detail}); "
        "rewrite it with write_states or remove it with delete_spec"
    )


def _decode_raw(spec_name: str, entity: str, payload: bytes | str) -> list[dict[str, Any]]:
    """Stored payload -> rows with "ts" still in epoch µs, validated. pydantic-core's parser
    (in the locked set through pydantic) gives json.loads's values for what `_dumps` writes,
    2.5 times faster: every served reading decodes its entity's state."""
    try:
        rows = from_json(payload, allow_inf_nan=False)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        raise _corrupt(spec_name, entity, f"not JSON: {e}") from e
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and type(r.get("ts")) is int for r in rows
    ):
        raise _corrupt(spec_name, entity, "expected a list of rows with an integer 'ts'")
    return rows


def _stored(
    spec_name: str,
    entity: str,
    payload: bytes | str,
    as_of_us: int,
    known: Mapping[str, StoredState] | None = None,
) -> StoredState:
    """The stored state, decoded; or `known[entity]` when its payload is the stored one byte
    for byte (the same rows, so nothing to decode: a served reading's state is usually the one
    this process wrote last)."""
    raw = payload if isinstance(payload, bytes) else payload.encode()
    if known is not None:
        hit = known.get(entity)
        if hit is not None and hit.payload == raw and hit.as_of_us == as_of_us:
            return hit
    return StoredState(entity, int(as_of_us), _decode_raw(spec_name, entity, raw), raw)


def raw_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as stored ("ts" first, as epoch µs; values cleaned), as `Append.rows` take it."""
    return _raw_row(row)


def merge_rows(
    rows: list[dict[str, Any]], appended: list[tuple[dict[str, Any], int]], keep_last: int
) -> list[dict[str, Any]]:
    """`merge_row` for each (row, keep_from_us) in turn."""
    for row, keep_from_us in appended:
        rows = merge_row(rows, row, keep_from_us, keep_last)
    return rows


ROW_BOUNDARY = b'},{"ts":'  # between two stored rows, and nowhere else (see APPEND_LUA)


def _row_pieces(payload: bytes) -> list[bytes]:
    """Each stored row's JSON, byte for byte: split on the row boundary as the Redis script
    splits (see APPEND_LUA)."""
    body = payload[1:-1]
    if not body:
        return []
    parts = body.split(ROW_BOUNDARY)
    if len(parts) == 1:
        return [body]
    return [
        parts[0] + b"}",
        *(b'{"ts":' + p + b"}" for p in parts[1:-1]),
        b'{"ts":' + parts[-1],
    ]


def encode_state(rows: list[dict[str, Any]], stored: StoredState | None) -> bytes:
    """The payload of `rows` (raw, sorted): the rows that come unchanged from `stored` (the
    same objects) keep their stored bytes, only the others are encoded, so a state's cost
    is its new rows, not its length. The same bytes as encoding every row."""
    if stored is not None and rows and stored.rows:
        fast = _appended_payload(rows, stored)
        if fast is not None:
            return fast
    known: dict[int, bytes] = {}
    if stored is not None:
        pieces = _row_pieces(stored.payload)
        if len(pieces) == len(stored.rows):
            known = {id(r): p for r, p in zip(stored.rows, pieces, strict=True)}
    return b"[" + b",".join(known.get(id(r)) or _dumps(r).encode() for r in rows) + b"]"


def _appended_payload(rows: list[dict[str, Any]], stored: StoredState) -> bytes | None:
    """`encode_state` of the usual append: `rows` are the stored rows from some k on (the
    older ones trimmed), then new ones. The stored rows' bytes are then one slice of the
    stored payload, cut at its k-th row boundary; None when `rows` are not of that shape."""
    old = stored.rows
    first = rows[0]
    k = 0
    while k < len(old) and old[k] is not first:
        k += 1
    kept = len(old) - k
    if kept == 0 or len(rows) < kept:
        return None
    for i in range(1, kept):
        if rows[i] is not old[k + i]:
            return None
    body = stored.payload[1:-1]
    if body.count(ROW_BOUNDARY) != len(old) - 1:  # not one piece per row: the general way
        return None
    rest = body.split(ROW_BOUNDARY, k)[-1] if k else body
    out = [b'[{"ts":' + rest if k else b"[" + rest]
    out.extend(_dumps(r).encode() for r in rows[kept:])
    return b",".join(out) + b"]"


def _decode_state(spec_name: str, entity: str, payload: bytes | str, as_of_us: int) -> EntityState:
    rows = _decode_raw(spec_name, entity, payload)
    for r in rows:
        r["ts"] = from_us(r["ts"])
    return EntityState(entity=entity, as_of=from_us(as_of_us), rows=rows)


def merge_row(
    rows: list[dict[str, Any]], row: dict[str, Any], keep_from_us: int, keep_last: int
) -> list[dict[str, Any]]:
    """Insert `row` by "ts" (replacing a same-ts row), keep rows at/after `keep_from_us`
    plus the `keep_last` newest before it. Rows carry "ts" as epoch µs and are sorted."""
    ts = row["ts"]
    i = len(rows)
    while i > 0 and rows[i - 1]["ts"] > ts:
        i -= 1
    if i > 0 and rows[i - 1]["ts"] == ts:
        merged = [*rows[: i - 1], row, *rows[i:]]
    else:
        merged = [*rows[:i], row, *rows[i:]]
    before = sum(1 for r in merged if r["ts"] < keep_from_us)
    return merged[max(0, before - keep_last) :]


def _check_keep_last(keep_last: int) -> None:
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# SQLite --------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS online_state (
    spec TEXT NOT NULL,
    entity TEXT NOT NULL,
    as_of_us INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (spec, entity)
) WITHOUT ROWID
"""
UPSERT = """
INSERT INTO online_state (spec, entity, as_of_us, payload) VALUES (?, ?, ?, ?)
ON CONFLICT (spec, entity) DO UPDATE SET as_of_us = excluded.as_of_us, payload = excluded.payload
"""


class SQLiteOnlineStore:
    """One SQLite file in WAL mode: readers never block the writer, writers queue on a lock."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()

    def _conn(self) -> sqlite3.Connection:
        """This process's and thread's connection; a forked worker opens its own."""
        if self._pid != os.getpid():  # forked: drop (never use or close) the parent's handles
            self._pid = os.getpid()
            self._local = threading.local()
            self._conns = []
        held: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if held is not None:
            return held
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # so close() can close other threads' connections
            )
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(
                f"cannot open the online store at {self.path}: {e}; check the path is writable"
            ) from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            self._use_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(SCHEMA)
        except sqlite3.OperationalError as e:
            conn.close()
            raise StoreUnavailable(
                f"cannot open the online store at {self.path}: {e}; check the path is writable"
            ) from e
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch a new file to WAL (persistent). The switch fails at once with "database is
        locked" while another process holds the file, without waiting on busy_timeout, so
        workers that open a fresh store together retry until the deadline."""
        deadline = time.monotonic() + self.busy_timeout_s
        while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def write_states(self, spec_name: str, states: Iterable[EntityState]) -> int:
        """Replace the given entities' states (others stay), one transaction per batch."""
        conn = self._conn()
        n = 0
        for batch in _chunks(states, SQLITE_BATCH):
            params = [
                (spec_name, s.entity, to_us(s.as_of), _encode_rows(s.rows).encode()) for s in batch
            ]
            conn.execute("BEGIN")
            try:
                conn.executemany(UPSERT, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            n += len(params)
        return n

    def get_state(self, spec_name: str, entity: str) -> EntityState | None:
        found = self._conn().execute(
            "SELECT as_of_us, payload FROM online_state WHERE spec = ? AND entity = ?",
            (spec_name, entity),
        )
        hit = found.fetchone()
        return None if hit is None else _decode_state(spec_name, entity, hit[1], hit[0])

    def _select(self, spec_name: str, entities: list[str]) -> list[tuple[str, int, bytes]]:
        """(entity, as_of_us, payload) of the stored ones: one query per request (an `IN`
        list; split only past SQLITE_MAX_IN entities). Fetched whole, so a state that
        fails to decode leaves no cursor open behind it."""
        conn = self._conn()
        found: list[tuple[str, int, bytes]] = []
        for batch in _chunks(dict.fromkeys(entities), SQLITE_MAX_IN):
            marks = ",".join("?" * len(batch))
            found += conn.execute(
                "SELECT entity, as_of_us, payload FROM online_state "
                f"WHERE spec = ? AND entity IN ({marks})",
                (spec_name, *batch),
            ).fetchall()
        return found

    def get_states(self, spec_name: str, entities: list[str]) -> dict[str, EntityState]:
        return {
            entity: _decode_state(spec_name, entity, payload, as_of_us)
            for entity, as_of_us, payload in self._select(spec_name, entities)
        }

    def read_states(
        self,
        spec_name: str,
        entities: list[str],
        known: Mapping[str, StoredState] | None = None,
    ) -> dict[str, StoredState]:
        """Every stored one's state; one in `known` with the same payload is not decoded."""
        return {
            entity: _stored(spec_name, entity, payload, as_of_us, known)
            for entity, as_of_us, payload in self._select(spec_name, entities)
        }

    def append_rows(self, spec_name: str, appends: list[Append]) -> int:
        """One `BEGIN IMMEDIATE` transaction: each entity's state is replaced by the caller's
        where its payload is still the one read (a compare-and-set, nothing decoded), else
        the caller's rows are merged into the current state. Returns how many were merged."""
        for a in appends:
            _check_keep_last(a.keep_last)
        conn = self._conn()
        merged = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for a in appends:
                payload = a.payload
                if a.seen is None:
                    cur = conn.execute(
                        "INSERT INTO online_state (spec, entity, as_of_us, payload) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (spec, entity) DO NOTHING",
                        (spec_name, a.entity, a.as_of_us, payload),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE online_state SET as_of_us = ?, payload = ? "
                        "WHERE spec = ? AND entity = ? AND payload = ?",
                        (a.as_of_us, payload, spec_name, a.entity, a.seen),
                    )
                if cur.rowcount == 1:
                    continue
                merged += 1  # another writer changed it since it was read
                hit = conn.execute(
                    "SELECT payload FROM online_state WHERE spec = ? AND entity = ?",
                    (spec_name, a.entity),
                ).fetchone()
                rows = [] if hit is None else _decode_raw(spec_name, a.entity, hit[0])
                rows = merge_rows(rows, a.rows, a.keep_last)
                if rows:
                    conn.execute(
                        UPSERT, (spec_name, a.entity, rows[-1]["ts"], _dumps(rows).encode())
                    )
                else:
                    conn.execute(
                        "DELETE FROM online_state WHERE spec = ? AND entity = ?",
                        (spec_name, a.entity),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return merged

    def append_row(
        self,
        spec_name: str,
        entity: str,
        row: dict[str, Any],
        keep_from: datetime.datetime,
        keep_last: int = 1,
        want_state: bool = True,
    ) -> EntityState | None:
        """Read-append-trim-write under `BEGIN IMMEDIATE`: concurrent appenders serialize."""
        _check_keep_last(keep_last)
        raw = _raw_row(row)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            hit = conn.execute(
                "SELECT payload FROM online_state WHERE spec = ? AND entity = ?",
                (spec_name, entity),
            ).fetchone()
            rows = [] if hit is None else _decode_raw(spec_name, entity, hit[0])
            rows = merge_row(rows, raw, to_us(keep_from), keep_last)
            if rows:
                payload = _dumps(rows)
                conn.execute(UPSERT, (spec_name, entity, rows[-1]["ts"], payload.encode()))
            else:
                conn.execute(
                    "DELETE FROM online_state WHERE spec = ? AND entity = ?", (spec_name, entity)
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if not want_state:  # the serving path needs no copy back (0.1-0.3 ms per call)
            return None
        as_of_us = rows[-1]["ts"] if rows else raw["ts"]
        for r in rows:
            r["ts"] = from_us(r["ts"])
        return EntityState(entity=entity, as_of=from_us(as_of_us), rows=rows)

    def stats(self, spec_name: str) -> StoreStats:
        n, size, oldest, newest = (
            self._conn()
            .execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(as_of_us), "
                "MAX(as_of_us) FROM online_state WHERE spec = ?",
                (spec_name,),
            )
            .fetchone()
        )
        return StoreStats(
            entities=n,
            bytes=size,
            oldest_as_of=None if oldest is None else from_us(oldest),
            newest_as_of=None if newest is None else from_us(newest),
        )

    def delete_spec(self, spec_name: str) -> None:
        self._conn().execute("DELETE FROM online_state WHERE spec = ?", (spec_name,))

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


# Redis ---------------------------------------------------------------------------------------
# Redis's cjson re-encodes numbers with 14 significant digits (0.1 + 0.2 -> 0.3, epoch µs ->
# 1.7672256001235e+15), so the script never decodes the rows: it splits the payload on the row
# boundary `},{"ts":` (which cannot occur inside a JSON string, where every quote is escaped,
# nor elsewhere since values are scalars and "ts" is each row's first key) and reads each
# row's ts digits. Rows are copied byte for byte; only the new row is inserted.
# What both scripts share: a payload split into its rows (with each row's ts, as text and as
# a number; nil when a row does not start with its ts), and one row merged in as
# OnlineStore.append_row merges it (same ts: replaced; then the rows before `keep_from` cut
# to the last `keep_last`).
_ROWS_LUA = """
local function parse_rows(payload)
  local rows, ts_s, ts = {}, {}, {}
  if payload and #payload > 2 then
    local body = string.sub(payload, 2, -2)
    local start = 1
    while true do
      local stop = string.find(body, '},{"ts":', start, true)
      local row = stop and string.sub(body, start, stop) or string.sub(body, start)
      local digits = string.match(row, '^{"ts":(%-?%d+)[,}]')
      if not digits then return nil end
      rows[#rows + 1] = row
      ts_s[#ts_s + 1] = digits
      ts[#ts + 1] = tonumber(digits)
      if not stop then break end
      start = stop + 2
    end
  end
  return rows, ts_s, ts
end

local function merge_row(rows, ts_s, ts, new_row, new_ts_s, keep_from, keep_last)
  local new_ts = tonumber(new_ts_s)
  local i = #rows
  while i > 0 and ts[i] > new_ts do i = i - 1 end
  if i > 0 and ts[i] == new_ts then
    rows[i] = new_row
  else
    table.insert(rows, i + 1, new_row)
    table.insert(ts_s, i + 1, new_ts_s)
    table.insert(ts, i + 1, new_ts)
  end
  local before = 0
  for j = 1, #ts do
    if ts[j] < keep_from then before = j else break end
  end
  local first = math.max(1, before - keep_last + 1)
  local r2, s2, t2 = {}, {}, {}
  for j = first, #rows do
    r2[#r2 + 1] = rows[j]
    s2[#s2 + 1] = ts_s[j]
    t2[#t2 + 1] = ts[j]
  end
  return r2, s2, t2
end
"""

APPEND_LUA = (
    _ROWS_LUA
    + """
local key, set_key = KEYS[1], KEYS[2]
local entity, new_row, new_ts_s = ARGV[1], ARGV[2], ARGV[3]
local keep_from, keep_last = tonumber(ARGV[4]), tonumber(ARGV[5])
local rows, ts_s, ts = parse_rows(redis.call('HGET', key, 'rows'))
if not rows then return redis.error_reply('corrupt rows payload') end
rows, ts_s, ts = merge_row(rows, ts_s, ts, new_row, new_ts_s, keep_from, keep_last)
if #rows == 0 then
  redis.call('DEL', key)
  redis.call('SREM', set_key, entity)
  return '[]'
end
local out = '[' .. table.concat(rows, ',') .. ']'
redis.call('HSET', key, 'as_of', ts_s[#ts_s], 'rows', out)
redis.call('SADD', set_key, entity)
return out
"""
)


# append_rows in one script (one round trip, atomic on the server). Per entity, ARGV holds:
# entity, "1"/"0" (whether a payload was read), the payload read, the caller's new payload,
# its as_of, keep_last, the number of rows n, then n times (row, ts, keep_from). A payload
# still equal to the one read is replaced by the caller's; otherwise each row is merged into
# the current payload as APPEND_LUA merges one. Returns how many entities were merged.
APPEND_MANY_LUA = (
    _ROWS_LUA
    + """
local set_key = KEYS[1]
local p, merged = 1, 0
for k = 2, #KEYS do
  local key = KEYS[k]
  local entity, had, seen = ARGV[p], ARGV[p + 1], ARGV[p + 2]
  local result, as_of = ARGV[p + 3], ARGV[p + 4]
  local keep_last, n = tonumber(ARGV[p + 5]), tonumber(ARGV[p + 6])
  p = p + 7
  local payload = redis.call('HGET', key, 'rows')
  if (had == '1' and payload == seen) or (had == '0' and not payload) then
    redis.call('HSET', key, 'as_of', as_of, 'rows', result)
    redis.call('SADD', set_key, entity)
    p = p + 3 * n
  else
    merged = merged + 1
    local rows, ts_s, ts = parse_rows(payload)
    if not rows then return redis.error_reply('corrupt rows payload of ' .. entity) end
    for _ = 1, n do
      rows, ts_s, ts = merge_row(
        rows, ts_s, ts, ARGV[p], ARGV[p + 1], tonumber(ARGV[p + 2]), keep_last
      )
      p = p + 3
    end
    if #rows == 0 then
      redis.call('DEL', key)
      redis.call('SREM', set_key, entity)
    else
      redis.call('HSET', key, 'as_of', ts_s[#ts_s], 'rows', '[' .. table.concat(rows, ',') .. ']')
      redis.call('SADD', set_key, entity)
    end
  end
end
return merged
"""
)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class RedisOnlineStore:
    """One hash per entity (`as_of`, `rows`) plus a set of the spec's entities."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "mlops"):
        self.url = url
        self.prefix = prefix
        self._client: redis.Redis | None = None
        self._append: Any = None
        self._append_many: Any = None

    def _redis(self) -> redis.Redis:
        """Created on first use; redis-py's pool reconnects by itself in a forked worker."""
        if self._client is None:
            import redis

            # URL query parameters (e.g. ?socket_timeout=0.5) override these defaults.
            self._client = redis.Redis.from_url(
                self.url, socket_connect_timeout=2.0, socket_timeout=5.0
            )
            self._append = self._client.register_script(APPEND_LUA)
            self._append_many = self._client.register_script(APPEND_MANY_LUA)
        return self._client

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        port = urlsplit(self.url).port or 6379
        return StoreUnavailable(
            f"online store: Redis at {_redact(self.url)} is not reachable ({e}); "
            f"start it with: redis-server --port {port}"
        )

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a redis operation, turning connection failures into StoreUnavailable."""
        import redis

        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise self._unavailable(e) from e

    def _key(self, spec_name: str, entity: str) -> str:
        return f"{self.prefix}:{spec_name}:e:{entity}"

    def _set_key(self, spec_name: str) -> str:
        return f"{self.prefix}:{spec_name}:entities"

    def _state(
        self, spec_name: str, entity: str, as_of: bytes | None, payload: bytes | None
    ) -> EntityState | None:
        if as_of is None and payload is None:
            return None
        if as_of is None or payload is None:
            raise _corrupt(spec_name, entity, "hash lacks 'as_of' or 'rows'")
        try:
            as_of_us = int(as_of)
        except ValueError as e:
            raise _corrupt(spec_name, entity, f"as_of {as_of!r} is not an integer") from e
        return _decode_state(spec_name, entity, payload, as_of_us)

    def write_states(self, spec_name: str, states: Iterable[EntityState]) -> int:
        """Replace the given entities' states (others stay), pipelined in chunks."""
        client = self._redis()
        set_key = self._set_key(spec_name)
        n = 0
        for batch in _chunks(states, REDIS_CHUNK):
            pipe = client.pipeline(transaction=False)
            for s in batch:
                mapping = {"as_of": to_us(s.as_of), "rows": _encode_rows(s.rows)}
                pipe.hset(self._key(spec_name, s.entity), mapping=mapping)  # type: ignore[arg-type]
            pipe.sadd(set_key, *(s.entity for s in batch))
            self._run(pipe.execute)
            n += len(batch)
        return n

    def get_state(self, spec_name: str, entity: str) -> EntityState | None:
        key = self._key(spec_name, entity)
        as_of, payload = self._run(self._redis().hmget, key, ["as_of", "rows"])
        return self._state(spec_name, entity, as_of, payload)

    def get_states(self, spec_name: str, entities: list[str]) -> dict[str, EntityState]:
        """One pipeline round trip for all entities."""
        wanted = list(dict.fromkeys(entities))
        pipe = self._redis().pipeline(transaction=False)
        for entity in wanted:
            pipe.hmget(self._key(spec_name, entity), ["as_of", "rows"])
        replies = self._run(pipe.execute) if wanted else []
        out: dict[str, EntityState] = {}
        for entity, (as_of, payload) in zip(wanted, replies, strict=True):
            state = self._state(spec_name, entity, as_of, payload)
            if state is not None:
                out[entity] = state
        return out

    def read_states(
        self,
        spec_name: str,
        entities: list[str],
        known: Mapping[str, StoredState] | None = None,
    ) -> dict[str, StoredState]:
        """One pipeline round trip for all entities; one in `known` with the same payload is
        not decoded."""
        wanted = list(dict.fromkeys(entities))
        pipe = self._redis().pipeline(transaction=False)
        for entity in wanted:
            pipe.hmget(self._key(spec_name, entity), ["as_of", "rows"])
        replies = self._run(pipe.execute) if wanted else []
        out: dict[str, StoredState] = {}
        for entity, (as_of, payload) in zip(wanted, replies, strict=True):
            if as_of is None and payload is None:
                continue
            if as_of is None or payload is None:
                raise _corrupt(spec_name, entity, "hash lacks 'as_of' or 'rows'")
            try:
                as_of_us = int(as_of)
            except ValueError as e:
                raise _corrupt(spec_name, entity, f"as_of {as_of!r} is not an integer") from e
            out[entity] = _stored(spec_name, entity, payload, as_of_us, known)
        return out

    def append_rows(self, spec_name: str, appends: list[Append]) -> int:
        """One Lua script for every entity (atomic on the server, one round trip): a state
        whose payload is still the one read is replaced by the caller's, else the caller's
        rows are merged into the current one. Returns how many were merged."""
        import redis

        if not appends:
            return 0
        self._redis()
        keys = [self._set_key(spec_name)]
        args: list[Any] = []
        for a in appends:
            _check_keep_last(a.keep_last)
            keys.append(self._key(spec_name, a.entity))
            args += [
                a.entity,
                "0" if a.seen is None else "1",
                a.seen or b"",
                a.payload,
                a.as_of_us,
                a.keep_last,
                len(a.rows),
            ]
            for row, keep_from_us in a.rows:
                args += [_dumps(row), row["ts"], keep_from_us]
        try:
            return int(self._run(self._append_many, keys=keys, args=args))
        except redis.ResponseError as e:
            if "corrupt" in str(e):
                which = [a.entity for a in appends if f"payload of {a.entity}" in str(e)]
                raise _corrupt(spec_name, which[0] if which else "?", str(e)) from e
            raise

    def append_row(
        self,
        spec_name: str,
        entity: str,
        row: dict[str, Any],
        keep_from: datetime.datetime,
        keep_last: int = 1,
        want_state: bool = True,
    ) -> EntityState | None:
        """Read-append-trim-write in one Lua script: atomic on the server, one round trip."""
        import redis

        _check_keep_last(keep_last)
        raw = _raw_row(row)
        self._redis()
        keys = [self._key(spec_name, entity), self._set_key(spec_name)]
        args = [entity, _dumps(raw), raw["ts"], to_us(keep_from), keep_last]
        try:
            payload = self._run(self._append, keys=keys, args=args)
        except redis.ResponseError as e:
            if "corrupt" in str(e):
                raise _corrupt(spec_name, entity, str(e)) from e
            raise
        if not want_state:
            return None
        rows = _decode_raw(spec_name, entity, payload)
        as_of_us = rows[-1]["ts"] if rows else raw["ts"]
        for r in rows:
            r["ts"] = from_us(r["ts"])
        return EntityState(entity=entity, as_of=from_us(as_of_us), rows=rows)

    def _members(self, spec_name: str) -> list[str]:
        found = self._run(self._redis().smembers, self._set_key(spec_name))
        return sorted(m.decode() for m in found)

    def stats(self, spec_name: str) -> StoreStats:
        client = self._redis()
        n = size = 0
        oldest: int | None = None
        newest: int | None = None
        for batch in _chunks(self._members(spec_name), REDIS_CHUNK):
            pipe = client.pipeline(transaction=False)
            for entity in batch:
                key = self._key(spec_name, entity)
                pipe.hget(key, "as_of")
                pipe.hstrlen(key, "rows")
            replies = self._run(pipe.execute)
            for as_of, length in zip(replies[::2], replies[1::2], strict=True):
                if as_of is None:  # removed behind our back; the set is only an index
                    continue
                us = int(as_of)
                n += 1
                size += length
                oldest = us if oldest is None else min(oldest, us)
                newest = us if newest is None else max(newest, us)
        return StoreStats(
            entities=n,
            bytes=size,
            oldest_as_of=None if oldest is None else from_us(oldest),
            newest_as_of=None if newest is None else from_us(newest),
        )

    def delete_spec(self, spec_name: str) -> None:
        client = self._redis()
        for batch in _chunks(self._members(spec_name), REDIS_CHUNK):
            self._run(client.unlink, *(self._key(spec_name, e) for e in batch))
        self._run(client.unlink, self._set_key(spec_name))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._append = None
            self._append_many = None
