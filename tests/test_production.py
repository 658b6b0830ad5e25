"""The production profile (deploy/) on real services: a Dagster instance in PostgreSQL with the
queued run coordinator (deploy/dagster.yaml), steps on two dagster-celery worker processes over
a Redis broker (deploy/celery.yaml), MLflow as an HTTP server on a PostgreSQL backend, Optuna
trials in PostgreSQL.

Skipped locally without PostgreSQL (127.0.0.1:5432) or Redis (127.0.0.1:6379); in CI
(CI=true) a missing service is a failure. Every test module run gets its own databases (dropped
afterwards) and its own broker key prefix, so parallel runs on one Redis never share a queue.

The backfill goes the way `make prod-backfill` sends it: `python -m
orchestration.backfills` launches a Dagster asset backfill through a real dagster-webserver, a
real `dagster-daemon run` requests, queues and launches its runs, and each run sends its steps
to the broker. The race of two runs on one day goes straight to the executor through the
daemon-free `python -m orchestration.direct_backfill` (the run queue would hold the second run
back). The default profile's result for the same days (the data job executed in process
against an ephemeral instance and a local lake) is the reference every lake file is compared
with, byte for byte.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest

from deploy.processes import http_ok, start, stop, wait_until
from deploy.services import (
    PG,
    celery_config,
    celery_worker_args,
    forget_broker_keys,
    free_port,
    mlflow_server_args,
    pg_url,
    scratch_database,
    worker_ready,
)
from mlops import watch
from mlops.lake import Lake
from orchestration.definitions import build_definitions
from orchestration.replay import backdate
from tests.conftest import (
    QUIET,
    REPO,
    Project,
    embedded_spec_text,
    make_project,
    require_postgres,
    require_redis,
    small_data,
)

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NAME = "machine_failure"
JOB = f"{NAME}_data_job"
START = dt.date(2026, 1, 1)
DAYS = 3  # landing files; the asset backfill takes the first BACKFILL_DAYS
BACKFILL_DAYS = 2  # through the daemon: its backfill ticks every 30 s, a run per day and level
LAKE_ASSETS = ("raw_data", "validated_data", "quarantine", "labels", "features")
LOOP = "fleet"  # the closed loop's spec
LOCK_ERRORS = re.compile(
    r"deadlock|database is locked|could not obtain lock|LockNotAvailable|could not serialize",
    re.IGNORECASE,
)


def _day(n: int) -> str:
    return (START + dt.timedelta(days=n - 1)).isoformat()


@dataclass
class Prod:
    root: Path
    home: Path
    env: dict[str, str]
    instance: dg.DagsterInstance
    project: Project  # its lake is the default profile's reference lake
    lake: Lake  # the production lake the workers write
    workers: dict[str, Path]  # worker name -> log file
    mlflow_port: int
    mlflow_db: str
    optuna_db: str
    logs: Path
    reference_days: set[str] = field(default_factory=set)

    @property
    def daemon_log(self) -> Path:
        return self.logs / "dagster-daemon.log"

    def reference(self, days: list[str]) -> None:
        """The default profile's result for these days (built once, in date order)."""
        for d in sorted(set(days) - self.reference_days):
            self.project.run_day(d)
            self.reference_days.add(d)

    def drive(self, *args: str, timeout: int = 600) -> dict:
        """`python -m orchestration.direct_backfill ...` with the profile's settings."""
        return self.drive_start(*args)(timeout)

    def drive_start(self, *args: str):
        """Start the driver; returns `wait(timeout) -> summary` (the caller works meanwhile)."""
        out = self.logs / f"drive-{uuid.uuid4().hex[:6]}.json"
        cmd = [sys.executable, "-m", "orchestration.direct_backfill", "--job", JOB]
        proc = subprocess.Popen(
            [*cmd, *args, "--out", str(out)],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its run processes go with it on a timeout
        )

        def wait(timeout: int) -> dict:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise
            assert out.exists(), stdout[-2000:] + stderr[-4000:]
            summary = json.loads(out.read_text())
            summary["stdout"], summary["stderr"] = stdout, stderr
            return summary

        return wait

    def worker_of_steps(self, run_id: str) -> dict[str, str]:
        """step key -> the celery worker that executed it (from the run's engine events)."""
        out = {}
        for rec in self.instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            ev = rec.dagster_event
            meta = ev.engine_event_data.metadata if ev.engine_event_data else {}
            if "Celery worker" in meta:
                out[ev.step_key] = meta["Celery worker"].value.split("@")[0]
        return out

    def assert_same_as_reference(self, days: list[str], lake: Lake | None = None) -> None:
        lake = lake or self.lake
        self.reference(days)
        diff = [
            f"{a}/{d}"
            for a in LAKE_ASSETS
            for d in days
            if lake.content_hash(NAME, a, d) != self.project.lake.content_hash(NAME, a, d)
        ]
        assert not diff, f"partitions that differ from the default profile: {diff[:10]}"

    def temp_files(self, lake: Lake) -> list[str]:
        found = []
        for a in LAKE_ASSETS:
            folder = f"{lake.root}/{NAME}/{a}"
            if lake.fs.exists(folder):
                found += [p for p in lake.fs.ls(folder, detail=False) if "/.tmp-" in p]
        return found


@pytest.fixture(scope="module")
def prod(tmp_path_factory) -> Prod:
    require_postgres()
    require_redis()
    root = tmp_path_factory.mktemp("prod")
    logs = root / "logs"
    logs.mkdir()
    project = make_project(root)
    small_data(project, days=DAYS, machines=3, seed=3)
    # The closed loop's own spec beside it (its own landing folders, lake folder and model):
    # the workers load the code location once, with both.
    (root / "specs" / f"{LOOP}.yaml").write_text(_loop_spec_text())
    with contextlib.ExitStack() as stack:
        dagster_db = stack.enter_context(scratch_database("mlops_test_dagster"))
        mlflow_db = stack.enter_context(scratch_database("mlops_test_mlflow"))
        optuna_db = stack.enter_context(scratch_database("mlops_test_optuna"))
        home = root / "dagster_home"
        home.mkdir()
        # The profile's dagster.yaml as shipped; the environment points it at this database.
        (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster.yaml").read_text())
        pg_env = {
            "MLOPS_PG_HOST": PG["host"],
            "MLOPS_PG_PORT": str(PG["port"]),
            "MLOPS_PG_USER": PG["user"],
            "MLOPS_PG_PASSWORD": "",
            "MLOPS_PG_DB": dagster_db,
        }
        prefix = f"mlops-test-{uuid.uuid4().hex[:8]}:"
        port = free_port()
        env = {
            **os.environ,
            **pg_env,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DAGSTER_HOME": str(home),
            "MLOPS_SPECS_DIR": str(root / "specs"),
            "MLOPS_LAKE_URL": str(root / "lake_prod"),
            "MLOPS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
            "MLOPS_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/",
            "MLOPS_OPTUNA_STORAGE": pg_url(optuna_db),
            "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / 'online_prod.db'}",
            "MLOPS_EXECUTOR": "celery",
            "MLOPS_CELERY_BROKER": "redis://127.0.0.1:6379/1",
            "MLOPS_CELERY_BACKEND": "redis://127.0.0.1:6379/2",
            "MLOPS_CELERY_KEY_PREFIX": prefix,
        }
        env.pop("CI", None)  # the services' processes need not know
        celery_cfg = celery_config(root / "celery.yaml", prefix)
        monkey = stack.enter_context(pytest.MonkeyPatch.context())
        for k, v in pg_env.items():
            monkey.setenv(k, v)

        procs: list[subprocess.Popen] = []
        # (exit order: the broker keys go after the workers stop)
        stack.callback(forget_broker_keys, env["MLOPS_CELERY_BROKER"], prefix)
        stack.callback(lambda: [stop(p) for p in procs])
        workers = {}
        for n in (1, 2):
            name = f"w{n}-{prefix[11:19]}"
            workers[name] = logs / f"{name}.log"
            procs.append(start(celery_worker_args(celery_cfg, name), workers[name], env))
        # The MLflow server starts now (its schema migration takes a while); tests wait.
        artifacts = str(root / "mlflow-artifacts")
        args = mlflow_server_args(pg_url(mlflow_db), artifacts, port)
        procs.append(start(args, logs / "mlflow.log", env))
        instance = stack.enter_context(dg.DagsterInstance.from_config(str(home)))
        prod = Prod(
            root,
            home,
            env,
            instance,
            project,
            Lake(str(root / "lake_prod")),
            workers,
            port,
            mlflow_db,
            optuna_db,
            logs,
        )
        for name, log in workers.items():
            wait_until(lambda log=log: worker_ready(log), f"celery worker {name}", log)
        yield prod


# --- the executor comes from the environment (no services needed) ------------------------


def test_executor_and_backfill_waves_come_from_the_environment(tmp_path, monkeypatch):
    from orchestration.direct_backfill import dependency_waves

    make_project(tmp_path)

    def executor() -> str:
        defs = build_definitions(tmp_path / "specs", str(tmp_path / "lake"))
        return defs.resolve_job_def(JOB).executor_def.name

    monkeypatch.delenv("MLOPS_EXECUTOR", raising=False)
    monkeypatch.delenv("MLOPS_MULTIPROCESS_START_METHOD", raising=False)
    assert executor() == "in_process"  # the default profile: no interpreter per step
    monkeypatch.setenv("MLOPS_EXECUTOR", "multiprocess")
    assert executor() == "multi_or_in_process_executor"  # Dagster's own default
    monkeypatch.setenv("MLOPS_EXECUTOR", "celery")
    assert executor() == "celery"
    monkeypatch.setenv("MLOPS_EXECUTOR", "multiprocess")
    monkeypatch.setenv("MLOPS_MULTIPROCESS_START_METHOD", "forkserver")
    assert executor() == "multiprocess"
    monkeypatch.setenv("MLOPS_EXECUTOR", "dask")
    with pytest.raises(ValueError, match="MLOPS_EXECUTOR='dask'"):
        executor()
    monkeypatch.delenv("MLOPS_EXECUTOR")
    monkeypatch.delenv("MLOPS_MULTIPROCESS_START_METHOD")
    defs = build_definitions(tmp_path / "specs", str(tmp_path / "lake"))
    waves = [[k.path[-1] for k in w] for w in dependency_waves(defs, JOB)]
    assert waves == [
        ["labels", "quarantine", "raw_data", "validated_data"],
        ["features", "online_features"],  # they read the day before: one wave later
    ]


# --- (a) the demo's closed loop on the production profile ----------------------------------


def _loop_spec_text() -> str:
    """The embedded spec under another name, small enough for a test (as in test_loop)."""
    return embedded_spec_text(
        ("name: machine_failure", f"name: {LOOP}"),  # and registered_name
        (".mlops/landing/machine_failure/", f".mlops/landing/{LOOP}/"),
        ("latency_budget_ms: 50", "latency_budget_ms: 500"),  # a loaded CI machine
        ("training_window_days: 14", "training_window_days: 6"),
        # One retraining per episode: the test is about where runs execute, not recovery.
        (
            "retrain_cooldown_partitions: 7",
            "retrain_cooldown_partitions: 4\n  max_attempts_per_episode: 1",
        ),
    )


LOOP_DAYS, LOOP_BUILD, LOOP_DRIFT = 15, 8, 11


def test_demo_loop_runs_on_celery_workers_postgres_and_the_mlflow_server(prod: Prod):
    """`make prod-demo`'s loop (python -m demo with MLOPS_EXECUTOR=celery) at small
    scale: every run in the Postgres instance, every step on a celery worker, every model in
    the MLflow server, every Optuna trial in Postgres; the drift is caught and retrained on."""
    from mlflow import MlflowClient

    url = prod.env["MLOPS_MLFLOW_TRACKING_URI"]
    wait_until(lambda: http_ok(f"{url}/health"), "MLflow server", prod.logs / "mlflow.log")
    spec_path = prod.root / "specs" / f"{LOOP}.yaml"
    args = ["--spec", str(spec_path), "--days", str(LOOP_DAYS), "--build-days", str(LOOP_BUILD)]
    args += ["--drift-from", str(LOOP_DRIFT), "--machines", "20", "--trials", "2"]
    t0 = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-m", "demo", *args],
        env=prod.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    print(f"the loop on the production profile: {time.monotonic() - t0:.0f} s")
    timeline = json.loads((prod.root / ".mlops" / "reports" / LOOP / "timeline.json").read_text())
    assert [r["n"] for r in timeline] == list(range(LOOP_BUILD + 1, LOOP_DAYS + 1))

    # Every run is in PostgreSQL, and every step that ran, ran on a celery worker.
    assert type(prod.instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(prod.instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    runs = [r for r in prod.instance.get_runs() if r.job_name.startswith(f"{LOOP}_")]
    jobs = {r.job_name.removeprefix(f"{LOOP}_") for r in runs}
    assert {"data_job", "labels_job", "scoring_job", "training_job"} <= jobs, jobs
    used = set()
    for r in runs:
        started = {
            rec.dagster_event.step_key
            for rec in prod.instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_START)
        }
        on_workers = prod.worker_of_steps(r.run_id)
        assert started and started == set(on_workers), (r.job_name, started, on_workers)
        used |= set(on_workers.values())
    assert used == set(prod.workers), f"steps ran on {used}, workers {set(prod.workers)}"
    # The spec's pools exist at deploy/dagster.yaml's default limit (one step at a time).
    for pool in (f"{LOOP}/online_store", f"{LOOP}/registry"):
        assert prod.instance.event_log_storage.get_concurrency_info(pool).slot_count == 1

    # The drift was caught: a retraining after the drift began, with its reason.
    drift_day = (START + dt.timedelta(days=LOOP_DRIFT - 1)).isoformat()
    retrains = [
        r
        for r in runs
        if r.job_name == f"{LOOP}_training_job" and r.tags.get("mlops/trigger") != "initial"
    ]
    assert retrains, demo.stdout[-3000:]
    assert all(r.tags["mlops/trigger_partition"] >= drift_day for r in retrains)
    assert all(r.tags["mlops/trigger_reason"] for r in retrains)

    # Models are in the MLflow server (artifacts served by it); trials in PostgreSQL.
    client = MlflowClient(url, registry_uri=url)  # not the process-wide registry
    versions = client.search_model_versions(f"name = '{LOOP}'")
    assert len(versions) == 1 + len(retrains), [v.version for v in versions]
    champion = client.get_model_version_by_alias(LOOP, "champion")
    assert int(champion.version) == timeline[-1]["champion"]
    mlflow_run = client.get_run(champion.run_id)
    assert mlflow_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert mlflow_run.data.tags["mlops.dagster_run_id"] in {r.run_id for r in runs}
    import optuna

    study = mlflow_run.data.tags["optuna.study_name"]
    assert optuna.load_study(study_name=study, storage=prod.env["MLOPS_OPTUNA_STORAGE"]).trials


# --- (b) an asset backfill through the daemon, on two workers ----------------------------


@contextlib.contextmanager
def daemon_and_webserver(prod: Prod) -> Iterator[str]:
    """`dagster-daemon run` and `dagster-webserver` on the profile's instance and the shipped
    workspace.yaml, as `make prod-up` starts them; yields the webserver's URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web = ["-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    procs = [
        start(
            [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], prod.daemon_log, prod.env
        ),
        start([str(BIN / "dagster-webserver"), *web], prod.logs / "webserver.log", prod.env),
    ]
    try:
        wait_until(lambda: http_ok(f"{url}/server_info"), "webserver", prod.logs / "webserver.log")
        yield url
    finally:
        for proc in procs:
            stop(proc)


def test_asset_backfill_through_the_daemon_matches_the_default_profile(prod: Prod):
    from mlops.spec import find_specs
    from orchestration.pools import initialize_pools

    days = [_day(n) for n in range(1, BACKFILL_DAYS + 1)]
    initialize_pools(prod.instance, find_specs(prod.root / "specs"))  # as `make prod-up` does
    t0 = time.time()
    with daemon_and_webserver(prod) as url:
        span = [f"--from={days[0]}", f"--to={days[-1]}", "--timeout=600"]
        launch = subprocess.Popen(
            [sys.executable, "-m", "orchestration.backfills", "--url", url, "--job", JOB, *span],
            env=prod.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        prod.reference(days)  # the default profile's result, built meanwhile
        stdout, stderr = launch.communicate(timeout=700)
    out = stdout[-3000:] + stderr[-3000:] + prod.daemon_log.read_text()[-3000:]
    assert launch.returncode == 0, out
    print(
        f"{len(days)}-day asset backfill through the daemon, 2 celery workers: {time.time() - t0:.0f} s"
    )

    # A Backfill in the instance (the UI's Backfills page lists these), an asset backfill.
    backfill_id = re.search(r"asset backfill (\w+):", stdout)[1]
    backfill = prod.instance.get_backfill(backfill_id)
    assert backfill_id in [b.backfill_id for b in prod.instance.get_backfills()]
    assert backfill.is_asset_backfill and backfill.status.value == "COMPLETED_SUCCESS", out
    runs = prod.instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    assert runs and all(r.is_success for r in runs), [r.status for r in runs]
    run_ids = {r.run_id for r in runs}

    # Every partition of every asset, materialized by the backfill's runs, in dependency
    # order: a day's features after the validated rows of every day their lookback reads.
    first: dict[str, dict[str, float]] = {}
    for asset in (*LAKE_ASSETS, "online_features"):
        records = prod.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey([NAME, asset])), limit=1000
        ).records
        when: dict[str, float] = {}
        for r in records:
            if r.run_id in run_ids:
                when[r.partition_key] = min(when.get(r.partition_key, r.timestamp), r.timestamp)
        assert sorted(when) == days, (asset, sorted(set(days) - set(when))[:5])
        first[asset] = when
    lookback = prod.project.spec.features.lookback_days
    late = [
        (d, days[m])
        for n, d in enumerate(days)
        for m in range(max(0, n - lookback), n + 1)
        if first["features"][d] <= first["validated_data"][days[m]]
    ]
    assert not late, f"features before the validated days they read: {late[:5]}"
    assert all(first["online_features"][d] >= first["features"][d] for d in days)

    prod.assert_same_as_reference(days)
    assert not prod.temp_files(prod.lake)
    used = set()
    errors = []
    for run_id in run_ids:
        used |= set(prod.worker_of_steps(run_id).values())
        errors += [
            r.message
            for r in prod.instance.all_logs(run_id)
            if r.dagster_event and r.dagster_event.is_failure
        ]
    assert used == set(prod.workers)
    assert not errors, errors[:5]
    logs = [log.read_text() for log in prod.workers.values()]
    text = "\n".join([*logs, stdout, stderr, prod.daemon_log.read_text()])
    assert not LOCK_ERRORS.findall(text), LOCK_ERRORS.findall(text)[:5]


# --- (c) SIGKILL in the middle of a write --------------------------------------------------

KILLED_WRITE = r"""
import io, os, signal, sys
import polars as pl

day, asset = sys.argv[1], sys.argv[2]
original = pl.DataFrame.write_parquet

def write_parquet(self, file, *args, **kwargs):
    # Fault injection, nothing else changed: half of the partition's bytes reach the
    # temporary file (the lake streams a local partition straight into it), then the
    # process is killed (no handler, no cleanup can run).
    path = str(file) if isinstance(file, (str, os.PathLike)) else ""
    if f"/{asset}/.tmp-" in path and f"-{day}.parquet" in path:
        buf = io.BytesIO()
        original(self, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, file, *args, **kwargs)

pl.DataFrame.write_parquet = write_parquet

import dagster as dg
from orchestration.definitions import defs
from orchestration.jobs import QUIET

with dg.DagsterInstance.get() as instance:
    defs.resolve_job_def(sys.argv[3]).execute_in_process(
        partition_key=day, instance=instance, raise_on_error=False,
        run_config=QUIET,
    )
print("not killed")
"""


def test_sigkill_while_writing_leaves_no_partial_partition_and_a_rerun_succeeds(prod: Prod):
    day = _day(1)
    lake = Lake(str(prod.root / "lake_kill"))
    env = {**prod.env, "MLOPS_LAKE_URL": lake.base_url, "MLOPS_EXECUTOR": ""}
    # 1. The day's validated rows are written; the run dies half-way through its features.
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, day, "features", JOB],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr[-3000:]
    partial = prod.temp_files(lake)
    assert len(partial) == 1 and "/features/" in partial[0]  # killed mid-write, for real
    assert lake.fs.size(partial[0]) > 0
    # Readers see the partitions that were completed and nothing of the killed one.
    assert lake.partitions(NAME, "validated_data") == [day]
    assert lake.partitions(NAME, "features") == []
    assert not lake.exists(NAME, "features", day)
    with pytest.raises(FileNotFoundError):
        lake.read(NAME, "features", day)
    run = prod.instance.get_runs(dg.RunsFilter(tags={"dagster/partition": day}), limit=1)[0]
    # The record stays STARTED: deploy/dagster.yaml's run monitoring fails it after
    # max_runtime_seconds (the default run launcher cannot see a run process die).
    assert run.status == dg.DagsterRunStatus.STARTED

    # 2. A re-run replaces the day and gives the default profile's bytes.
    defs = build_definitions(
        prod.root / "specs",
        lake.base_url,
        env["MLOPS_MLFLOW_TRACKING_URI"],
        env["MLOPS_MLFLOW_ARTIFACT_ROOT"],
        f"sqlite:///{prod.root / 'online_kill.db'}",
    )
    result = defs.resolve_job_def(JOB).execute_in_process(
        partition_key=day, instance=prod.instance, run_config=QUIET
    )
    assert result.success
    prod.assert_same_as_reference([day], lake)
    assert lake.partitions(NAME, "features") == [day]
    # The hidden temporary file is left behind, but no reader of the lake lists it.
    assert prod.temp_files(lake) == partial
    frame = lake.query(f"SELECT count(*) AS n FROM {lake.relation_sql(NAME, 'features', [day])}")
    assert frame["n"][0] == lake.read(NAME, "features", day).height


# --- (d) a sensor daemon killed during a tick ---------------------------------------------

SENSOR_DAEMON = r"""
import logging, os, signal, sys, time

import dagster as dg
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster import QueuedRunCoordinator
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.sensor import execute_sensor_iteration

sensor_name, kill_after = sys.argv[1], int(sys.argv[2])
if kill_after:
    # Fault injection: the daemon dies inside its (kill_after + 1)-th run submission, after
    # creating that run and before the queue has it.
    submitted = []
    original = QueuedRunCoordinator.submit_run

    def submit_run(self, context):
        if len(submitted) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        submitted.append(context.dagster_run.run_id)
        return original(self, context)

    QueuedRunCoordinator.submit_run = submit_run

origin = InProcessCodeLocationOrigin(
    LoadableTargetOrigin(
        executable_path=sys.executable,
        module_name="orchestration.definitions",
        attribute="defs",
        working_directory=os.getcwd(),
    ),
    location_name="mlops",
)
logging.basicConfig(level=logging.INFO)
with dg.DagsterInstance.get() as instance:
    target = InProcessWorkspaceLoadTarget(origin)
    with create_test_daemon_workspace_context(target, instance) as ctx:
        location = ctx.create_request_context().get_code_location("mlops")
        sensor = next(iter(location.get_repositories().values())).get_sensor(sensor_name)
        ids = (sensor.get_remote_origin_id(), sensor.selector_id)
        state = instance.get_instigator_state(*ids)
        if state is None or not state.is_running:
            instance.start_sensor(sensor)
        # What the sensor daemon does every second: tick the sensors that are due (a tick is
        # due once minimum_interval_seconds have passed since the last one began).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            list(execute_sensor_iteration(ctx, logging.getLogger("sensor"), None, None))
            ticks = instance.get_ticks(*ids, limit=1)
            if ticks and ticks[0].status != TickStatus.STARTED:
                print(f"tick {ticks[0].tick_id} {ticks[0].status.value} runs={len(ticks[0].run_ids)}")
                break
            time.sleep(1)
"""


def test_sensor_daemon_killed_mid_tick_starts_exactly_one_run_per_file(prod: Prod, tmp_path):
    """ "Starts" is what the sensor daemon does for a run request: create the run in the
    instance and submit it to the queued run coordinator (status QUEUED); the run queue
    (not running here) launches queued runs within deploy/dagster.yaml's limits."""
    p = make_project(tmp_path)
    small_data(p, days=6, machines=3, seed=4)
    files = sorted(p.spec.landing_dir.glob("*.csv"))
    backdate(files, p.spec.source.settle_seconds)  # complete files: the first tick reads them
    env = {
        **prod.env,
        "MLOPS_SPECS_DIR": str(tmp_path / "specs"),
        "MLOPS_LAKE_URL": str(tmp_path / "lake"),
        "MLOPS_EXECUTOR": "",
    }
    sensor = f"{NAME}_new_data_sensor"

    def daemon(kill_after: int) -> subprocess.CompletedProcess:
        args = [sys.executable, "-c", SENSOR_DAEMON, sensor, str(kill_after)]
        return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)

    def runs() -> list[dg.DagsterRun]:
        return list(prod.instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name": sensor})))

    first = daemon(kill_after=2)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr[-3000:]
    statuses = sorted(r.status.value for r in runs())
    assert statuses == ["NOT_STARTED", "QUEUED", "QUEUED"], statuses  # killed mid-tick

    second = daemon(kill_after=0)  # the restarted daemon resumes the interrupted tick
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert "SUCCESS" in second.stdout, second.stdout + second.stderr[-3000:]
    got = runs()
    keys = [r.tags["dagster/run_key"] for r in got]
    assert len(got) == len(files) == 6 and len(set(keys)) == len(keys)
    assert sorted(r.tags["dagster/partition"] for r in got) == [_day(n) for n in range(1, 7)]
    assert {r.status for r in got} == {dg.DagsterRunStatus.QUEUED}
    assert all(k.startswith("data:") for k in keys)
    # The cursor now holds every file: the next tick requests nothing again.
    from dagster._core.scheduler.instigation import InstigatorType

    state = next(
        s
        for s in prod.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        if s.name == sensor
    )
    assert sorted(watch.decode(state.instigator_data.cursor)["r"]) == [_day(n) for n in range(1, 7)]


# --- (e) two runs racing for one partition ------------------------------------------------


def test_two_runs_racing_for_one_partition_leave_one_correct_result(prod: Prod):
    day = _day(1)
    for a in LAKE_ASSETS:
        prod.lake.delete(NAME, a, day)
    # Straight to the executor: the run queue would hold the second run back
    # (dagster/partition limit in deploy/dagster.yaml); the lake must not need it to.
    summary = prod.drive(
        f"--partition={day}", f"--partition={day}", "--no-waves", "--concurrency=2"
    )
    assert summary["failed"] == 0, summary["stdout"] + summary["stderr"][-3000:]
    a, b = (prod.instance.get_run_record_by_id(o["run_id"]) for o in summary["outcomes"])
    assert a.start_time < b.end_time and b.start_time < a.end_time  # they overlapped
    for asset in LAKE_ASSETS:
        assert prod.lake.partitions(NAME, asset).count(day) == 1
    prod.assert_same_as_reference([day])
    assert not prod.temp_files(prod.lake)


# --- (f) MLflow over HTTP on PostgreSQL, Optuna in PostgreSQL ----------------------------


def _train(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict:
    job = defs.resolve_job_def(f"{NAME}_training_job")
    cfg = {"ops": {f"{NAME}__candidate_model": {"config": {"trials": 2}}}}
    result = job.execute_in_process(
        instance=instance,
        run_config={**QUIET, **cfg},
        asset_selection=[
            dg.AssetKey([NAME, "training_set"]),
            dg.AssetKey([NAME, "candidate_model"]),
        ],
    )
    for e in result.get_asset_materialization_events():
        mat = e.step_materialization_data.materialization
        if mat.asset_key.path[-1] == "candidate_model":
            return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError("no candidate")


def test_mlflow_server_on_postgres_records_the_same_lineage(prod: Prod, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    p = make_project(tmp_path, with_mlflow=True)
    small_data(p, days=14, machines=20, seed=5)
    for n in range(1, 15):
        p.run_day(_day(n))
    local = _train(p.defs, dg.DagsterInstance.ephemeral())  # the default profile

    url = f"http://127.0.0.1:{prod.mlflow_port}"
    wait_until(lambda: http_ok(f"{url}/health"), "MLflow server", prod.logs / "mlflow.log")
    optuna_url = pg_url(prod.optuna_db)
    monkeypatch.setenv("MLOPS_OPTUNA_STORAGE", optuna_url)
    defs = build_definitions(
        tmp_path / "specs",
        p.lake.base_url,
        url,
        "mlflow-artifacts:/",  # the server stores artifacts (--serve-artifacts)
        f"sqlite:///{tmp_path / '.mlops' / 'online.db'}",
    )
    remote = _train(defs, prod.instance)

    a = MlflowClient(p.tracking_uri, registry_uri=p.tracking_uri)
    b = MlflowClient(url, registry_uri=url)
    run_a, run_b = a.get_run(local["mlflow_run_id"]), b.get_run(remote["mlflow_run_id"])
    assert run_b.info.artifact_uri.startswith("mlflow-artifacts:/")
    tags_a = {k: v for k, v in run_a.data.tags.items() if k.startswith("mlops.")}
    tags_b = {k: v for k, v in run_b.data.tags.items() if k.startswith("mlops.")}
    assert set(tags_a) == set(tags_b) and len(tags_a) > 10
    differ = {k for k in tags_a if tags_a[k] != tags_b[k]}
    # Same data, spec, code, window: only the Dagster run differs (its id and its page).
    assert differ == {"mlops.dagster_run_id", "mlops.dagster_run_url"}, differ
    assert tags_b["mlops.dagster_run_url"].endswith(f"/runs/{tags_b['mlops.dagster_run_id']}")
    va = a.get_model_version(NAME, str(local["model_version"])).tags
    vb = b.get_model_version(NAME, str(remote["model_version"])).tags
    assert {k for k in va if k.startswith("mlops.")} == {k for k in vb if k.startswith("mlops.")}
    assert b.list_artifacts(run_b.info.run_id, "lineage")  # through the server's artifact store

    # Optuna kept the trials in PostgreSQL, and the search found what the in-memory one did.
    import optuna

    study = optuna.load_study(study_name=run_b.data.tags["optuna.study_name"], storage=optuna_url)
    assert len(study.trials) == 2
    assert remote["params"] == local["params"]
    assert remote["valid_roc_auc"] == local["valid_roc_auc"]
