"""The online service's hardening (issue: hardening, items 12-15), against real apps over a
real MLflow SQLite registry, a real online store (SQLite) and a trained xgboost champion.

12. Timestamps: year 1, year 9999, before 1970, and readings older than the entity's state
    by more than the feature window: a 422 with a code, or scored and flagged under
    `features.online_fallback: reading_only`; never a 500, never unflagged.
13. A version refused for a transient cause (its artifacts missing) is retried with backoff:
    503 with the missing path while they are away, 200 once they are back, no restart.
14. The latency histogram includes the time a request waits for the event loop: a real
    uvicorn server under concurrent slow requests.
15. /openapi.json is generated from the spec's schema, and schemathesis finds no 5xx and
    no response that breaks the document.

One module-scoped world: three days through the data job (the online state as of day 3's
end), one xgboost version as the champion.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from mlops import registry, training
from mlops.spec import load_spec
from serving.app import create_app
from serving.settings import ServeSettings
from tests.conftest import embedded_spec_text, make_project, small_data
from tests.serving_support import reading, samples, training_frame, variant, wait

NAME = "machine_failure"
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
STATE_DAY = dt.datetime(2026, 1, 3, 12)  # inside the state every machine has


@dataclass
class World:
    root: Path
    uri: str
    arts: Path
    version: int


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hardening")
    p = make_project(root, with_mlflow=True)
    small_data(p, days=3, machines=4, seed=5)
    for day in DAYS:
        p.run_day(day)  # features and the online state as of the day's end
    frame = training_frame(p.lake, DAYS)
    arts = root / ".mlops" / "mlartifacts"
    spec = load_spec(variant(root, "xgboost", {"n_estimators": 20, "max_depth": 3}))
    lineage = {"training_set_hash": "0" * 64, "training_partitions": [DAYS[0], DAYS[-1]]}
    xgb = training.train_candidate(spec, frame, lineage, p.tracking_uri, str(arts), trials=1)
    registry.set_alias(p.tracking_uri, NAME, registry.CHAMPION, xgb.version)
    (root / "specs" / "reading_only").mkdir()
    (root / "specs" / "reading_only" / f"{NAME}.yaml").write_text(
        embedded_spec_text(
            ("  lookback_days: 1\n", "  lookback_days: 1\n  online_fallback: reading_only\n")
        )
    )
    return World(root, p.tracking_uri, arts, xgb.version)


def serve_settings(world: World, log: str, spec: str = f"{NAME}.yaml", **kw: Any) -> ServeSettings:
    base = {
        "spec_path": str(world.root / "specs" / spec),
        "tracking_uri": world.uri,
        "store_url": f"sqlite:///{world.root / '.mlops' / 'online.db'}",
        "log_dir": str(world.root / "logs" / log),
        "poll_interval_s": 0.2,
    }
    return ServeSettings(**{**base, **kw})


def ready_client(s: ServeSettings) -> TestClient:
    """The app in this process (its lifespan runs: the poller loads the champion)."""
    client = TestClient(create_app(s), raise_server_exceptions=False)
    client.__enter__()
    wait(lambda: client.get("/health/ready").status_code == 200, 60, "the champion to load")
    return client


# 12. Timestamps --------------------------------------------------------------------------------


EXTREMES = [
    ("year 1", "0001-01-01T00:00:00", "min"),
    ("before 1970", "1969-12-31T23:59:59", "min"),
    ("year 1 with an offset", "0001-01-01T00:00:00+01:00", "type"),
    ("year 9999", "9999-12-31T23:59:59", "max"),
    ("year 9999 at UTC-1", "9999-12-31T23:59:59-01:00", "type"),
    ("next year", "2100-01-01T00:00:00", "max"),
]


@pytest.mark.parametrize("spec", [f"{NAME}.yaml", f"reading_only/{NAME}.yaml"])
def test_extreme_timestamps_are_a_422_with_a_code_never_a_500(world, spec):
    client = ready_client(serve_settings(world, "extremes", spec))
    try:
        for what, ts, code in EXTREMES:
            for machine in ("M0001", "M9999"):  # a known entity and an unknown one
                r = client.post("/predict", json=reading(machine, ts))
                assert r.status_code == 422, (what, machine, r.status_code, r.text)
                (d,) = r.json()["detail"]
                assert (d["field"], d["code"]) == ("timestamp", code), (what, d)
                assert ts[:4] in d["reason"] or "out of range" in d["reason"], d
        metrics = client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)
    assert not samples(metrics, "mlops_serving_requests_total", status="500")


def test_a_reading_older_than_the_state_is_rejected_with_a_code(world):
    client = ready_client(serve_settings(world, "old_reject"))
    try:
        r = client.post("/predict", json=reading("M0001", "1970-01-02T00:00:00"))
        ok = client.post("/predict", json=reading("M0001", STATE_DAY))  # within the window
    finally:
        client.__exit__(None, None, None)
    assert r.status_code == 422, r.text
    (d,) = r.json()["detail"]
    assert (d["field"], d["code"]) == ("machine_id", "out_of_order"), d
    assert "out of order" in d["reason"] and "1970-01-02" in d["reason"]
    assert "in time order" in r.json()["message"]
    assert ok.status_code == 200 and ok.json()["predictions"][0]["fallback"] is None


def test_a_reading_older_than_the_state_is_flagged_under_reading_only(world):
    client = ready_client(serve_settings(world, "old_flag", f"reading_only/{NAME}.yaml"))
    try:
        r = client.post("/predict", json=reading("M0002", "1970-01-02T00:00:00"))
        after = client.post("/predict", json=reading("M0002", STATE_DAY))
        metrics = client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert p["fallback"] and p["fallback"].startswith("out of order"), p
    (n,) = samples(metrics, "mlops_serving_feature_fallbacks_total", reason="out_of_order")
    assert n.value == 1
    # The old reading was not appended: the next reading still has its history.
    assert after.status_code == 200 and after.json()["predictions"][0]["fallback"] is None


# 13. A transient refusal is retried ------------------------------------------------------------


def test_missing_artifacts_are_retried_with_backoff_until_they_come_back(world):
    away = world.arts.with_name("mlartifacts.away")
    shutil.move(world.arts, away)
    try:
        client = TestClient(
            create_app(serve_settings(world, "retry", load_retry_s=0.2, load_retry_max_s=1.0)),
            raise_server_exceptions=False,
        )
        client.__enter__()
        try:
            wait(
                lambda: client.get("/model").json()["retrying"],
                30,
                "the champion's load to fail and be scheduled again",
            )
            ready = client.get("/health/ready")
            model = client.get("/model").json()
            wait(lambda: client.get("/model").json()["retrying"][0]["attempts"] >= 3, 30, "retries")
            assert client.post("/predict", json=reading("M0003", STATE_DAY)).status_code == 503
        finally:
            shutil.move(away, world.arts)
        waited = wait(lambda: client.get("/health/ready").status_code == 200, 10, "the champion")
        served = client.post("/predict", json=reading("M0003", STATE_DAY))
        after = client.get("/model").json()
        metrics = client.get("/metrics").text
        client.__exit__(None, None, None)
    finally:
        if away.exists():
            shutil.move(away, world.arts)
    assert ready.status_code == 503
    reason = ready.json()["reason"]
    assert f"v{world.version} could not be loaded" in reason, reason
    assert "artifacts cannot be fetched" in reason, reason
    assert str(world.arts) in reason, reason  # names the path it misses
    assert model["refused"] == [] and model["retrying"][0]["version"] == world.version
    assert waited < 5  # within the capped backoff (1 s) and a poll, not a restart
    assert served.status_code == 200, served.text
    assert served.json()["model_version"] == world.version
    assert after["retrying"] == [] and after["refused"] == []
    (retries,) = samples(metrics, "mlops_serving_model_load_retries_total", alias="champion")
    assert retries.value >= 3


def test_a_version_refused_for_its_content_is_not_retried(world):
    import mlflow

    c = registry.client(world.uri)
    source = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{world.version}")
    bad = world.root / "broken_model_file"
    shutil.copytree(source, bad)
    (bad / "model.json").write_text("this is not a model")
    run_id = c.get_model_version(NAME, str(world.version)).run_id
    broken = int(c.create_model_version(NAME, source=str(bad), run_id=run_id).version)
    registry.set_alias(world.uri, NAME, registry.CHALLENGER, broken)
    try:
        client = ready_client(
            serve_settings(world, "content", mode="shadow", load_retry_s=0.05, load_retry_max_s=0.1)
        )
        try:
            wait(lambda: client.get("/model").json()["refused"], 30, "the refusal")
            polls = client.app.state.service.manager
            wait(lambda: polls.last_poll_error is None, 5, "a clean poll")

            time.sleep(1.0)  # 5 polls, 10 backoff periods
            model = client.get("/model").json()
            metrics = client.get("/metrics").text
        finally:
            client.__exit__(None, None, None)
    finally:
        registry.client(world.uri).delete_registered_model_alias(NAME, registry.CHALLENGER)
    assert [(r["alias"], r["version"]) for r in model["refused"]] == [("challenger", broken)]
    assert "did not load" in model["refused"][0]["reason"]
    assert model["retrying"] == []
    (refusals,) = samples(metrics, "mlops_serving_swap_refusals_total", alias="challenger")
    assert refusals.value == 1  # loaded once, refused once: never tried again


# 15. The OpenAPI document, and schemathesis against it ----------------------------------------


def test_openapi_document_carries_the_spec_schema(world):
    from mlops.spec import load_spec

    client = TestClient(create_app(serve_settings(world, "openapi")))
    doc = client.get("/openapi.json")
    assert doc.status_code == 200, doc.text
    d = doc.json()
    comp = d["components"]["schemas"]
    reading = comp["Reading"]
    spec = load_spec(world.root / "specs" / f"{NAME}.yaml")
    columns = {c.name: c for c in spec.schema_.columns}
    assert set(reading["properties"]) == set(columns)
    assert reading["additionalProperties"] is False
    assert set(reading["required"]) >= {"timestamp", "machine_id", "temperature"}
    assert reading["properties"]["temperature"] == {
        "type": "number",
        "minimum": -20,
        "maximum": 150,
    }
    assert reading["properties"]["machine_type"]["enum"] == ["A", "B", "C"]
    assert reading["properties"]["timestamp"]["format"] == "date-time"
    assert comp["Readings"]["maxItems"] == serve_settings(world, "x").max_batch
    predict = d["paths"]["/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictBody"
    }
    assert {"200", "400", "413", "422", "503"} <= set(predict["responses"])
    assert set(d["paths"]) == {
        "/predict",
        "/feedback",
        "/health/live",
        "/health/ready",
        "/model",
        "/metrics",
    }
    assert {"200", "400", "413", "422"} <= set(d["paths"]["/feedback"]["post"]["responses"])


@pytest.fixture(scope="module")
def fuzzed(world):
    """The app (reading_only: an unknown entity is scored and flagged, so generated readings
    reach the model) on a copy of the online store, its champion loaded; the schema
    schemathesis reads from it, and the (path, status) of every case it sent."""
    store = world.root / ".mlops" / "fuzz_online.db"
    shutil.copy(world.root / ".mlops" / "online.db", store)
    s = serve_settings(world, "fuzz", f"reading_only/{NAME}.yaml", store_url=f"sqlite:///{store}")
    app = create_app(s)
    with TestClient(app) as client:  # the lifespan: the poller loads the champion
        wait(lambda: client.get("/health/ready").status_code == 200, 60, "the champion")
        yield schemathesis.openapi.from_asgi("/openapi.json", app), []


def test_schemathesis_finds_no_5xx_and_no_response_outside_the_document(fuzzed):
    """Every operation: the document's examples, then 30 cases that fit the document and
    30 that do not; every default check (no 5xx, documented status codes, content types
    and response schemas, invalid data rejected) but one: schema-valid data accepted. The
    service refuses valid-looking readings for reasons a static schema cannot say (a
    timestamp ahead of the server's clock, before 1970 after a time-zone shift, an entity
    without state under `reject`), each a documented 422. Schemathesis' pytest plugin is
    not used: its lazy fixture loader does not run under pytest 9."""
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema, statuses = fuzzed
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/health/ready", "/model"}
    run = settings(
        max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    for op in operations:
        modes = list(GenerationMode)
        if not (op.query or op.headers or op.body):
            modes.remove(GenerationMode.NEGATIVE)  # nothing to get wrong in a bare GET
        strategies = schema.get_strategies_from_examples(op) + [
            op.as_strategy(generation_mode=mode) for mode in modes
        ]
        for strategy in strategies:

            @run
            @given(case=strategy)
            def check(case) -> None:
                response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
                statuses.append((case.operation.path, response.status_code))

            check()
    predict = {status for path, status in statuses if path == "/predict"}
    assert {200, 422} <= predict, sorted(predict)  # it reached the model, and was refused
    assert not [s for s in statuses if s[1] >= 500]


# 14. Latency as clients see it -----------------------------------------------------------------


def test_latency_histogram_includes_the_time_requests_queue(world, tmp_path):
    """serving.server.run (uvicorn, one worker, as `mlops serve` starts it) under 8 concurrent clients sending slow requests
    (60 readings each, explained): each waits behind the others for the event loop, and
    the request histogram must count that wait; the handler histogram shows it is there."""
    import os
    import subprocess
    import sys
    import threading

    import httpx

    from deploy.services import free_port

    store = tmp_path / "online.db"
    shutil.copy(world.root / ".mlops" / "online.db", store)
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR",)}
    env.pop("MLOPS_SERVE_TOKEN", None)
    env.update(
        MLOPS_SPECS_DIR=str(world.root / "specs"),
        MLOPS_MLFLOW_TRACKING_URI=world.uri,
        MLOPS_ONLINE_STORE_URL=f"sqlite:///{store}",
        MLOPS_INFERENCE_LOG_DIR=str(tmp_path / "log"),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stderr = tmp_path / "server.stderr"
    # One request at a time, so they queue (micro-batched, they would share one batch).
    s = serve_settings(world, "latency", store_url=f"sqlite:///{store}", microbatch_max_size=1)
    launch = (
        "import json, sys; from serving.server import run; from serving.settings import "
        f"ServeSettings; run(ServeSettings(**json.loads(sys.argv[1])), port={port})"
    )
    cmd = [sys.executable, "-c", launch, s.to_env()]  # what `mlops serve` runs, less the CLI
    with open(stderr, "wb") as err:  # the child keeps its own copy
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)

    def up() -> bool:
        try:
            return httpx.get(url + "/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # exited: fail below, with its stderr

    batch = [
        reading(f"M000{1 + k % 4}", STATE_DAY + dt.timedelta(minutes=k), vibration=1.0 + k / 50)
        for k in range(60)
    ]
    clients, rounds = 8, 3
    seen: list[float] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.get("/health/live")  # the connection is open before timing
            for _ in range(rounds):
                t = time.perf_counter()
                r = c.post("/predict", params={"explain": "true"}, json={"records": batch})
                seen.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(r.text[:300])

    def sums() -> tuple[float, float, float]:
        text = httpx.get(url + "/metrics").text
        (req,) = samples(text, "mlops_serving_request_duration_seconds_sum", endpoint="/predict")
        (hnd,) = samples(text, "mlops_serving_handler_duration_seconds_sum", endpoint="/predict")
        (n,) = samples(text, "mlops_serving_request_duration_seconds_count", endpoint="/predict")
        return req.value, hnd.value, n.value

    try:
        wait(up, 180, lambda: "the server: " + stderr.read_text(errors="replace")[-2000:])
        assert proc.poll() is None, stderr.read_text(errors="replace")[-2000:]
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        req, hnd, n = sums()
    finally:
        proc.terminate()
        proc.wait(30)
    assert not errors, errors[:3]
    assert len(seen) == clients * rounds == n
    felt = sum(seen)
    # What clients felt, less a little for the client's own work and the network.
    assert req >= 0.9 * felt - 0.005 * len(seen), (req, hnd, felt)
    assert req <= felt, (req, felt)  # never stamped before the request was sent
    assert hnd < 0.6 * felt, (req, hnd, felt)  # the requests did queue
