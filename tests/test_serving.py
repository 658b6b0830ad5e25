"""The online prediction service against a real server: `mlops serve` (uvicorn, 2 workers,
shadow mode) in a subprocess, a real MLflow SQLite registry, a real online store (SQLite).

One scenario per module: days 1-2 go through the data job (which writes the online state as
of day 2's end), day 3 only to features; v1 (xgboost) is the champion, v2 (logistic
regression) the challenger. Day 3's readings are then served in time order and must score
as the batch path scores day 3's offline features. Tests run in file order and later ones
move the aliases (v2 becomes champion; broken v3/v4 are refused); the SIGTERM test stops
the shared server, so it comes after every test that talks to it, and the inference_log
asset then reads the complete log. Canary mode, the bearer token and a down feature store
use small servers in this process (uvicorn in a thread).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from assets.serving import build_serving_assets
from deploy.services import free_port
from mlops import registry, training
from mlops.inference_log import compare_routes, inference_log_dir, log_files, read_lines
from mlops.model_loader import load_model
from mlops.online_store import make_store
from mlops.scoring import score_frame
from resources.lake import LakeResource
from tests.conftest import QUIET, make_project, materialization_meta, small_data
from tests.serving_support import reading as _reading
from tests.serving_support import samples, training_frame, variant, wait

NAME = "machine_failure"
BIN = Path(sys.executable).parent
DAY3 = "2026-01-03"
MAX_BODY, MAX_BATCH, POLL = 20_000, 50, 0.5


def _body(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out["timestamp"] = row["timestamp"].isoformat()
    return out


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_dir: Path
    stderr: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")


@dataclass
class World:
    root: Path
    project: Any
    uri: str
    server: Server
    day3: pl.DataFrame  # valid readings of day 3, in time order
    offline: pl.DataFrame  # day 3's offline features
    versions: dict[str, int] = field(default_factory=dict)


def _workers_agree(server: Server, check: Callable[[dict], bool], workers: int = 2) -> bool:
    """True when `workers` distinct worker pids answer /model with `check` true (probed on
    fresh connections, in parallel, so both workers get some)."""
    seen: dict[int, bool] = {}

    def probe() -> None:
        try:
            r = httpx.get(server.url + "/model", headers={"connection": "close"}, timeout=5)
            body = r.json()
            seen[body["pid"]] = check(body)
        except (httpx.HTTPError, ValueError, KeyError):
            pass

    threads = [threading.Thread(target=probe) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(seen) >= workers and all(seen.values())


def _start_server(root: Path, env: dict[str, str]) -> Server:
    port = free_port()
    stderr = root / "server.stderr"
    proc = subprocess.Popen(
        [
            str(BIN / "mlops"),
            "serve",
            "--spec",
            str(root / "specs" / f"{NAME}.yaml"),
            "--port",
            str(port),
            "--workers",
            "2",
            "--mode",
            "shadow",
            "--poll-interval",
            str(POLL),
            "--max-body-bytes",
            str(MAX_BODY),
            "--max-batch",
            str(MAX_BATCH),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(stderr, "wb"),  # noqa: SIM115 - the child holds it
        cwd=root,
    )
    return Server(f"http://127.0.0.1:{port}", proc, inference_log_dir(NAME), stderr)


@pytest.fixture(scope="module")
def world(tmp_path_factory, request) -> World:
    root = tmp_path_factory.mktemp("serve")
    p = make_project(root, with_mlflow=True)
    small_data(p, days=3, machines=8, seed=3)
    for day in ("2026-01-01", "2026-01-02"):
        p.run_day(day)  # validated rows, features and the online state as of the day's end
    job = p.defs.resolve_job_def(f"{NAME}_data_job")
    day3_assets = ("raw_data", "validated_data", "quarantine", "features")
    job.execute_in_process(
        partition_key=DAY3,
        instance=p.instance,
        run_config=QUIET,
        asset_selection=[dg.AssetKey([NAME, a]) for a in day3_assets],
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR",)},
        "MLOPS_SPECS_DIR": str(root / "specs"),
        "MLOPS_MLFLOW_TRACKING_URI": p.tracking_uri,
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / '.mlops' / 'online.db'}",
        "MLOPS_INFERENCE_LOG_DIR": str(root / "inference_log"),
        "MLOPS_LAKE_URL": str(p.lake.base_url),
    }
    env.pop("MLOPS_SERVE_TOKEN", None)
    os.environ["MLOPS_INFERENCE_LOG_DIR"] = env["MLOPS_INFERENCE_LOG_DIR"]
    request.addfinalizer(lambda: os.environ.pop("MLOPS_INFERENCE_LOG_DIR", None))
    # The server starts (imports, first polls) while the models train: it is ready once
    # the champion alias exists and v1 passed its smoke test.
    server = _start_server(root, env)
    request.addfinalizer(lambda: _stop(server))
    frame = training_frame(p.lake, ["2026-01-01", "2026-01-02", DAY3])
    arts = str(root / ".mlops" / "mlartifacts")
    lineage = {"training_set_hash": "0" * 64, "training_partitions": ["2026-01-01", DAY3]}
    xgb = training.train_candidate(
        training_spec(root, "xgboost", {"n_estimators": 60, "max_depth": 4}),
        frame,
        lineage,
        p.tracking_uri,
        arts,
        trials=1,
    )
    registry.set_alias(p.tracking_uri, NAME, registry.CHAMPION, xgb.version)
    lr = training.train_candidate(
        training_spec(root, "logistic_regression", {"C": 1.0}),
        frame,
        lineage,
        p.tracking_uri,
        arts,
        trials=1,
    )  # registered as the challenger
    day3 = p.lake.read(NAME, "validated_data", DAY3).sort("timestamp", "machine_id")
    offline = p.lake.read(NAME, "features", DAY3)
    w = World(
        root, p, p.tracking_uri, server, day3, offline, {"xgb": xgb.version, "lr": lr.version}
    )

    def both_loaded(body: dict) -> bool:
        ch, cl = body.get("champion"), body.get("challenger")
        return bool(ch and cl and ch["version"] == xgb.version and cl["version"] == lr.version)

    wait(
        lambda: server.proc.poll() is None and _workers_agree(server, both_loaded),
        120,
        lambda: (
            f"both workers to serve v{xgb.version} and shadow v{lr.version}:\n"
            + server.stderr_text()[-3000:]
        ),
    )
    return w


def training_spec(root: Path, estimator: str, params: dict[str, Any]):
    from mlops.spec import load_spec

    return load_spec(variant(root, estimator, params))


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture(scope="module")
def replay(world: World) -> list[dict[str, Any]]:
    """Day 3's readings served one request each, in time order (as devices send them).

    The world's online state ends with day 2 (the data job stops at day 3's features), so a
    reading on 2026-01-04 is more than the staleness limit (1 day) after it and is rejected
    as stale_state; once this has run, every machine's state ends late on day 3. Every test
    that posts a 2026-01-04 reading to the shared online store therefore requests this
    fixture, so it passes alone (`-k`) as in file order, and no later-dated reading lands in
    the store before day 3's (which would make them out of order)."""
    out = []
    with world.server.client() as c:
        for row in world.day3.iter_rows(named=True):
            r = c.post("/predict", json=_body(row))
            assert r.status_code == 200, r.text
            out.append(r.json())
    return out


# Served = batch ----------------------------------------------------------------------------------


def test_served_scores_equal_the_batch_scores(world, replay):
    model = load_model(world.uri, NAME, version=world.versions["xgb"])
    batch = score_frame(world.project.spec, model, world.offline)
    want = {
        (r["machine_id"], r["timestamp"]): (r["score"], r["decision"])
        for r in batch.iter_rows(named=True)
    }
    assert len(replay) == world.day3.height == len(want) > 100
    worst = 0.0
    for resp, row in zip(replay, world.day3.iter_rows(named=True), strict=True):
        (pred,) = resp["predictions"]
        assert pred["model_version"] == resp["model_version"] == world.versions["xgb"]
        assert pred["route"] == "champion" and pred["fallback"] is None
        assert pred["request_id"] == resp["request_id"]
        score, decision = want[(row["machine_id"], row["timestamp"])]
        worst = max(worst, abs(pred["score"] - score))
        assert pred["decision"] == decision
    assert worst <= 1e-6
    assert len({r["request_id"] for r in replay}) == len(replay)


# Bad input ---------------------------------------------------------------------------------------


def test_every_kind_of_bad_input_gets_its_4xx_with_field_and_reason(world, replay):
    when = dt.datetime(2026, 1, 4, 1)
    good = _reading("M0001", when)

    def missing(field: str) -> dict[str, Any]:
        return {k: v for k, v in good.items() if k != field}

    cases: list[tuple[str, dict[str, Any], int, str | None, str]] = [
        # (what, request kwargs, status, field, code)
        ("missing field", {"json": missing("rpm")}, 422, "rpm", "missing"),
        ("extra field", {"json": {**good, "humidity": 3.0}}, 422, "humidity", "extra"),
        ("mistyped number", {"json": {**good, "temperature": "hot"}}, 422, "temperature", "type"),
        ("number as bool", {"json": {**good, "pressure": True}}, 422, "pressure", "type"),
        ("above max", {"json": {**good, "temperature": 151.0}}, 422, "temperature", "max"),
        ("below min", {"json": {**good, "vibration": -0.5}}, 422, "vibration", "min"),
        ("unknown category", {"json": {**good, "machine_type": "Z"}}, 422, "machine_type",
         "category"),
        ("null required", {"json": {**good, "voltage": None}}, 422, "voltage", "not_null"),
        ("bad timestamp", {"json": {**good, "timestamp": "yesterday"}}, 422, "timestamp", "type"),
        ("entity as number", {"json": {**good, "machine_id": 7}}, 422, "machine_id", "type"),
        ("not an object", {"json": 42}, 422, None, "type"),
        ("empty batch", {"json": {"records": []}}, 422, "records", "missing"),
        ("records not a list", {"json": {"records": good}}, 422, "records", "type"),
        ("unknown envelope key", {"json": {"records": [good], "x": 1}}, 422, "x", "extra"),
        ("explain not a bool", {"json": {**good, "explain": "yes"}}, 422, "explain", "type"),
        ("explain query", {"json": good, "params": {"explain": "maybe"}}, 422, "explain", "type"),
        ("malformed JSON", {"content": b'{"machine_id": "M0001",'}, 400, None, "malformed_json"),
        ("NaN literal", {"content": json.dumps({**good, "rpm": float("nan")}).encode()}, 400,
         None, "malformed_json"),
        ("not UTF-8", {"content": b'{"machine_id": "\xff"}'}, 400, None, "malformed_json"),
        ("empty body", {"content": b""}, 400, None, "malformed_json"),
        ("body over the limit", {"content": b" " * (MAX_BODY + 1)}, 413, None, "body_too_large"),
        ("chunked body over the limit",
         {"content": iter([b"[" + b" " * (MAX_BODY // 2)] * 3)}, 413, None, "body_too_large"),
        ("batch over the row limit", {"json": [good] * (MAX_BATCH + 1)}, 413, "records",
         "too_many_records"),
        ("unknown entity (reject)", {"json": _reading("M9999", when)}, 422, "machine_id",
         "unknown_entity"),
    ]  # fmt: skip
    with world.server.client() as c:
        for what, kwargs, status, field_, code in cases:
            r = c.post("/predict", **kwargs)
            assert r.status_code == status, (what, r.status_code, r.text)
            body = r.json()
            assert body["request_id"] and body["message"], what
            if code in ("malformed_json",):
                assert body["error"] == code, (what, body)
                continue
            hits = [d for d in body["detail"] if d["field"] == field_ and d["code"] == code]
            assert hits, (what, body)
            if field_:
                assert hits[0]["reason"].startswith(f"{field_}") or field_ in hits[0]["reason"]
        # One bad record in a batch: named by its index; nothing scored or stored.
        batch = [_reading("M0002", when), _reading("M0003", when, rpm=-1.0)]
        r = c.post("/predict", json={"records": batch})
        assert r.status_code == 422
        assert [(d["record"], d["field"], d["code"]) for d in r.json()["detail"]] == [
            (1, "rpm", "min")
        ]
        # An unknown entity in a batch rejects the batch before any reading is appended.
        r = c.post("/predict", json=[_reading("M0004", when), _reading("M9998", when)])
        assert r.status_code == 422 and r.json()["detail"][0]["record"] == 1
        store = make_store(f"sqlite:///{world.root / '.mlops' / 'online.db'}")
        assert store.get_state(NAME, "M0004").as_of < when  # not appended
        metrics = c.get("/metrics").text
    reasons = {s.labels["reason"] for s in samples(metrics, "mlops_serving_rejections_total")}
    assert reasons >= {"missing", "extra", "type", "max", "min", "category", "not_null",
                       "malformed_json", "body_too_large", "too_many_records", "unknown_entity"}  # fmt: skip
    statuses = {s.labels["status"] for s in samples(metrics, "mlops_serving_requests_total")}
    assert "500" not in statuses


# Explanations, model info, metrics ---------------------------------------------------------------


def test_explanations_are_xgboost_contributions_that_add_up(world, replay):
    reading = _reading("M0005", dt.datetime(2026, 1, 4, 2))
    with world.server.client() as c:
        by_query = c.post("/predict", params={"explain": "true", "top": "3"}, json=reading).json()
        by_body = c.post("/predict", json={"records": [reading], "explain": True}).json()
        plain = c.post("/predict", json=reading).json()
    (p,) = by_query["predictions"]
    ex = p["explanation"]
    assert ex["method"] == "xgboost_pred_contribs" and ex["space"] == "log_odds"
    assert len(ex["top"]) == 3
    mags = [abs(t["contribution"]) for t in ex["top"]]
    assert mags == sorted(mags, reverse=True)
    total = ex["base_value"] + sum(t["contribution"] for t in ex["top"]) + ex["rest"]
    assert abs(total - math.log(p["score"] / (1 - p["score"]))) < 1e-4
    assert len(by_body["predictions"][0]["explanation"]["top"]) == 5  # the default
    assert "explanation" not in plain["predictions"][0]


def test_model_endpoint_and_prometheus_metrics(world, replay):
    with world.server.client() as c:
        m = c.get("/model").json()
        live = c.get("/health/live")
        metrics = c.get("/metrics")
    assert live.status_code == 200
    assert m["alias"] == "champion" and m["version"] == world.versions["xgb"]
    assert m["mode"] == "shadow" and m["challenger"]["version"] == world.versions["lr"]
    lin = m["lineage"]
    assert lin["spec_name"] == NAME and lin["training_window"] == ["2026-01-01", DAY3]
    assert lin["mlflow_run_id"] == m["champion"]["run_id"] and lin["code_version"]
    assert m["champion"]["scorer"] == "xgboost_inplace"
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    # Counters add up over both workers (prometheus multiprocess mode).
    (ok,) = samples(text, "mlops_serving_requests_total", endpoint="/predict", status="200")
    assert ok.value >= len(replay)
    (latency,) = samples(text, "mlops_serving_request_duration_seconds_count", endpoint="/predict")
    assert latency.value >= len(replay)
    for route in ("champion", "shadow"):
        (below,) = samples(text, "mlops_serving_prediction_score_bucket", route=route, le="0.5")
        (total,) = samples(text, "mlops_serving_prediction_score_count", route=route)
        assert 0 < below.value < total.value  # scores on both sides of 0.5
    (preds,) = samples(text, "mlops_serving_predictions_total", route="shadow", decision="1")
    assert preds.labels["model_version"] == str(world.versions["lr"])
    versions = samples(text, "mlops_serving_model_version", alias="champion")
    assert len({s.labels["pid"] for s in versions}) == 2  # one gauge per live worker
    assert {s.value for s in versions} == {world.versions["xgb"]}
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "mlops_serving_swap_refusals",
        "mlops_serving_model_swaps",
        "mlops_serving_feature_fallbacks",
        "mlops_serving_rejections",
    } <= families


# Canary, auth and a feature store that is down (servers in this process) -----------------------


class ThreadServer:
    def __init__(self, settings, token: str | None = None):
        import uvicorn

        from serving.app import create_app

        old = os.environ.pop("MLOPS_SERVE_TOKEN", None)
        if token:
            os.environ["MLOPS_SERVE_TOKEN"] = token
        try:
            app = create_app(settings)
        finally:
            os.environ.pop("MLOPS_SERVE_TOKEN", None)
            if old is not None:
                os.environ["MLOPS_SERVE_TOKEN"] = old
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait(lambda: self._ready(), 60, "the in-process server")
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _settings(world: World, **kw: Any):
    from serving.settings import ServeSettings

    base = {
        "spec_path": str(world.root / "specs" / f"{NAME}.yaml"),
        "tracking_uri": world.uri,
        "store_url": f"sqlite:///{world.root / '.mlops' / 'online.db'}",
        "log_dir": str(world.root / "other_logs" / kw.pop("log", "x")),
        "poll_interval_s": POLL,
    }
    return ServeSettings(**{**base, **kw})


def test_canary_routes_a_fraction_to_the_challenger_behind_a_token(world, replay):
    settings = _settings(world, mode="canary", canary_fraction=0.5, log="canary")
    with ThreadServer(settings, token="s3cret") as srv:
        open_ = httpx.get(srv.url + "/health/live")
        denied = httpx.post(srv.url + "/predict", json=_reading("M0006", dt.datetime(2026, 1, 4)))
        wrong = httpx.get(srv.url + "/model", headers={"authorization": "Bearer nope"})
        auth = {"authorization": "Bearer s3cret"}
        wait(
            lambda: httpx.get(srv.url + "/model", headers=auth).json()["challenger"] is not None,
            30,
            "the canary's challenger",
        )
        routes: dict[str, set[int]] = {"champion": set(), "canary": set()}
        explained = {}
        with httpx.Client(base_url=srv.url, headers=auth) as c:
            for i in range(40):
                reading = _reading("M0006", dt.datetime(2026, 1, 4, 3, i))
                r = c.post("/predict", params={"explain": "true"}, json=reading)
                assert r.status_code == 200, r.text
                body = r.json()
                routes[body["route"]].add(body["model_version"])
                explained[body["route"]] = body["predictions"][0]
    assert open_.status_code == 200
    assert denied.status_code == 401 and wrong.status_code == 401
    assert routes == {"champion": {world.versions["xgb"]}, "canary": {world.versions["lr"]}}
    # The challenger is a logistic regression: coefficient x standardized value, in log-odds.
    lin = explained["canary"]
    ex = lin["explanation"]
    assert ex["method"] == "linear_coef_x_standardized_value"
    total = ex["base_value"] + sum(t["contribution"] for t in ex["top"]) + ex["rest"]
    assert abs(total - math.log(lin["score"] / (1 - lin["score"]))) < 1e-6
    log = _frame(world.root / "other_logs" / "canary")
    cmp = compare_routes(log)
    assert set(cmp["route"].to_list()) == {"champion", "canary"}
    assert cmp["count"].sum() == 40


def test_a_down_feature_store_is_503_not_500(world):
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with ThreadServer(_settings(world, store_url=down, log="down")) as srv:
        r = httpx.post(srv.url + "/predict", json=_reading("M0001", dt.datetime(2026, 1, 4)))
        metrics = httpx.get(srv.url + "/metrics").text
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "feature_store_unavailable" and "Redis" in r.json()["message"]
    assert "mlops_serving_feature_store_unavailable_total 1.0" in metrics


def _frame(folder: Path) -> pl.DataFrame:
    from mlops.inference_log import to_frame

    lines, bad = read_lines(log_files(folder))
    assert bad == 0
    return to_frame([ln for ln in lines if ln.get("route")])


# Hot swap ----------------------------------------------------------------------------------------


class Load:
    """Client threads, each sending one fixed reading over and over: its features do not
    change (the same timestamp replaces itself in the state), so its score identifies the
    version that produced it."""

    def __init__(self, server: Server, threads: int, hour: int):
        self.server, self.results = server, {k: [] for k in range(threads)}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(k, hour), daemon=True) for k in range(threads)
        ]

    def _run(self, k: int, hour: int) -> None:
        reading = _reading(f"M000{k + 1}", dt.datetime(2026, 1, 4, hour, k), vibration=1.0 + k)
        with self.server.client() as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/predict", json=reading)
                except httpx.HTTPError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                b = r.json()
                p = b["predictions"][0]
                self.results[k].append((b["request_id"], p["model_version"], p["score"]))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def tail_versions(self, n: int) -> set[int]:
        return {v for res in self.results.values() for _, v, _ in res[-n:]}


def test_swap_under_load_fails_no_request_and_names_the_version(world, replay):
    server, v1, v2 = world.server, world.versions["xgb"], world.versions["lr"]
    with Load(server, threads=4, hour=4) as load:
        wait(
            lambda: all(len(r) >= 5 for r in load.results.values()),
            30,
            lambda: f"the load to start: {load.errors[:3]}",
        )
        registry.set_alias(world.uri, NAME, registry.CHAMPION, v2)
        wait(
            lambda: (
                load.tail_versions(10) == {v2} and all(len(r) > 20 for r in load.results.values())
            ),
            60,
            "every worker to swap to v2",
        )
    assert not load.errors, load.errors[:5]
    logged = {ln["request_id"]: ln for ln in read_lines(log_files(server.log_dir))[0]
              if ln.get("route") == "champion"}  # fmt: skip
    for k, res in load.results.items():
        versions = [v for _, v, _ in res]
        assert versions[0] == v1 and versions[-1] == v2, (k, versions)
        by_version: dict[int, set[float]] = {}
        for rid, v, score in res:
            by_version.setdefault(v, set()).add(round(score, 12))
            assert logged[rid]["model_version"] == v  # the log names the same version
        # One score per version: each answer came from the version it names.
        assert all(len(s) == 1 for s in by_version.values()), (k, by_version)
        assert by_version[v1] != by_version[v2]
    with server.client() as c:
        assert c.get("/model").json()["version"] == v2


def _make_broken_version(world: World, how: str) -> int:
    """A registered version that cannot serve: `model_file` (its xgboost file is garbage,
    so it does not load) or `layout` (it loads, but its recorded input layout lacks a column
    the booster needs, so its input example does not score)."""
    import mlflow

    c = registry.client(world.uri)
    source = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{world.versions['xgb']}")
    bad = world.root / f"broken_{how}"
    shutil.copytree(source, bad)
    if how == "model_file":
        (bad / "model.json").write_text("this is not a model")
    else:
        conf = yaml.safe_load((bad / "MLmodel").read_text())
        conf["metadata"]["layout"]["numeric"].remove("temperature")
        (bad / "MLmodel").write_text(yaml.safe_dump(conf))
        ex = json.loads((bad / "input_example.json").read_text())
        drop = ex["columns"].index("temperature")
        ex["columns"].pop(drop)
        for row in ex["data"]:
            row.pop(drop)
        (bad / "input_example.json").write_text(json.dumps(ex))
    run_id = c.get_model_version(NAME, str(world.versions["xgb"])).run_id
    return int(c.create_model_version(NAME, source=str(bad), run_id=run_id).version)


def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(world, replay):
    server = world.server
    good = registry.alias_version(world.uri, NAME, registry.CHAMPION)
    with Load(server, threads=2, hour=5) as load:
        for how in ("model_file", "layout"):
            broken = _make_broken_version(world, how)
            registry.set_alias(world.uri, NAME, registry.CHAMPION, broken)

            def refused(body: dict, broken: int = broken) -> bool:
                return body["version"] == good and any(
                    r["version"] == broken and r["alias"] == "champion" for r in body["refused"]
                )

            wait(lambda: _workers_agree(server, refused), 60, f"both workers to refuse v{broken}")
    registry.set_alias(world.uri, NAME, registry.CHAMPION, good)
    assert not load.errors, load.errors[:5]
    assert load.tail_versions(1000) == {good}
    with server.client() as c:
        body = c.get("/model").json()
        metrics = c.get("/metrics").text
    reasons = {r["version"]: r["reason"] for r in body["refused"]}
    assert any("did not load" in r and "XGBoostError" in r for r in reasons.values()), reasons
    assert any("scoring its input example failed" in r for r in reasons.values()), reasons
    (refusals,) = samples(metrics, "mlops_serving_swap_refusals_total", alias="champion")
    assert refusals.value == 4  # two versions, refused once by each of two workers
    err = server.stderr_text()
    assert "refused machine_failure" in err and "keeps serving" in err


# Graceful stop -----------------------------------------------------------------------------------


def test_sigterm_under_load_loses_no_acknowledged_request(world, replay):
    server = world.server
    with Load(server, threads=4, hour=6) as load:
        wait(lambda: sum(map(len, load.results.values())) > 200, 60, "traffic")
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
    assert server.proc.returncode == 0, server.stderr_text()[-2000:]
    acknowledged = {rid for res in load.results.values() for rid, _, _ in res}
    lines, torn = read_lines(log_files(server.log_dir))
    logged = {ln["request_id"] for ln in lines if ln.get("route") == "champion"}
    assert torn == 0
    assert acknowledged and acknowledged <= logged, len(acknowledged - logged)


# The inference_log asset -------------------------------------------------------------------------


def test_inference_log_asset_ingests_what_the_server_wrote(world, replay, tmp_path):
    lake_url = str(tmp_path / "lake")
    (asset,) = build_serving_assets(world.project.spec)
    result = dg.materialize(
        [asset],
        partition_key=DAY3,
        resources={"lake": LakeResource(base_url=lake_url)},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    meta = materialization_meta(result, dg.AssetKey([NAME, "inference_log"]))
    from mlops.lake import Lake

    log = Lake(lake_url).read(NAME, "inference_log", DAY3)
    champion = log.filter(pl.col("route") == "champion")
    assert champion.height == len(replay) == meta["requests"]
    served = {r["request_id"]: r["predictions"][0]["score"] for r in replay}
    assert dict(zip(champion["request_id"], champion["score"], strict=True)) == served
    assert champion["event_time"].dt.date().cast(pl.String).unique().to_list() == [DAY3]
    features = json.loads(champion["features"][0])
    assert set(features) >= {"temperature", "vibration_max_24h", "power_proxy"}
    routes = {(r["route"], r["model_version"]): r for r in meta["routes"]}
    shadow = routes[("shadow", world.versions["lr"])]
    assert shadow["count"] == shadow["paired"] == len(replay)
    # The comparison recomputed from the logged rows: pair each shadow answer with the
    # champion's answer to the same record.
    answers: dict[str, dict] = {"champion": {}, "shadow": {}}
    for r in log.iter_rows(named=True):
        answers[r["route"]][(r["request_id"], r["record"])] = r
    assert answers["shadow"].keys() == answers["champion"].keys()
    pairs = [(answers["shadow"][k], answers["champion"][k]) for k in answers["shadow"]]
    same = [s["decision"] == c["decision"] for s, c in pairs]
    diffs = [abs(s["score"] - c["score"]) for s, c in pairs]
    assert shadow["agreement"] == pytest.approx(sum(same) / len(same))
    assert shadow["mean_abs_score_diff"] == pytest.approx(sum(diffs) / len(diffs))
    assert shadow["max_abs_score_diff"] == pytest.approx(max(diffs)) and max(diffs) > 0
    assert routes[("champion", world.versions["xgb"])]["latency_p50_ms"] > 0
    assert meta["rows"] == 2 * len(replay)


def test_drift_report_uses_the_served_traffic(world, replay, tmp_path):
    from assets.monitoring import build_monitoring_assets
    from mlops.lake import Lake, read_json
    from resources.mlflow import MlflowResource

    p = world.project
    lake = Lake(str(tmp_path / "lake"))
    # The models' reference: the training set their lineage names (hash 0...0).
    lake.write(
        NAME, "training_set", training_frame(p.lake, ["2026-01-01", "2026-01-02", DAY3]), "0" * 16
    )
    lake.write(NAME, "features", p.lake.read(NAME, "features", DAY3), DAY3)
    (log_asset,) = build_serving_assets(p.spec)
    drift = next(a for a in build_monitoring_assets(p.spec) if a.key.path[-1] == "drift_report")
    result = dg.materialize(
        [log_asset, drift],
        partition_key=DAY3,
        resources={
            "lake": LakeResource(base_url=lake.base_url),
            "mlflow": MlflowResource(
                tracking_uri=p.tracking_uri,
                artifact_root=str(tmp_path),
                ui_url="http://mlflow.test:5000",
            ),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    summary = read_json(lake, NAME, "drift_report", DAY3)
    assert summary["source"] == "served"
    assert summary["champion_version"] == world.versions["xgb"]
    assert summary["current_rows"] == len(replay)  # every served reading, nothing else
    meta = materialization_meta(result, dg.AssetKey([NAME, "drift_report"]))
    assert meta["scored_rows_source"] == "served"
    # Evidently's page: our banner with the rows compared, the dataset verdict, a drift widget
    # per tested column (and none other), and the prediction's ValueDrift.
    html = Path(meta["report_path"]).read_text()
    # The page links the report in the MLflow UI: an artifact of the champion's run, the same
    # HTML (a lake path does not open from a browser).
    from mlops import registry

    c = registry.client(p.tracking_uri)
    run_id = registry.version_tags(p.tracking_uri, NAME, world.versions["xgb"])[
        "mlops.mlflow_run_id"
    ]
    exp = c.get_run(run_id).info.experiment_id
    path = f"monitoring/drift_report/{DAY3}.html"
    (tmp_path / "dl").mkdir()
    assert (
        meta["report"]
        == f"http://mlflow.test:5000/#/experiments/{exp}/runs/{run_id}/artifacts/{path}"
    )
    assert Path(c.download_artifacts(run_id, path, str(tmp_path / "dl"))).read_text() == html
    assert html.lstrip().lower().startswith("<!doctype html>")
    ref, cur = summary["reference_rows"], summary["current_rows"]
    assert (
        f"Drift scores in the run&#x27;s metadata: {ref:,} reference vs {cur:,} current rows."
        in html
    )
    verdict = "Dataset Drift is " + ("detected" if summary["dataset_drift"] else "NOT detected")
    assert f"{verdict}. Dataset drift detection threshold is {summary['share_threshold']}" in html
    tested = {c["column"] for c in summary["columns"]}
    assert tested >= {"temperature", "vibration_max_24h", "power_proxy", "machine_type"}
    assert set(re.findall(r'"column_name": "([^"]+)"', html)) == tested
    assert "Drift in column 'score'" in html


# The log's pure functions ------------------------------------------------------------------------


def test_log_writer_rotates_by_day_and_size_and_the_reader_partitions_by_event_time(tmp_path):
    from mlops.inference_log import InferenceLogWriter, read_day

    now = [dt.datetime(2026, 2, 1, 23, 59, tzinfo=dt.UTC)]
    w = InferenceLogWriter(tmp_path, max_bytes=600, clock=lambda: now[0])

    def line(rid: str, event: str, route: str = "champion", score: float = 0.5) -> dict:
        return {
            "request_id": rid,
            "record": 0,
            "time": now[0].isoformat(),
            "event_time": event,
            "entity": "M1",
            "route": route,
            "model_version": 1 if route == "champion" else 2,
            "status": 200,
            "latency_ms": 1.0,
            "score_ms": 0.1,
            "inputs": {"temperature": 1.0},
            "features": {"temperature": 1.0},
            "outputs": {"score": score, "decision": int(score >= 0.5)},
            "fallback": None,
            "pid": os.getpid(),
        }

    w.write([line("a", "2026-01-31T23:00:00"), line("a", "2026-01-31T23:00:00", "shadow", 0.7)])
    w.write([line("b", "2026-02-01T00:10:00")])  # same file until it passes 600 bytes
    now[0] = dt.datetime(2026, 2, 2, 0, 1, tzinfo=dt.UTC)
    w.write([line("c", "2026-02-01T23:50:00", score=0.2)])  # a new day: a new file
    w.write([{"request_id": "d", "status": 422, "error": {"code": "type"}}])  # a rejection
    w.close()
    files = [p.name for p in log_files(tmp_path)]
    pid = os.getpid()
    assert files[0] == f"inference-2026-02-01-{pid}-0000.jsonl"
    assert files[-1].startswith("inference-2026-02-02-") and len(files) >= 3
    with open(tmp_path / files[-1], "a") as f:
        f.write('{"request_id": "torn", "rou')  # a killed process's last line
    assert read_lines(log_files(tmp_path))[1] == 1
    jan31 = read_day(tmp_path, "2026-01-31")
    assert jan31.select("request_id", "route").rows() == [("a", "champion"), ("a", "shadow")]
    feb1 = read_day(tmp_path, dt.date(2026, 2, 1))
    assert feb1["request_id"].to_list() == ["b", "c"]  # by event time, whatever the file
    assert read_day(tmp_path, "2026-02-02").height == 0
    assert read_day(tmp_path / "missing", "2026-02-01").height == 0
    cmp = compare_routes(jan31)
    shadow = cmp.filter(pl.col("route") == "shadow").row(0, named=True)
    assert shadow["paired"] == 1 and shadow["agreement"] == 1.0
    assert abs(shadow["mean_abs_score_diff"] - 0.2) < 1e-12
    champ = compare_routes(feb1).row(0, named=True)
    assert champ["count"] == 2 and champ["decision_rate"] == 0.5 and champ["paired"] is None
    assert compare_routes(read_day(tmp_path, "2026-02-02")).height == 0
