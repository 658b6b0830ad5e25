"""Vectorized batches and a bounded tail (issue 17, items 1 and 4).

1. A batch is one computation over the real stores (SQLite, and the real local Redis):
   its features, fallbacks and the states it leaves equal one request per reading in
   order, repeated entities included (a batch's earlier readings are history for its
   later ones); through the service, its scores equal the single-row scores; and it costs
   one store read and one store append per request, counted by a thin wrapper around the
   real store.
2. The admission limit: with the worker's threads busy (a handler blocked on an Event, in
   a real uvicorn server), one more /predict is answered 503 at once with Retry-After and
   counted, while /health/* and /metrics keep answering 200 (the event loop is free).

One module-scoped world: three days through the data job (the online state as of day 3's
end) and one xgboost version as the champion.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlops import online
from mlops.inference_log import log_files, read_lines
from mlops.online_store import (
    Append,
    EntityState,
    OnlineStore,
    RedisOnlineStore,
    SQLiteOnlineStore,
    StoredState,
    encode_state,
    merge_row,
    raw_row,
)
from mlops.spec import load_spec
from tests.conftest import REPO, require_redis
from tests.serving_support import (
    ServedWorld,
    ThreadServer,
    reading,
    ready_client,
    samples,
    served_world,
    settings,
    wait,
)

NAME = "machine_failure"
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
AFTER = dt.datetime(2026, 1, 4, 0, 30)  # just after every machine's state (day 3's end)
SPEC = load_spec(REPO / "specs" / f"{NAME}.yaml")
T0 = dt.datetime(2026, 1, 3)


# 1a. Batch = one request per reading, on the stores alone -------------------------------------


class Counting:
    """The real store, with every call counted by method name (a round trip each)."""

    def __init__(self, store: OnlineStore):
        self.store = store
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


def _open(kind: str, tmp_path: Path, name: str) -> OnlineStore:
    if kind == "redis":
        require_redis()
        return RedisOnlineStore(prefix=f"test-batch-{uuid.uuid4().hex[:8]}-{name}")
    return SQLiteOnlineStore(tmp_path / f"{name}.db")


def _reading(rng: random.Random, machine: str, when: dt.datetime) -> dict[str, Any]:
    return {
        "timestamp": when,
        "machine_id": machine,
        "machine_type": rng.choice("ABC"),
        "firmware": "1.0",
        "temperature": rng.choice([None, rng.uniform(40, 90)]),
        "vibration": rng.uniform(0, 5),
        "pressure": rng.uniform(90, 130),
        "rpm": rng.uniform(1000, 2000),
        "voltage": rng.uniform(200, 240),
    }


def _states(rng: random.Random) -> list[EntityState]:
    out = []
    for m in ("M1", "M2", "M3"):
        rows, t = [], T0 - dt.timedelta(hours=30)
        while t < T0:
            rows.append(online.state_row(SPEC, _reading(rng, m, t)))
            t += dt.timedelta(minutes=rng.choice([7, 30, 60, 90]))
        out.append(EntityState(m, rows[-1]["ts"], rows))
    return out


def _batch(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """Readings of few machines (so they repeat), mostly in time order, with some out of
    order (within and beyond the window), some at the same time, some a day late (stale)
    and an unknown machine."""
    out, t = [], T0
    for _ in range(rng.randrange(2, 25)):
        m = rng.choice(["M1", "M2", "M3", "M9"])
        step = rng.choice([-400, -60, -5, 0, 0, 3, 10, 45, 2000])
        when = t + dt.timedelta(minutes=step)
        if rng.random() < 0.7:
            t = when
        out.append((m, _reading(rng, m, when)))
    return out


def _same(a: online.OnlineResult, b: online.OnlineResult) -> float:
    assert (a.entity, a.as_of, a.fallback, a.fallback_code) == (
        b.entity,
        b.as_of,
        b.fallback,
        b.fallback_code,
    )
    assert list(a.features) == list(b.features)
    worst = 0.0
    for n, v in a.features.items():
        u = b.features[n]
        if v is None or u is None or isinstance(v, str):
            assert v == u, (n, v, u)
        else:
            worst = max(worst, abs(v - u))
    return worst


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_batch_equals_one_request_per_reading_in_order(kind, tmp_path):
    rng = random.Random(17)
    worst, repeated = 0.0, 0
    for trial in range(30):
        states = _states(rng)
        readings = _batch(rng)
        repeated += len(readings) - len({m for m, _ in readings})
        policy = "reject" if trial % 3 == 0 else "reading_only"
        one_by_one, batched = _open(kind, tmp_path, f"a{trial}"), _open(kind, tmp_path, f"b{trial}")
        try:
            for s in (one_by_one, batched):
                s.write_states(NAME, states)
            single = online.OnlineFeatures(SPEC, one_by_one, fallback=policy)
            want: list[Any] = []
            for m, r in readings:
                try:
                    want.append(single.get(m, r))
                except online.FeatureRejected as e:
                    want.append(e)
            got = online.OnlineFeatures(SPEC, batched, fallback=policy).get_many(readings)
            for w, g in zip(want, got, strict=True):
                if isinstance(w, online.FeatureRejected):
                    assert isinstance(g, online.FeatureRejected) and str(g) == str(w)
                else:
                    assert isinstance(g, online.OnlineResult), g
                    worst = max(worst, _same(w, g))
            for m in ("M1", "M2", "M3", "M9"):  # the same states left behind
                assert one_by_one.get_state(NAME, m) == batched.get_state(NAME, m), m
        finally:
            for s in (one_by_one, batched):
                s.delete_spec(NAME)
                s.close()
    assert repeated > 100  # the batches did repeat machines
    assert worst <= 1e-9


def test_a_rejected_reading_rejects_the_whole_batch_with_nothing_appended(tmp_path):
    """Under `reject`, the second reading of M1 is more than the window before the first:
    served one at a time, the first would be appended; in one batch, neither is."""
    store = SQLiteOnlineStore(tmp_path / "s.db")
    rng = random.Random(3)
    store.write_states(NAME, _states(rng))
    before = store.get_state(NAME, "M1")
    features = online.OnlineFeatures(SPEC, store, fallback="reject")
    late = T0 + dt.timedelta(days=0, hours=1)
    batch = [
        ("M2", _reading(rng, "M2", late)),
        ("M1", _reading(rng, "M1", late)),
        ("M1", _reading(rng, "M1", late - dt.timedelta(hours=30))),
    ]
    with pytest.raises(online.BatchRejected) as e:
        features.serve_batch(batch)
    assert [(i, r.code) for i, r in e.value.rejected] == [(2, online.OUT_OF_ORDER)]
    assert store.get_state(NAME, "M1") == before  # nothing appended
    assert store.get_state(NAME, "M2").as_of < late


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_worker_reuses_the_state_it_wrote_until_another_worker_changes_it(
    kind, tmp_path, monkeypatch
):
    """Two workers (each its own OnlineFeatures and connection) serve one machine in turn.
    A worker's next read of a state it wrote itself decodes nothing; once the other one
    has appended, the payload differs and is decoded, so no reading is lost: every answer
    equals a cacheless worker's over the same stored state."""
    from mlops import online_store

    rng = random.Random(11)
    first = _open(kind, tmp_path, "shared")
    first.write_states(NAME, _states(rng))
    second = first if kind == "redis" else SQLiteOnlineStore(tmp_path / "shared.db")
    a = online.OnlineFeatures(SPEC, first, fallback="reading_only")
    b = online.OnlineFeatures(SPEC, second, fallback="reading_only")
    plain = online.OnlineFeatures(SPEC, second, fallback="reading_only", cache_bytes=0)
    decoded: list[str] = []
    real = online_store._decode_raw

    def counting(spec_name: str, entity: str, payload: Any) -> Any:
        decoded.append(entity)
        return real(spec_name, entity, payload)

    monkeypatch.setattr(online_store, "_decode_raw", counting)
    turns = ["a", "a", "a", "b", "a", "b", "b", "a"]
    for k, who in enumerate(turns):
        r = _reading(rng, "M1", T0 + dt.timedelta(minutes=5 * (k + 1)))
        expected = plain.get("M1", dict(r), append=False)
        decoded.clear()
        got = (a if who == "a" else b).get("M1", r)
        _same(got, expected)
        # Decoded unless this worker wrote the stored state itself (a reuse).
        wrote_last = k > 0 and turns[k - 1] == who
        assert decoded == ([] if wrote_last else ["M1"]), (k, who, decoded)
    assert len(a.cache.states) == 1 and a.cache.size == len(a.cache.states["M1"].payload)


def test_the_state_cache_holds_at_most_its_bytes_least_recently_used_out():
    cache = online.StateCache(limit=100)
    states = [StoredState(f"E{k}", k, [], b"x" * 40) for k in range(4)]
    cache.put(states[:2])
    cache.put([states[0]])  # E0 used again: E1 is now the oldest
    cache.put(states[2:3])
    assert list(cache.states) == ["E0", "E2"] and cache.size == 80
    cache.put([StoredState("big", 0, [], b"y" * 101)])  # larger than the cache: not kept
    assert list(cache.states) == ["E0", "E2"] and cache.size == 80


def test_one_read_and_one_append_per_batch_whatever_its_size(tmp_path):
    store = Counting(SQLiteOnlineStore(tmp_path / "s.db"))
    rng = random.Random(5)
    store.write_states(NAME, _states(rng))
    features = online.OnlineFeatures(SPEC, store, fallback="reading_only")  # type: ignore[arg-type]
    for n in (1, 40):
        store.calls.clear()
        readings = [
            (m, _reading(rng, m, T0 + dt.timedelta(minutes=n + k)))
            for k, m in enumerate(rng.choice(["M1", "M2", "M3", "M9"]) for _ in range(n))
        ]
        if n == 1:
            features.get(*readings[0])
        else:
            features.serve_batch(readings)
        assert store.calls == {"read_states": 1, "append_rows": 1}, (n, store.calls)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_an_append_over_a_state_changed_since_it_was_read_loses_nothing(kind, tmp_path):
    """append_rows writes the caller's state only while the stored one is what it read;
    after another writer, it merges the caller's rows into the current state instead."""
    store = _open(kind, tmp_path, "cas")
    try:
        t = T0
        store.write_states(NAME, [EntityState("m", t, [{"ts": t, "x": 1.0}])])
        seen = store.read_states(NAME, ["m"])["m"]
        assert isinstance(seen, StoredState)
        store.append_row(NAME, "m", {"ts": t + dt.timedelta(minutes=1), "x": 2.0}, T0)  # another
        mine = raw_row({"ts": t + dt.timedelta(minutes=2), "x": 3.0})
        keep = seen.rows[0]["ts"]
        result = merge_row(seen.rows, mine, keep, 1)
        payload = encode_state(result, seen)
        assert payload == raw_json(result)  # the stored rows' bytes reused, the same payload
        new = Append("m", [(mine, keep)], 1, seen.payload, payload, result[-1]["ts"])
        fresh = raw_row({"ts": t, "x": 9.0})
        created = Append("n", [(fresh, keep)], 1, None, encode_state([fresh], None), fresh["ts"])
        assert store.append_rows(NAME, [new, created]) == 1  # one merged, one written as is
        assert [r["x"] for r in store.get_state(NAME, "m").rows] == [1.0, 2.0, 3.0]
        assert [r["x"] for r in store.get_state(NAME, "n").rows] == [9.0]
        # Unchanged since read: written as computed (here, deliberately unlike a merge).
        seen = store.read_states(NAME, ["m"])["m"]
        odd = raw_row({"ts": t + dt.timedelta(minutes=5), "x": 5.0})
        assert store.append_rows(NAME, [Append("m", [(odd, keep)], 1, seen.payload, raw_json([odd]),
                                               odd["ts"])]) == 0  # fmt: skip
        assert [r["x"] for r in store.get_state(NAME, "m").rows] == [5.0]
    finally:
        store.delete_spec(NAME)
        store.close()


def raw_json(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode()


# The service -----------------------------------------------------------------------------------


World = ServedWorld


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return served_world(tmp_path_factory.mktemp("batch"))


def _readings() -> list[dict[str, Any]]:
    """Readings of 4 machines (each several times, in time order) and one a minute apart."""
    rng = random.Random(11)
    out = []
    for k in range(24):
        machine = f"M000{1 + rng.randrange(4)}"
        when = AFTER + dt.timedelta(minutes=7 * k)
        out.append(reading(machine, when, vibration=round(1.0 + k / 20, 3), rpm=1400.0 + k))
    return out


def test_served_batch_equals_single_rows_with_one_store_read_and_append(world, monkeypatch):
    readings = _readings()
    single = ready_client(settings(world, "single"), monkeypatch)
    batch = ready_client(settings(world, "batch"), monkeypatch)
    try:
        one = []
        for r in readings:
            resp = single.post("/predict", json=r)
            assert resp.status_code == 200, resp.text
            one.append(resp.json()["predictions"][0])
        service = batch.app.state.service
        counting = service.features.store = Counting(service.features.store)
        resp = batch.post("/predict", json={"records": readings})
        assert resp.status_code == 200, resp.text
        many = resp.json()["predictions"]
        calls = dict(counting.calls)
    finally:
        single.__exit__(None, None, None)
        batch.__exit__(None, None, None)
    assert calls == {"read_states": 1, "append_rows": 1}, calls
    assert len(many) == len(one) == len(readings)
    for i, (a, b) in enumerate(zip(one, many, strict=True)):
        assert b["record"] == i and (a["entity"], a["timestamp"]) == (b["entity"], b["timestamp"])
        assert a["fallback"] is None and b["fallback"] is None
        assert abs(a["score"] - b["score"]) <= 1e-9 and a["decision"] == b["decision"], i
    # The features logged for each reading agree too (the request log is one write).
    logged = {}
    for name in ("single", "batch"):
        lines, torn = read_lines(log_files(world.root / "logs" / name))
        assert torn == 0
        logged[name] = [ln["features"] for ln in lines if ln.get("status") == 200]
    assert len(logged["single"]) == len(logged["batch"]) == len(readings)
    for a, b in zip(logged["single"], logged["batch"], strict=True):
        assert a.keys() == b.keys()
        for n in a:
            if isinstance(a[n], float) and isinstance(b[n], float):
                assert abs(a[n] - b[n]) <= 1e-9, n
            else:
                assert a[n] == b[n], n


# 2. Admission ----------------------------------------------------------------------------------


def test_admission_limit_answers_503_at_once_while_health_stays_200(world, monkeypatch):
    monkeypatch.delenv("MLOPS_SERVE_TOKEN", raising=False)
    release = threading.Event()
    with ThreadServer(settings(world, "admission", threads=1, max_inflight=2)) as srv:
        service = srv.app.state.service
        original = service.predict_batch

        def blocked(*args: Any) -> Any:  # the worker's thread is busy until released
            release.wait(30)
            return original(*args)

        service.predict_batch = blocked
        answers: list[httpx.Response] = []

        def post(minute: int) -> None:
            body = reading("M0001", AFTER + dt.timedelta(minutes=minute))
            answers.append(httpx.post(srv.url + "/predict", json=body, timeout=30))

        held = [threading.Thread(target=post, args=(k,)) for k in (1, 2)]
        try:
            for t in held:  # one runs (blocked), one waits for the thread: the limit
                t.start()

            def inflight() -> float:
                text = httpx.get(srv.url + "/metrics", timeout=5).text
                return samples(text, "mlops_serving_inflight")[0].value

            wait(lambda: inflight() == 2, 10, "two requests in flight")
            t = time.perf_counter()
            shed = httpx.post(
                srv.url + "/predict",
                json=reading("M0001", AFTER + dt.timedelta(minutes=3)),
                headers={"x-request-id": "over-the-limit"},
                timeout=5,
            )
            shed_s = time.perf_counter() - t
            # The event loop is free while the thread is busy: health and metrics answer.
            t = time.perf_counter()
            live = httpx.get(srv.url + "/health/live", timeout=5)
            ready = httpx.get(srv.url + "/health/ready", timeout=5)
            metrics = httpx.get(srv.url + "/metrics", timeout=5)
            health_s = time.perf_counter() - t
            assert not answers  # still held
        finally:
            release.set()
            for t in held:
                t.join(30)
        after = httpx.post(
            srv.url + "/predict", json=reading("M0001", AFTER + dt.timedelta(minutes=4)), timeout=30
        )
        final = httpx.get(srv.url + "/metrics", timeout=5).text
    assert shed.status_code == 503, shed.text
    assert shed.headers["retry-after"] == "1"
    assert shed.headers["x-request-id"] == "over-the-limit"
    body = shed.json()
    assert body["error"] == "overloaded" and body["request_id"] == "over-the-limit"
    assert "--max-inflight" in body["message"] and "retry after 1 s" in body["message"]
    assert shed_s < 1.0, shed_s  # at once, not after the held requests
    assert live.status_code == ready.status_code == metrics.status_code == 200
    assert health_s < 1.0, health_s
    (n,) = samples(metrics.text, "mlops_serving_shed_total")
    assert n.value == 1
    (c,) = samples(metrics.text, "mlops_serving_requests_total", endpoint="/predict", status="503")
    assert c.value == 1
    # The held requests were served once released, and the limit admits again.
    assert sorted(a.status_code for a in answers) == [200, 200], [a.text for a in answers]
    assert after.status_code == 200, after.text
    (n,) = samples(final, "mlops_serving_shed_total")
    assert n.value == 1
    (count,) = samples(final, "mlops_serving_request_duration_seconds_count", endpoint="/predict")
    assert count.value == 3  # the admitted ones: the refusal is not in the histogram
    assert samples(final, "mlops_serving_inflight")[0].value == 0


# A user's own shape: column labels, no entity (every reading is the one series "all"), so
# each reading of a batch is history for the next ones.
NO_ENTITY_SPEC = """
name: meter
source: {path: incoming, format: csv, file_pattern: "m_{date}.csv", timestamp_column: ts,
  start_date: 2026-05-01}
schema:
  columns:
    - {name: ts, type: timestamp}
    - {name: load, type: float}
    - {name: temp, type: float}
    - {name: y, type: int}
labels: {kind: column, column: y, name: target, maturity: 0h}
features:
  lookback_days: 1
  passthrough: [load, temp]
  aggregates: [{columns: [load], functions: [mean, max], windows: [6h]}]
  transforms: [{name: load_delta, kind: diff, column: load}]
model:
  candidates: [{estimator: logistic_regression}]
"""


def test_a_batch_without_an_entity_equals_one_request_per_reading(tmp_path):
    from mlops.spec import load_spec

    (tmp_path / "meter.yaml").write_text(NO_ENTITY_SPEC)
    spec = load_spec(tmp_path / "meter.yaml")
    rng = random.Random(5)
    t0 = dt.datetime(2026, 5, 3, tzinfo=dt.UTC)

    def reading(when: dt.datetime) -> dict[str, Any]:
        return {"ts": when, "load": rng.uniform(0, 10), "temp": rng.uniform(10, 30)}

    history = [online.state_row(spec, reading(t0 - dt.timedelta(hours=h))) for h in (9, 5, 2)]
    steps = [0, 20, 20, -30, 0, 45, 400, -2000, 15]  # minutes: in order, late, same time
    readings, t = [], t0
    for step in steps:
        t += dt.timedelta(minutes=step)
        readings.append(("all", reading(t)))
    one_by_one, batched = (SQLiteOnlineStore(tmp_path / f"{n}.db") for n in "ab")
    for s in (one_by_one, batched):
        s.write_states(spec.name, [EntityState("all", history[-1]["ts"], history)])
    single = online.OnlineFeatures(spec, one_by_one, fallback="reading_only")
    want = [single.get(e, r) for e, r in readings]
    got = online.OnlineFeatures(spec, batched, fallback="reading_only").get_many(readings)
    assert max(_same(w, g) for w, g in zip(want, got, strict=True)) <= 1e-9
    assert one_by_one.get_state(spec.name, "all") == batched.get_state(spec.name, "all")
    assert got[1].features["load_mean_6h"] != got[0].features["load_mean_6h"]  # history used
