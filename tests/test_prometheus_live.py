"""A real Prometheus scraping a real `mlops serve` and `mlops exporter` (issue 18, parts 2-3).

One module-scoped world on loopback: a small embedded-example project (three built days, a
trained champion, monitoring summaries), a `redis-server` online store on a port of its own,
`mlops serve` (one worker) and `mlops exporter` as subprocesses, and Debian's `prometheus`
with a temporary storage folder, scraping both every second and evaluating the shipped rules
every second. The shipped prometheus.yml is the template (targets and intervals replaced);
the alert rules are the shipped ones with every `for:` set to 0s, so an alert fires within
seconds (the `for:` durations are promtool's unit tests' business: tests/test_prometheus.py).

Then, through Prometheus' HTTP API: every series the rules and the dashboard read exists; the
Redis is killed and /predict answers 503, and MlopsFeatureStoreUnavailable and
MlopsServingErrorRate fire; every panel query of deploy/grafana/dashboards/mlops.json runs
without error and names only metrics a target exposes or a recording rule writes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import yaml

from deploy import processes
from deploy.services import free_port
from mlops import registry, training
from mlops.lake import write_json
from mlops.online import states_from_rows
from mlops.online_store import RedisOnlineStore
from mlops.spec import load_spec
from tests.conftest import QUIET, REPO, make_project, small_data
from tests.serving_support import reading, training_frame, variant, wait

NAME = "machine_failure"
BIN = Path(sys.executable).parent
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "mlops.json"


def _require(binary: str, package: str) -> str:
    found = shutil.which(binary) or (
        f"/usr/bin/{binary}" if os.path.exists(f"/usr/bin/{binary}") else None
    )
    if found:
        return found
    message = (
        f"{binary} is missing: install Debian's {package} package to run the live Prometheus test"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (required in CI)")
    pytest.skip(message)


@dataclass
class World:
    prom: str  # http://127.0.0.1:<port> of Prometheus
    serve: str
    redis: Any
    procs: dict[str, Any]
    logs: dict[str, Path]

    def query(self, expr: str) -> dict[str, Any]:
        r = httpx.get(f"{self.prom}/api/v1/query", params={"query": expr}, timeout=10)
        return r.json()

    def series(self, expr: str) -> list[dict[str, Any]]:
        body = self.query(expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def names(self) -> set[str]:
        r = httpx.get(f"{self.prom}/api/v1/label/__name__/values", timeout=10).json()
        return set(r["data"])

    def firing(self) -> set[str]:
        alerts = httpx.get(f"{self.prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def _state(root: Path):
    """Three built days, a champion, a scored day and the monitoring summaries of it."""
    p = make_project(root, with_mlflow=True)
    small_data(p, days=3, machines=8, seed=3)
    job = p.defs.resolve_job_def(f"{NAME}_data_job")
    for day in DAYS:
        job.execute_in_process(partition_key=day, instance=p.instance, run_config=QUIET)
    spec = load_spec(variant(root, "xgboost", {"n_estimators": 20, "max_depth": 3}))
    lineage = {"training_set_hash": "0" * 64, "training_partitions": [DAYS[0], DAYS[-1]]}
    frame = training_frame(p.lake, DAYS)
    art = str(root / ".mlops" / "mlartifacts")
    v = training.train_candidate(spec, frame, lineage, p.tracking_uri, art, trials=1).version
    registry.set_alias(p.tracking_uri, NAME, registry.CHAMPION, v)
    registry.record_deployment(p.lake, NAME, registry.Deployment("promote", None, v, "test"))
    day = DAYS[-1]
    p.lake.write(NAME, "batch_predictions", pl.DataFrame({"model_version": [v]}), day)
    for asset in ("drift_report", "model_performance"):  # summaries are listed by partition
        p.lake.write(NAME, asset, pl.DataFrame({"partition": [day]}), day)
    write_json(
        p.lake,
        NAME,
        "drift_report",
        day,
        {"partition": day, "drift_share": 0.1, "threshold": 0.3, "champion_version": v},
    )
    write_json(p.lake, NAME, "model_performance", day,
               {"partition": day, "primary_metric": "roc_auc", "realized": 0.8,
                "baseline": 0.82, "declined": False, "champion_version": v})  # fmt: skip
    return p


def _prometheus_config(root: Path, serve_port: int, exporter_port: int) -> Path:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    rules = []
    for f in sorted(PROM.glob("rules/*.yml")):
        doc = yaml.safe_load(f.read_text())
        for g in doc["groups"]:
            for r in g["rules"]:
                if "alert" in r:
                    r["for"] = "0s"
        (root / f.name).write_text(yaml.safe_dump(doc))
        rules.append(str(root / f.name))
    config["rule_files"] = rules
    ports = {"mlops-serving": serve_port, "mlops-exporter": exporter_port}
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        for sc in job["static_configs"]:
            sc["targets"] = [f"127.0.0.1:{ports[job['job_name']]}"]
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, request) -> World:
    prometheus = _require("prometheus", "prometheus")
    redis_server = _require("redis-server", "redis-server")
    root = tmp_path_factory.mktemp("prom-live")
    procs, logs = {}, {}

    def start(name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        logs[name] = root / f"{name}.log"
        procs[name] = processes.start(cmd, logs[name], env, root)
        request.addfinalizer(lambda: processes.stop(procs[name], grace=10))

    redis_port = free_port()
    start("redis", [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no"])  # fmt: skip
    p = _state(root)
    store_url = f"redis://127.0.0.1:{redis_port}/0"
    store = RedisOnlineStore(store_url)
    store.write_states(
        NAME, states_from_rows(p.spec, p.lake.read_many(NAME, "validated_data", DAYS))
    )
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    env.pop("MLOPS_SERVE_TOKEN", None)
    env.update(
        MLOPS_SPECS_DIR=str(root / "specs"),
        MLOPS_MLFLOW_TRACKING_URI=p.tracking_uri,
        MLOPS_ONLINE_STORE_URL=store_url,
        MLOPS_LAKE_URL=str(p.lake.base_url),
        DAGSTER_HOME=str(root / "dagster"),
    )
    (root / "dagster").mkdir()
    serve_port, exporter_port, prom_port = free_port(), free_port(), free_port()
    start("serve", [str(BIN / "mlops"), "serve", "--spec", NAME, "--port", str(serve_port),
                    "--max-future", "1e9", "--log-dir", str(root / "inference_log")], env)  # fmt: skip
    start("exporter", [str(BIN / "mlops"), "exporter", "--port", str(exporter_port)], env)
    config = _prometheus_config(root, serve_port, exporter_port)
    start("prometheus", [prometheus, f"--config.file={config}",
                         f"--storage.tsdb.path={root / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}"])  # fmt: skip
    serve = f"http://127.0.0.1:{serve_port}"
    for name, url in (("serve", f"{serve}/health/ready"),
                      ("exporter", f"http://127.0.0.1:{exporter_port}/metrics"),
                      ("prometheus", f"http://127.0.0.1:{prom_port}/-/ready")):  # fmt: skip
        processes.wait_until(lambda u=url: processes.http_ok(u), name, logs[name], 120,
                             proc=procs[name])  # fmt: skip
    w = World(f"http://127.0.0.1:{prom_port}", serve, None, procs, logs)
    # Traffic: good readings, and one malformed body (a rejection series).
    when = dt.datetime(2026, 1, 4, 0, 5)
    for k in range(5):
        assert httpx.post(f"{serve}/predict", json=reading(f"M000{k + 1}", when)).status_code == 200
    assert httpx.post(f"{serve}/predict", content=b"{").status_code in (400, 422)
    return w


def _up(w: World) -> bool:
    got = {s["metric"]["job"]: s["value"][1] for s in w.series("up")}
    return got == {"mlops-serving": "1", "mlops-exporter": "1"}


def test_prometheus_scrapes_both_targets_and_records_the_rules(world: World) -> None:
    wait(lambda: _up(world), 30, lambda: f"both targets up: {world.series('up')}")
    wanted = {
        "mlops_serving_requests_total", "mlops_serving_request_duration_seconds_bucket",
        "mlops_serving_predictions_total", "mlops_serving_feature_store_unavailable_total",
        "mlops_champion_version", "mlops_drift_share", "mlops_realized_metric",
        "mlops_realized_metric_baseline", "mlops_quarantine_rate", "mlops_partition_age_seconds",
        "mlops_retrainings_total", "mlops_retraining_refusals_total", "mlops_failed_runs_total",
        "spec:mlops_serving_predict_requests:rate5m", "spec:mlops_serving_predictions:rate5m",
    }  # fmt: skip
    wait(lambda: wanted <= world.names(), 30, lambda: f"series {sorted(wanted - world.names())}")
    (champion,) = world.series('mlops_champion_version{spec="machine_failure"}')
    assert champion["metric"]["job"] == "mlops-exporter" and champion["value"][1] == "1"
    stages = {s["metric"]["stage"] for s in world.series("mlops_partition_age_seconds")}
    assert stages >= {"built", "scored"}


def test_feature_store_down_fires_its_alert(world: World) -> None:
    processes.kill(world.procs["redis"], 10)
    when = dt.datetime(2026, 1, 4, 0, 6)

    def failing() -> bool:
        r = httpx.post(f"{world.serve}/predict", json=reading("M0001", when), timeout=10)
        assert r.status_code in (200, 503), r.text
        return {"MlopsFeatureStoreUnavailable", "MlopsServingErrorRate"} <= world.firing()

    wait(failing, 45, lambda: f"the alerts to fire: {world.firing()}")


def _metric_names(expr: str) -> set[str]:
    bare = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    bare = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare)
    return {t for t in tokens if t.startswith("mlops_") or ":" in t}


def test_every_dashboard_query_runs_and_names_exposed_metrics(world: World) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    names = world.names()
    problems = []
    for expr in exprs:
        q = expr.replace("$spec", ".*")
        body = world.query(q)
        if body["status"] != "success":
            problems.append(f"{expr}: {body.get('error')}")
        missing = _metric_names(q) - names
        if missing:
            problems.append(f"{expr}: no target or rule has {sorted(missing)}")
    assert problems == []
