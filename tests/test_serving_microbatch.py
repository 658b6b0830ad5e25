"""Micro-batching (issue 17, item 3): concurrent /predict requests served as one batch.

1. A micro-batch answers exactly what one request at a time answers: the same scores,
   decisions, fallbacks and logged features per reading, the same feature-store states
   left behind, each request with its own request id, records and log lines.
2. Errors stay per request: a malformed body, a field out of range, an unknown entity
   under the `reject` policy, a corrupt state of one entity, a store that fails the batch
   only; each answered on its own while the others of the micro-batch are served; a store
   that is down answers every request 503 without being tried once per request.
3. The window: requests that queue while the thread is busy go together, at most
   `microbatch_max_size` at a time (a real uvicorn server, its thread held); a thread waits
   up to `microbatch_max_wait_ms` for as many requests as the last batch held, and not at
   all when requests come one at a time (serving.microbatch on its own, a real pool).

One module-scoped world: three days through the data job (the online state as of day 3's
end) and one xgboost version as the champion.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from mlops.inference_log import log_files, read_lines
from mlops.online_store import SQLiteOnlineStore, StoreUnavailable
from serving.app import Service
from serving.microbatch import Job, MicroBatcher
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
MACHINES = ["M0001", "M0002", "M0003", "M0004"]


World = ServedWorld


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return served_world(tmp_path_factory.mktemp("microbatch"))


def logged(world: World, name: str) -> list[dict[str, Any]]:
    lines, torn = read_lines(log_files(world.root / "logs" / name))
    assert torn == 0
    return lines


def job(body: Any, rid: str) -> Job:
    """A request as the event loop hands it to the pool (serving.microbatch)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Job(raw, None, None, 5, rid, time.perf_counter(), {})


def asks() -> list[tuple[str, Any]]:
    """(request id, body): single readings of 4 machines in time order (each machine
    several times), a request of three readings (one machine twice), an explained one."""
    rng = random.Random(17)
    out: list[tuple[str, Any]] = []
    for k in range(20):
        when = AFTER + dt.timedelta(minutes=7 * k)
        machine = rng.choice(MACHINES)
        out.append(
            (f"r{k}", reading(machine, when, vibration=round(1 + k / 20, 3), rpm=1400.0 + k))
        )
    when = AFTER + dt.timedelta(minutes=7 * 20)
    out.append(
        (
            "multi",
            {
                "records": [
                    reading("M0002", when, vibration=3.5),
                    reading("M0003", when),
                    reading("M0002", when + dt.timedelta(minutes=3), vibration=0.5),
                ]
            },
        )
    )
    out.append(("explained", {**reading("M0001", when + dt.timedelta(minutes=5)), "explain": True}))
    return out


# 1. A micro-batch = one request at a time ------------------------------------------------------


def test_a_micro_batch_answers_and_leaves_what_one_request_at_a_time_does(world, monkeypatch):
    requests = asks()
    single = ready_client(settings(world, "single", microbatch_max_size=1), monkeypatch)
    batched = ready_client(settings(world, "batched"), monkeypatch)
    try:
        one = []
        for rid, body in requests:
            resp = single.post("/predict", json=body, headers={"x-request-id": rid})
            assert resp.status_code == 200, resp.text
            one.append(resp.json())
        service: Service = batched.app.state.service
        calls: list[int] = []
        serve_batch = service.features.serve_batch

        def counted(readings):
            calls.append(len(readings))
            return serve_batch(readings)

        service.features.serve_batch = counted  # type: ignore[method-assign]
        answers = service.respond([job(body, rid) for rid, body in requests])  # what a thread does
        many = [json.loads(a.body) for a in answers]
        assert [a.status_code for a in answers] == [200] * len(requests), many
        assert [a.headers["x-request-id"] for a in answers] == [rid for rid, _ in requests]
        stores = {
            name: SQLiteOnlineStore(world.root / "stores" / f"{name}.db")
            for name in ("single", "batched")
        }
        states = {n: [s.get_state(NAME, m) for m in MACHINES] for n, s in stores.items()}
    finally:
        single.__exit__(None, None, None)
        batched.__exit__(None, None, None)
    assert calls == [sum(len(b["records"]) if "records" in b else 1 for _, b in requests)]  # one
    for (rid, _), a, b in zip(requests, one, many, strict=True):
        assert a["request_id"] == b["request_id"] == rid
        assert (a["model_version"], a["route"]) == (b["model_version"], b["route"])
        assert len(a["predictions"]) == len(b["predictions"])
        for x, y in zip(a["predictions"], b["predictions"], strict=True):
            assert y["request_id"] == rid
            assert abs(x["score"] - y["score"]) <= 1e-9, rid
            for k in ("record", "entity", "timestamp", "decision", "fallback"):
                assert x[k] == y[k], (rid, k)
            assert ("explanation" in x) == ("explanation" in y) == (rid == "explained")
    assert states["single"] == states["batched"]  # the same states left behind
    # Each request's own log lines (its id, its records), the same features logged.
    lines = {n: [ln for ln in logged(world, n) if ln["status"] == 200] for n in stores}
    key = [(ln["request_id"], ln["record"]) for ln in lines["single"]]
    assert key == [(ln["request_id"], ln["record"]) for ln in lines["batched"]]
    assert ("multi", 2) in key and len(key) == len(requests) + 2
    for a, b in zip(lines["single"], lines["batched"], strict=True):
        assert a["entity"] == b["entity"] and a["inputs"] == b["inputs"]
        for n, v in a["features"].items():
            u = b["features"][n]
            if isinstance(v, float) and isinstance(u, float):
                assert abs(v - u) <= 1e-9, n
            else:
                assert v == u, n


# 2. Errors stay per request ----------------------------------------------------------------------


def test_each_request_of_a_micro_batch_gets_its_own_error(world, monkeypatch):
    client = ready_client(settings(world, "errors"), monkeypatch)
    try:
        service: Service = client.app.state.service
        when = AFTER + dt.timedelta(minutes=1)
        jobs = [
            job(reading("M0001", when), "good-1"),
            job(b'{"machine_id": "M0002", "timestamp": ', "malformed"),
            job(reading("M0002", when, temperature=900.0), "out-of-range"),
            job(reading("M9999", when), "unknown"),  # no state under `reject`: the batch too
            job(reading("M0003", when), "good-2"),
            Job(None, ValueError("boom"), None, 5, "before-the-body", time.perf_counter(), {}),
        ]
        answers = {j.request_id: a for j, a in zip(jobs, service.respond(jobs), strict=True)}
        for rid, a in answers.items():
            assert a.headers["x-request-id"] == rid
        body = {rid: json.loads(a.body) for rid, a in answers.items()}
        assert answers["good-1"].status_code == answers["good-2"].status_code == 200
        assert body["good-1"]["predictions"][0]["entity"] == "M0001"
        assert body["good-2"]["predictions"][0]["entity"] == "M0003"
        assert (answers["malformed"].status_code, body["malformed"]["error"]) == (
            400,
            "malformed_json",
        )
        assert answers["out-of-range"].status_code == 422
        assert body["out-of-range"]["detail"][0]["field"] == "temperature"
        assert (answers["unknown"].status_code, body["unknown"]["error"]) == (422, "unknown_entity")
        assert answers["before-the-body"].status_code == 500
        # The state took the served readings only, in order.
        store = SQLiteOnlineStore(world.root / "stores" / "errors.db")
        assert store.get_state(NAME, "M0001").as_of == when
        assert store.get_state(NAME, "M0003").as_of == when
        assert store.get_state(NAME, "M0002").as_of < when
        assert store.get_state(NAME, "M9999") is None
        metrics = client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for ln in logged(world, "errors"):
        by_id.setdefault(ln["request_id"], []).append(ln)
    assert {rid: [ln["status"] for ln in lines] for rid, lines in by_id.items()} == {
        "good-1": [200],
        "malformed": [400],
        "out-of-range": [422],
        "unknown": [422],
        "good-2": [200],
        "before-the-body": [500],
    }
    reasons = {s.labels["reason"] for s in samples(metrics, "mlops_serving_rejections_total")}
    assert {"malformed_json", "max", "unknown_entity"} <= reasons


class Flaky:
    """The real store, whose read_states fails while `fail(entities)` says so."""

    def __init__(self, store: Any, fail):
        self.store, self.fail, self.reads = store, fail, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def read_states(self, spec_name: str, entities: list[str], known=None):
        self.reads += 1
        if self.fail(entities):
            raise StoreUnavailable("online store: injected failure")
        return self.store.read_states(spec_name, entities, known)


def test_a_batch_the_store_fails_is_served_one_request_at_a_time(world, monkeypatch):
    client = ready_client(settings(world, "fallback"), monkeypatch)
    try:
        service: Service = client.app.state.service
        flaky = Flaky(service.features.store, lambda entities: len(entities) > 1)
        service.features.store = flaky  # type: ignore[assignment]
        when = AFTER + dt.timedelta(minutes=2)
        jobs = [job(reading(m, when), f"fb-{m}") for m in MACHINES]
        answers = service.respond(jobs)
        assert [a.status_code for a in answers] == [200] * 4, [a.body for a in answers]
        assert flaky.reads == 1 + 4  # the batch, then each request
        # A corrupt state of one entity fails that entity's request only.
        flaky.fail = lambda entities: False
        raw = SQLiteOnlineStore(world.root / "stores" / "fallback.db")
        raw._conn().execute("UPDATE online_state SET payload = x'7b6e6f' WHERE entity = 'M0002'")
        later = when + dt.timedelta(minutes=5)
        answers = service.respond([job(reading(m, later), f"c-{m}") for m in MACHINES])
        assert [a.status_code for a in answers] == [200, 500, 200, 200]
        assert raw.get_state(NAME, "M0003").as_of == later
        # A store that is down: every request answered 503, the store tried twice, not 5x.
        flaky.fail, flaky.reads = (lambda entities: True), 0
        down = service.respond(
            [job(reading(m, later + dt.timedelta(minutes=1)), m) for m in MACHINES]
        )
        assert [a.status_code for a in down] == [503] * 4
        assert {json.loads(a.body)["error"] for a in down} == {"feature_store_unavailable"}
        assert [a.headers["x-request-id"] for a in down] == MACHINES
        assert flaky.reads == 2
        metrics = client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)
    (n,) = samples(metrics, "mlops_serving_feature_store_unavailable_total")
    assert n.value == 4
    statuses = [ln["status"] for ln in logged(world, "fallback") if ln["request_id"] in MACHINES]
    assert sorted(statuses) == [503] * 4


# 3. The window -----------------------------------------------------------------------------------


def test_requests_queued_behind_a_busy_thread_go_together_up_to_the_max_size(world, monkeypatch):
    monkeypatch.delenv("MLOPS_SERVE_TOKEN", raising=False)
    release = threading.Event()
    s = settings(world, "window", threads=1, max_inflight=64, microbatch_max_size=4)
    with ThreadServer(s) as srv:
        service: Service = srv.app.state.service
        original = service.predict_batch
        sizes: list[list[str]] = []

        def held(jobs: list[Job]) -> Any:
            sizes.append([j.request_id for j in jobs])
            if len(sizes) == 1:
                release.wait(30)  # the thread is busy with the first request
            return original(jobs)

        service.predict_batch = held  # type: ignore[method-assign]
        answers: dict[str, httpx.Response] = {}

        def post(rid: str, minute: int) -> None:
            body = reading(MACHINES[minute % 4], AFTER + dt.timedelta(minutes=minute))
            answers[rid] = httpx.post(
                srv.url + "/predict", json=body, headers={"x-request-id": rid}, timeout=30
            )

        first = threading.Thread(target=post, args=("q0", 0))
        first.start()
        wait(lambda: len(sizes) == 1, 10, "the first request to take the thread")
        rest = [threading.Thread(target=post, args=(f"q{k}", k)) for k in range(1, 11)]
        for t in rest:
            t.start()

        def inflight() -> float:
            text = httpx.get(srv.url + "/metrics", timeout=5).text
            return samples(text, "mlops_serving_inflight")[0].value

        wait(lambda: inflight() == 11, 10, "ten requests admitted behind the first")
        wait(lambda: service.batcher.waiting == 10, 10, "the ten queued for the thread")
        release.set()
        for t in (first, *rest):
            t.join(30)
    assert [len(b) for b in sizes] == [1, 4, 4, 2], sizes  # max size 4
    assert sorted(rid for b in sizes[1:] for rid in b) == sorted(f"q{k}" for k in range(1, 11))
    for rid, resp in answers.items():
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-request-id"] == rid
        assert resp.json()["predictions"][0]["request_id"] == rid
    lines = logged(world, "window")
    assert sorted(ln["request_id"] for ln in lines) == sorted(answers)


def _batcher(max_size: int, max_wait_s: float):
    """A batcher on a one-thread pool whose `serve` notes each batch's request ids."""
    served: list[list[str]] = []

    def serve(jobs: list[Job]) -> list[str]:
        served.append([j.request_id for j in jobs])
        return [j.request_id for j in jobs]

    pool = ThreadPoolExecutor(1)
    return MicroBatcher(serve, pool, 1, max_size, max_wait_s), served, pool


def _submit(batcher: MicroBatcher, rid: str) -> asyncio.Future[Any]:
    return asyncio.ensure_future(
        batcher.submit(Job(b"", None, None, 5, rid, time.perf_counter(), {}))
    )


async def _queued(batcher: MicroBatcher, pool: ThreadPoolExecutor, rids: list[str]) -> list:
    """`rids` submitted while the pool's one thread is busy, so they all wait in the queue;
    then the thread is freed. Their answers."""
    gate = threading.Event()
    pool.submit(gate.wait, 30)
    tasks = [_submit(batcher, rid) for rid in rids]
    await asyncio.sleep(0)  # each task has queued its request
    assert batcher.waiting == len(rids)
    gate.set()
    return await asyncio.gather(*tasks)


def test_a_thread_waits_up_to_the_max_wait_for_as_many_requests_as_the_last_batch_held():
    wait_s = 0.3

    async def scenario() -> dict[str, Any]:
        batcher, served, pool = _batcher(8, wait_s)
        try:
            # One at a time: no batch held more, so nothing is waited for.
            t = time.perf_counter()
            assert await _submit(batcher, "alone") == "alone"
            alone_s = time.perf_counter() - t
            assert await _queued(batcher, pool, ["t0", "t1", "t2"]) == ["t0", "t1", "t2"]
            # After a batch of three, one request waits for two more: a second joins while
            # it waits, then the window closes without a third.
            t = time.perf_counter()
            first = _submit(batcher, "w0")
            await asyncio.sleep(wait_s / 3)
            assert await _submit(batcher, "w1") == "w1"
            assert await first == "w0"
            window_s = time.perf_counter() - t
            return {"alone_s": alone_s, "window_s": window_s, "batches": served}
        finally:
            pool.shutdown(wait=True)

    r = asyncio.run(scenario())
    assert r["batches"] == [["alone"], ["t0", "t1", "t2"], ["w0", "w1"]]
    assert r["alone_s"] < wait_s / 2  # not held back
    assert wait_s * 0.9 <= r["window_s"] < wait_s * 3  # held for the window, then served


def test_a_batch_never_exceeds_the_max_size_and_a_full_one_never_waits():
    wait_s = 0.5

    async def scenario() -> tuple[list[list[str]], float, float]:
        batcher, served, pool = _batcher(3, wait_s)
        try:
            t = time.perf_counter()
            await _queued(batcher, pool, [f"a{k}" for k in range(6)])
            full_s = time.perf_counter() - t
            t = time.perf_counter()
            await _queued(batcher, pool, [f"b{k}" for k in range(4)])
            short_s = time.perf_counter() - t
            return served, full_s, short_s
        finally:
            pool.shutdown(wait=True)

    batches, full_s, short_s = asyncio.run(scenario())
    assert batches == [["a0", "a1", "a2"], ["a3", "a4", "a5"], ["b0", "b1", "b2"], ["b3"]]
    assert full_s < wait_s / 2  # full batches go at once
    # The last one, alone after batches of three, waited for the window (from its arrival).
    assert wait_s * 0.9 <= short_s < wait_s * 3, short_s


def test_request_ids_are_random_128_bit_hex_without_a_syscall_each(monkeypatch):
    """os.urandom releases the GIL (a wait of up to 5 ms on a busy worker): it seeds the
    generator once per process and thread, not once per id."""
    import os

    import serving.app as app_module

    calls = []
    real = os.urandom
    monkeypatch.setattr(app_module.os, "urandom", lambda n: calls.append(n) or real(n))
    monkeypatch.setattr(app_module, "_ids", (-1, None))  # as in a freshly forked worker
    ids = [app_module.new_request_id() for _ in range(2000)]
    assert len(calls) == 1
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(app_module.REQUEST_ID_RE.match(i) for i in ids)
