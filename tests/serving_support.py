"""Helpers shared by the online-service tests (test_serving, test_serving_resilience)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO

NAME = "machine_failure"


def wait(fn: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> float:
    """Seconds until `fn()` is true; fails after `timeout`, saying what it waited for."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if fn():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what if isinstance(what, str) else what()}"
    )


def variant(root: Path, estimator: str, params: dict[str, Any]) -> Path:
    """The embedded spec with one candidate, under root/variants/<estimator>/."""
    data = yaml.safe_load((REPO / "specs" / f"{NAME}.yaml").read_text())
    data["model"]["candidates"] = [{"estimator": estimator, "params": params}]
    path = root / "variants" / estimator / f"{NAME}.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def training_frame(lake, days: list[str]) -> pl.DataFrame:
    """Three days' features with a label the model can learn (high vibration), split by day
    into train, valid and test."""
    feats = lake.read_many(NAME, "features", days)
    split = dict(zip(days, ("train", "valid", "test"), strict=True))
    return feats.with_columns(
        (pl.col("vibration_max_24h") > pl.col("vibration_max_24h").median())
        .cast(pl.Int64)
        .alias("failure_24h"),
        pl.col("timestamp").dt.date().cast(pl.String).replace_strict(split).alias("split"),
    )


def samples(text: str, name: str, **labels: str) -> list[Any]:
    """The samples of one metric series in Prometheus text, filtered by labels."""
    return [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


# One raw reading of the example spec's schema, values overridden by keyword.
def reading(machine: str, when: dt.datetime | str, **values: Any) -> dict[str, Any]:
    base = {
        "timestamp": when if isinstance(when, str) else when.isoformat(),
        "machine_id": machine,
        "machine_type": "A",
        "firmware": "1.0",
        "temperature": 60.0,
        "vibration": 2.0,
        "pressure": 110.0,
        "rpm": 1500.0,
        "voltage": 230.0,
    }
    return {**base, **values}


# A small served project: the world of the batch, micro-batch and feedback tests -----------------

SERVED_DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


@dataclass
class ServedWorld:
    root: Path
    uri: str


def served_world(root: Path) -> ServedWorld:
    """The embedded spec over three small days (4 machines) built through the data job (so
    the online store holds every machine's state as of day 3's end), with an xgboost
    champion trained on them."""
    from mlops import registry, training
    from mlops.spec import load_spec
    from tests.conftest import make_project, small_data

    p = make_project(root, with_mlflow=True)
    small_data(p, days=len(SERVED_DAYS), machines=4, seed=5)
    for day in SERVED_DAYS:
        p.run_day(day)
    spec = load_spec(variant(root, "xgboost", {"n_estimators": 20, "max_depth": 3}))
    lineage = {
        "training_set_hash": "0" * 64,
        "training_partitions": [SERVED_DAYS[0], SERVED_DAYS[-1]],
    }
    xgb = training.train_candidate(
        spec,
        training_frame(p.lake, SERVED_DAYS),
        lineage,
        p.tracking_uri,
        str(root / ".mlops" / "mlartifacts"),
        trials=1,
    )
    registry.set_alias(p.tracking_uri, NAME, registry.CHAMPION, xgb.version)
    return ServedWorld(root, p.tracking_uri)


def settings(world: ServedWorld, name: str, **kw: Any):
    """A server of its own over a copy of the online store (as of day 3's end)."""
    import shutil

    from serving.settings import ServeSettings

    store = world.root / "stores" / f"{name}.db"
    store.parent.mkdir(exist_ok=True)
    shutil.copy(world.root / ".mlops" / "online.db", store)
    base = {
        "spec_path": str(world.root / "specs" / f"{NAME}.yaml"),
        "tracking_uri": world.uri,
        "store_url": f"sqlite:///{store}",
        "log_dir": str(world.root / "logs" / name),
        "poll_interval_s": 0.2,
    }
    return ServeSettings(**{**base, **kw})


def ready_client(s: Any, monkeypatch: Any):
    """A TestClient of the app (its lifespan entered) once its champion is loaded."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    monkeypatch.delenv("MLOPS_SERVE_TOKEN", raising=False)
    client = TestClient(create_app(s), raise_server_exceptions=False)
    client.__enter__()
    wait(lambda: client.get("/health/ready").status_code == 200, 60, "the champion to load")
    return client


class ThreadServer:
    """`create_app` under uvicorn in a thread, as `mlops serve` runs it (its protocol too)."""

    def __init__(self, s: Any):
        import threading

        import uvicorn

        from deploy.services import free_port
        from serving.app import create_app
        from serving.timing import PROTOCOL

        self.app = create_app(s)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", http=PROTOCOL
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        import httpx

        self.thread.start()

        def ready() -> bool:
            try:
                return httpx.get(self.url + "/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait(ready, 60, "the in-process server")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
