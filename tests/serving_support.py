"""Helpers shared by the online-service tests (test_serving, test_serving_resilience)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
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
