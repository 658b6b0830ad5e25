"""Online store: exact round trips, append semantics and no lost updates across processes,
for both backends (SQLite file, real Redis on 127.0.0.1:6379)."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlops.online_store import (
    EntityState,
    OnlineStore,
    RedisOnlineStore,
    SQLiteOnlineStore,
    StoreUnavailable,
    make_store,
)
from tests.conftest import require_redis

REDIS_URL = "redis://127.0.0.1:6379/0"
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456)
FAR_PAST = dt.datetime(2000, 1, 1)


def _require_redis() -> None:
    require_redis()


def _open(kind: str, location: str, prefix: str) -> OnlineStore:
    if kind == "redis":
        return RedisOnlineStore(location, prefix=prefix)
    return make_store(location)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OnlineStore]:
    if request.param == "sqlite":
        s: OnlineStore = make_store(f"sqlite://{tmp_path / 'online' / 'store.db'}")
        yield s
        s.close()
        return
    _require_redis()
    import redis

    prefix = f"test-online-{uuid.uuid4().hex}"
    s = RedisOnlineStore(REDIS_URL, prefix=prefix)
    yield s
    s.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


def _location(s: OnlineStore) -> tuple[str, str, str]:
    """What a child process needs to open the same store on its own."""
    if isinstance(s, RedisOnlineStore):
        return "redis", s.url, s.prefix
    assert isinstance(s, SQLiteOnlineStore)
    return "sqlite", f"sqlite://{s.path}", ""


def _rows(n: int, start: dt.datetime = T0, step_s: int = 60) -> list[dict[str, object]]:
    return [
        {"ts": start + dt.timedelta(seconds=i * step_s), "x": i + 0.1, "tag": f"r{i}"}
        for i in range(n)
    ]


def test_round_trip_is_exact(store: OnlineStore) -> None:
    rows = [
        {"ts": T0, "a": 0.1 + 0.2, "b": None, "c": 'ä,"},{"ts":1', "d": 1e-300, "e": -0.0},
        {
            "ts": T0 + dt.timedelta(microseconds=1),
            "a": 1 / 3,
            "b": float("nan"),
            "c": "",
            "d": 1e300,
            "e": 2.5,
        },
    ]
    state = EntityState("m1", rows[-1]["ts"], rows)  # type: ignore[arg-type]
    assert store.write_states("s", [state]) == 1
    got = store.get_state("s", "m1")
    assert got is not None
    assert got.as_of == T0 + dt.timedelta(microseconds=1)
    assert got.rows[0] == {
        "ts": T0,
        "a": 0.30000000000000004,
        "b": None,
        "c": 'ä,"},{"ts":1',
        "d": 1e-300,
        "e": -0.0,
    }
    assert got.rows[1]["a"] == 1 / 3 and got.rows[1]["b"] is None and got.rows[1]["d"] == 1e300
    assert got.rows[1]["ts"].tzinfo is None
    assert store.get_state("s", "nope") is None
    assert store.get_state("other-spec", "m1") is None


def test_get_states_and_replace(store: OnlineStore) -> None:
    states = [EntityState(f"m{i}", T0 + dt.timedelta(minutes=2), _rows(3)) for i in range(5)]
    assert store.write_states("s", iter(states)) == 5
    got = store.get_states("s", ["m1", "m3", "missing", "m1"])
    assert set(got) == {"m1", "m3"}
    assert got["m3"].rows == _rows(3)
    assert store.get_states("s", []) == {}
    store.write_states("s", [EntityState("m1", T0, _rows(1))])
    replaced = store.get_state("s", "m1")
    assert replaced is not None and replaced.rows == _rows(1) and replaced.as_of == T0
    assert store.get_state("s", "m2") is not None  # entities not written are left alone


def test_write_states_batches_many(store: OnlineStore) -> None:
    n = 2500  # crosses the batch size of both backends
    states = (EntityState(f"m{i}", T0, [{"ts": T0, "x": float(i)}]) for i in range(n))
    assert store.write_states("s", states) == n
    got = store.get_states("s", [f"m{i}" for i in range(0, n, 7)])
    assert len(got) == len(range(0, n, 7))
    assert got["m2499"].rows[0]["x"] == 2499.0
    assert store.stats("s").entities == n


def test_append_orders_replaces_and_sets_as_of(store: OnlineStore) -> None:
    first = store.append_row("s", "m1", {"ts": T0, "x": 1.0}, keep_from=FAR_PAST)
    assert first.rows == [{"ts": T0, "x": 1.0}] and first.as_of == T0
    store.append_row("s", "m1", {"ts": T0 + dt.timedelta(minutes=2), "x": 3.0}, FAR_PAST)
    late = store.append_row("s", "m1", {"ts": T0 + dt.timedelta(minutes=1), "x": 2.0}, FAR_PAST)
    assert [r["x"] for r in late.rows] == [1.0, 2.0, 3.0]
    assert late.as_of == T0 + dt.timedelta(minutes=2)  # an out-of-order row is not the newest
    same = store.append_row("s", "m1", {"ts": T0, "x": 9.0, "y": "new"}, FAR_PAST)
    assert same.rows[0] == {"ts": T0, "x": 9.0, "y": "new"} and len(same.rows) == 3
    assert store.get_state("s", "m1") == same


def test_append_trims_with_keep_from_and_keep_last(store: OnlineStore) -> None:
    store.write_states("s", [EntityState("m1", T0 + dt.timedelta(minutes=9), _rows(10))])
    keep_from = T0 + dt.timedelta(minutes=6)
    new = {"ts": T0 + dt.timedelta(minutes=10), "x": 10.1, "tag": "r10"}
    state = store.append_row("s", "m1", new, keep_from=keep_from, keep_last=2)
    # rows at minutes 6..10 are inside the window, plus the 2 newest before it (4 and 5)
    assert [r["tag"] for r in state.rows] == ["r4", "r5", "r6", "r7", "r8", "r9", "r10"]
    assert state.as_of == new["ts"]
    far_future = T0 + dt.timedelta(days=1)
    state = store.append_row("s", "m1", {"ts": T0 + dt.timedelta(minutes=11)}, far_future)
    assert [r["ts"] for r in state.rows] == [T0 + dt.timedelta(minutes=11)]
    assert store.get_state("s", "m1") == state


def test_append_with_keep_last_zero_can_empty_an_entity(store: OnlineStore) -> None:
    state = store.append_row("s", "m1", {"ts": T0}, keep_from=T0 + dt.timedelta(1), keep_last=0)
    assert state.rows == [] and state.as_of == T0
    assert store.get_state("s", "m1") is None
    assert store.stats("s").entities == 0
    with pytest.raises(ValueError, match="keep_last"):
        store.append_row("s", "m1", {"ts": T0}, keep_from=T0, keep_last=-1)


def test_bad_rows_are_rejected_with_the_column(store: OnlineStore) -> None:
    with pytest.raises(ValueError, match="'ts' as a datetime"):
        store.append_row("s", "m1", {"x": 1.0}, keep_from=FAR_PAST)
    with pytest.raises(ValueError, match=r"column 'x'.*not finite"):
        store.write_states("s", [EntityState("m1", T0, [{"ts": T0, "x": float("inf")}])])
    with pytest.raises(ValueError, match=r"column 'x'.*list"):
        store.append_row("s", "m1", {"ts": T0, "x": [1]}, keep_from=FAR_PAST)


def test_stats_and_delete_spec(store: OnlineStore) -> None:
    empty = store.stats("s")
    assert (empty.entities, empty.bytes, empty.oldest_as_of, empty.newest_as_of) == (
        0,
        0,
        None,
        None,
    )
    store.write_states(
        "s", [EntityState(f"m{i}", T0 + dt.timedelta(hours=i), _rows(4)) for i in range(3)]
    )
    store.write_states("keep", [EntityState("m0", T0, _rows(1))])
    stats = store.stats("s")
    assert stats.entities == 3 and stats.bytes > 0
    assert stats.oldest_as_of == T0 and stats.newest_as_of == T0 + dt.timedelta(hours=2)
    store.delete_spec("s")
    assert store.stats("s").entities == 0
    assert store.get_states("s", ["m0", "m1", "m2"]) == {}
    assert store.get_state("keep", "m0") is not None  # other specs untouched


def _append_many(kind: str, location: str, prefix: str, entity: str, parity: int, start) -> None:
    """Child process: open the store from its URL, then append 200 interleaved rows."""
    store = _open(kind, location, prefix)
    start.wait()
    for i in range(200):
        ts = T0 + dt.timedelta(seconds=2 * i + parity)
        store.append_row("s", entity, {"ts": ts, "x": float(2 * i + parity)}, keep_from=FAR_PAST)
    store.close()


@pytest.mark.parametrize("same_entity", [True, False], ids=["same-entity", "two-entities"])
def test_concurrent_appends_lose_nothing(store: OnlineStore, same_entity: bool) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    entities = ["m1", "m1"] if same_entity else ["m1", "m2"]
    procs = [
        ctx.Process(target=_append_many, args=(*_location(store), entities[p], p, start))
        for p in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    if same_entity:
        state = store.get_state("s", "m1")
        assert state is not None
        assert [r["x"] for r in state.rows] == [float(i) for i in range(400)]
        assert state.as_of == T0 + dt.timedelta(seconds=399)
    else:
        for parity, entity in enumerate(entities):
            got = store.get_state("s", entity)
            assert got is not None
            assert [r["x"] for r in got.rows] == [float(2 * i + parity) for i in range(200)]


def _append_one(store: OnlineStore) -> None:
    store.append_row("s", "m1", {"ts": T0 + dt.timedelta(minutes=1), "x": 2.0}, FAR_PAST)


def test_forked_worker_reopens_its_connection(store: OnlineStore) -> None:
    """Servers fork workers after the parent has used the store: the child must not share
    the parent's connection."""
    store.append_row("s", "m1", {"ts": T0, "x": 1.0}, FAR_PAST)
    child = mp.get_context("fork").Process(target=_append_one, args=(store,))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    state = store.get_state("s", "m1")
    assert state is not None and [r["x"] for r in state.rows] == [1.0, 2.0]
    store.append_row("s", "m1", {"ts": T0 + dt.timedelta(minutes=2), "x": 3.0}, FAR_PAST)


def test_corrupt_payload_names_spec_and_entity(store: OnlineStore) -> None:
    store.write_states("s", [EntityState("m1", T0, _rows(2))])
    if isinstance(store, RedisOnlineStore):
        store._redis().hset(f"{store.prefix}:s:e:m1", "rows", b"{not json")
    else:
        assert isinstance(store, SQLiteOnlineStore)
        store._conn().execute("UPDATE online_state SET payload = x'7b6e6f'")
    with pytest.raises(ValueError, match="spec 's', entity 'm1'"):
        store.get_state("s", "m1")
    with pytest.raises(ValueError, match="spec 's', entity 'm1'"):
        store.append_row("s", "m1", {"ts": T0}, keep_from=FAR_PAST)


def test_make_store_dispatch(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b.db"
    by_url = make_store(f"sqlite://{db}")
    assert isinstance(by_url, SQLiteOnlineStore) and by_url.path == db
    assert not db.parent.exists()  # nothing is created until first use
    assert by_url.stats("s").entities == 0 and db.exists()
    by_url.close()
    assert isinstance(make_store(str(tmp_path / "plain.db")), SQLiteOnlineStore)
    redis_store = make_store("redis://127.0.0.1:6379/3")
    assert isinstance(redis_store, RedisOnlineStore) and redis_store.url.endswith("/3")
    for bad in ["postgres://h/db", "s3://bucket/x", "", "sqlite://relative.db"]:
        with pytest.raises(ValueError, match="sqlite:///"):
            make_store(bad)


def test_redis_down_raises_store_unavailable() -> None:
    url = "redis://127.0.0.1:6399/0?socket_connect_timeout=0.5&socket_timeout=0.5"
    down = make_store(url)
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:6399.*redis-server --port 6399"):
        down.get_state("s", "m1")
    with pytest.raises(StoreUnavailable):
        down.append_row("s", "m1", {"ts": T0}, keep_from=FAR_PAST)
    down.close()


def test_backends_agree_on_random_appends(tmp_path: Path) -> None:
    """The Lua script and the Python merge implement one rule: same inputs, same states."""
    import random

    _require_redis()
    rng = random.Random(7)
    sqlite_store = SQLiteOnlineStore(tmp_path / "s.db")
    redis_store = RedisOnlineStore(REDIS_URL, prefix=f"test-online-{uuid.uuid4().hex}")
    try:
        for _ in range(300):
            entity = rng.choice(["a", "b", "c"])
            ts = T0 + dt.timedelta(seconds=rng.randrange(60))
            row = {
                "ts": ts,
                "x": rng.random() * 10 ** rng.randrange(-5, 5),
                "s": rng.choice(["u", "}", None]),
            }
            keep_from = T0 + dt.timedelta(seconds=rng.randrange(-5, 40))
            keep_last = rng.randrange(0, 4)
            a = sqlite_store.append_row("s", entity, row, keep_from, keep_last)
            b = redis_store.append_row("s", entity, row, keep_from, keep_last)
            assert a == b
        for entity in "abc":
            assert sqlite_store.get_state("s", entity) == redis_store.get_state("s", entity)
    finally:
        redis_store.delete_spec("s")
        redis_store.close()
        sqlite_store.close()
