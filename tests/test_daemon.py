"""The daemon path: `dagster-daemon run` on a temp project and instance, as `make ui` runs it.

`running_daemon(project, overrides)` starts the daemon (its own process group, killed on exit)
on a temp DAGSTER_HOME whose dagster.yaml is the default profile's (orchestration/instance.py)
merged with the test's overrides, a copy of the shipped workspace.yaml and the project's
MLOPS_* settings, with MLOPS_EXECUTOR=in_process (one interpreter per run, not per step).
`Daemon.start_sensor` turns a sensor on as a user would (`dagster sensor start`);
`Daemon.wait` polls with a timeout and shows the daemon's log when it runs out.

The daemon imports this module for FlakyRunLauncher (the instance names it), so the
project's heavy imports stay inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dagster as dg
import yaml
from dagster._core.errors import DagsterUserCodeUnreachableError

if TYPE_CHECKING:
    from tests.conftest import Project

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
T = TypeVar("T")
_FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


class FlakyRunLauncher(dg.DefaultRunLauncher):
    """Dagster's run launcher, except that the first `fail_launches` launches of the first
    attempt of a run on one of `fail_partitions` raise as a code server that did not answer in
    time (what 3 of 15 sensor-launched runs hit on a loaded 2-core machine). Retries (runs
    tagged dagster/parent_run_id) launch normally. The only fault this module injects."""

    def __init__(
        self,
        inst_data: Any = None,
        fail_partitions: list[str] | None = None,
        fail_launches: int = 1,
    ):
        super().__init__(inst_data=inst_data)
        self._partitions = set(fail_partitions or [])
        self._failures_left: dict[str, int] = {}
        self._fail_launches = fail_launches

    @classmethod
    def config_type(cls) -> dict:
        return {
            "fail_partitions": dg.Field([str], is_required=False, default_value=[]),
            "fail_launches": dg.Field(int, is_required=False, default_value=1),
        }

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context) -> None:
        run = context.dagster_run
        first_attempt = "dagster/parent_run_id" not in run.tags
        if first_attempt and run.tags.get("dagster/partition") in self._partitions:
            left = self._failures_left.setdefault(run.run_id, self._fail_launches)
            if left > 0:
                self._failures_left[run.run_id] = left - 1
                raise DagsterUserCodeUnreachableError(
                    "User code server request timed out due to taking longer than 60 seconds "
                    "to complete. (injected by tests/test_daemon.py)"
                )
        super().launch_run(context)


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Daemon:
    project: Project
    home: Path
    workspace: Path
    env: dict[str, str]
    log: Path
    instance: dg.DagsterInstance

    def start_sensors(self, *names: str, timeout: float = 120) -> None:
        """Turn sensors on as a user would, `dagster sensor start` (each a code-location load
        of its own, so they run side by side)."""
        procs = [
            subprocess.Popen(
                [str(BIN / "dagster"), "sensor", "start", "-w", str(self.workspace), name],
                cwd=REPO,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name in names
        ]
        for name, proc in zip(names, procs, strict=True):
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(
                    f"dagster sensor start {name}: not within {timeout} s"
                ) from None
            assert proc.returncode == 0, f"dagster sensor start {name}:\n{out[-3000:]}"

    def wait(self, what: str, until: Callable[[], T | None], timeout: float) -> T:
        """Poll `until` every half second until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = until()
            if got:
                return got
            time.sleep(0.5)
        raise AssertionError(
            f"{what}: not within {timeout:.0f} s. Runs: {self.runs_summary()}\n"
            f"daemon log (tail):\n{self.log.read_text()[-4000:]}"
        )

    def idle(self) -> bool:
        """No run queued or in flight (a lake file can appear before its run has ended)."""
        return not self.instance.get_runs(
            dg.RunsFilter(statuses=[s for s in dg.DagsterRunStatus if s not in _FINISHED]),
            limit=1,
        )

    def runs(self, **tags: str) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(dg.RunsFilter(tags=tags) if tags else None))

    def runs_summary(self) -> list[tuple[str, str, str | None, str | None]]:
        return [
            (r.run_id[:8], r.status.value, r.tags.get("dagster/partition"), r.parent_run_id)
            for r in self.runs()
        ]


@contextlib.contextmanager
def running_daemon(p: Project, overrides: Mapping | None = None) -> Iterator[Daemon]:
    """`dagster-daemon run` on the project's temp root until the block ends."""
    from orchestration.instance import DEFAULT_INSTANCE_YAML

    root = p.root
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    config = _merge(yaml.safe_load(DEFAULT_INSTANCE_YAML), overrides or {})
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    workspace = root / "workspace.yaml"
    shutil.copy(REPO / "workspace.yaml", workspace)
    env = {
        **os.environ,
        # tests/test_definitions.py _env: the project's lake, registry and online store
        "MLOPS_SPECS_DIR": str(root / "specs"),
        "MLOPS_LAKE_URL": str(root / ".mlops" / "lake"),
        "MLOPS_MLFLOW_TRACKING_URI": p.tracking_uri or f"sqlite:///{root / '.mlops' / 'mlflow.db'}",
        "MLOPS_MLFLOW_ARTIFACT_ROOT": str(root / ".mlops" / "mlartifacts"),
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / '.mlops' / 'online.db'}",
        "DAGSTER_HOME": str(home),
        "MLOPS_EXECUTOR": "in_process",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        # the retry daemon looks for failed runs every second instead of every 5
        "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "1",
    }
    env.pop("MLOPS_ALERT_WEBHOOK_URL", None)
    log = root / "daemon.log"
    instance = dg.DagsterInstance.from_config(str(home))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the code server and run workers
        )
    try:
        yield Daemon(p, home, workspace, env, log, instance)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        proc.wait(timeout=10)
        instance.dispose()


def test_a_run_that_failed_to_launch_is_retried_and_alerts_no_one(tmp_path):
    """A sensor-launched run whose launches time out on the code server is put back into the
    queue, then failed once those attempts are spent; the daemon retries it as a new run that
    builds the day. Its run key means the sensor never asks again: only the retry saves it."""

    from orchestration.replay import backdate
    from resources.alerting import AlertingResource
    from sensors.alerts import run_failure_sensor_name
    from sensors.new_data import new_data_sensor_name
    from tests.conftest import make_project, small_data

    p = make_project(tmp_path)
    small_data(p, days=1, machines=3)
    backdate(p.spec.landing_dir.iterdir(), p.spec.source.settle_seconds)  # complete files
    day = "2026-01-01"
    overrides = {
        "run_launcher": {
            "module": "tests.test_daemon",
            "class": "FlakyRunLauncher",
            "config": {"fail_partitions": [day], "fail_launches": 4},
        },
        # the default's 3 re-queues of an unreachable code server, 1 s apart instead of 30
        "run_queue": {"user_code_failure_retry_delay": 1, "dequeue_interval_seconds": 1},
    }
    with running_daemon(p, overrides) as d:
        d.start_sensors(new_data_sensor_name(p.spec))
        first = d.wait(
            "the new-data sensor's run fails after its re-queued launches",
            lambda: [
                r
                for r in d.runs(**{"dagster/partition": day})
                if r.parent_run_id is None and r.status == dg.DagsterRunStatus.FAILURE
            ],
            timeout=90,
        )[0]
        retry = d.wait(
            "the daemon's retry of the failed run succeeds",
            lambda: [
                r
                for r in d.runs(**{"dagster/parent_run_id": first.run_id})
                if r.status == dg.DagsterRunStatus.SUCCESS
            ],
            timeout=120,
        )[0]

    first = d.instance.get_run_by_id(first.run_id)
    assert first.tags["dagster/will_retry"] == "true"
    assert first.tags["dagster/run_key"].startswith(f"data:{day}:")
    requeued = [
        e
        for e in d.instance.all_logs(first.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if "re-submitting the run into the queue" in (e.message or "")
    ]
    assert len(requeued) == 3, "the default re-queues an unreachable code server 3 times"
    assert retry.tags["dagster/retry_number"] == "1"
    assert retry.tags["dagster/root_run_id"] == first.run_id
    assert retry.tags["dagster/run_key"] == first.tags["dagster/run_key"]
    assert p.lake.read(p.spec.name, "validated_data", day).height > 0

    # The run-failure sensor on the real failure event: Dagster will retry (and did), so no alert.
    name = run_failure_sensor_name(p.spec)
    (record,) = d.instance.get_records_for_run(
        first.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    posted: list[tuple] = []

    class Recording(AlertingResource):
        def alert(self, title: str, text: str, fields: dict | None = None) -> bool:
            posted.append((title, text, fields))
            return False

    ctx = dg.build_run_status_sensor_context(
        sensor_name=name,
        dagster_event=record.event_log_entry.dagster_event,
        dagster_instance=d.instance,
        dagster_run=first,
        resources={"alerting": Recording()},
    )
    p.defs.get_repository_def().get_sensor_def(name)(ctx)
    assert posted == []


def _land(feed, source: Path, target: Path, day) -> None:
    """A day's files of one feed into its landing folder, each appearing whole and settled."""
    from mlops import ingest
    from orchestration.replay import land_file

    for f in ingest.files_for_day(feed, source, day):
        land_file(f, target, feed.settle_seconds)


def test_landed_days_are_built_scored_and_evaluated_by_the_daemon_alone(tmp_path):
    """A champion serves; a day lands, then the day before it (late), later their label
    feed: the daemon's new-data and monitoring sensors build, score, monitor and evaluate
    both, with no manual step and no wall-clock schedule."""
    import datetime as dt

    from catalog.jobs import training_job_name
    from mlops.monitoring import DRIFT_REPORT, MODEL_PERFORMANCE, RetrainDecision
    from orchestration.replay import Replay
    from sensors.monitoring import monitoring_sensor_name
    from sensors.new_data import new_data_sensor_name
    from tests.conftest import QUICK_TRAINING, embedded_spec_text, make_project, small_data

    build, new, lag = 5, 2, 3  # lag: the event feed's maturity (72 h) in days
    text = embedded_spec_text(*QUICK_TRAINING)
    p = make_project(tmp_path, text, with_mlflow=True)
    spec = p.spec
    small_data(p, days=build + new + lag, machines=24)
    readings, events = spec.landing_dir, spec.resolve(spec.labels.events.path)
    stage_r, stage_e = tmp_path / "stage" / "readings", tmp_path / "stage" / "events"
    stage_r.parent.mkdir()
    shutil.move(readings, stage_r)
    shutil.move(events, stage_e)
    readings.mkdir(parents=True)
    events.mkdir(parents=True)
    days = [spec.source.start_date + dt.timedelta(days=i) for i in range(build + new + lag)]
    first_days, landed_days = days[:build], days[build : build + new]
    landed = [day.isoformat() for day in landed_days]

    def missing(*assets: str) -> list[tuple[str, str]]:
        return [(a, d) for d in landed for a in assets if not p.lake.exists(spec.name, a, d)]

    with running_daemon(p) as d:
        # Before the daemon's sensors are on: the first days (their labels mature: the feed
        # through `lag` days later) and the first champion, through the same sensors in this
        # process (orchestration/replay.py) with the run keys the daemon would give them.
        for day in first_days:
            _land(spec.source, stage_r, readings, day)
        for day in days[: build + lag]:
            _land(spec.labels.events, stage_e, events, day)
        replay = Replay(spec, p.defs, d.instance, p.lake, p.tracking_uri, feeds=[])
        built = replay.ingest_round()
        assert all(r.success for r in built)
        first = RetrainDecision(
            "initial", True, first_days[-1].isoformat(), None, "first champion", {}
        )
        trained = replay.run_job(training_job_name(spec), tags=first.tags(spec))
        assert trained.success and replay.champion() is not None, trained.error
        assert not replay.monitoring_round(), "the champion's own training days are not scored"
        replayed = {r.run_id for r in [*built, trained]}

        # The newer day lands first, the older one after it has been scored (late): the
        # daemon builds, scores and monitors both.
        _land(spec.source, stage_r, readings, landed_days[1])
        d.start_sensors(new_data_sensor_name(spec), monitoring_sensor_name(spec))
        d.wait(
            "the newer day built, scored and monitored",
            lambda: p.lake.exists(spec.name, DRIFT_REPORT, landed[1]) and d.idle(),
            timeout=300,  # each run worker imports the code location
        )
        _land(spec.source, stage_r, readings, landed_days[0])
        d.wait(
            "the late day built, scored and monitored",
            lambda: not missing("validated_data", "batch_predictions", DRIFT_REPORT) and d.idle(),
            timeout=300,
        )
        # Their label feed arrives, days late: the daemon evaluates each scored day.
        for day in days[build + lag :]:
            _land(spec.labels.events, stage_e, events, day)
        d.wait(
            "every landed day evaluated",
            lambda: not missing(MODEL_PERFORMANCE) and d.idle(),
            timeout=300,
        )

    runs = d.runs()
    assert not [r for r in runs if r.status != dg.DagsterRunStatus.SUCCESS], d.runs_summary()
    # Every run carries the workspace's origin, the replay's as the daemon's (the UI lists
    # both); the daemon's are the ones this process did not execute.
    assert all(r.remote_job_origin for r in runs)
    by_daemon = {r.tags.get("dagster/sensor_name") for r in runs if r.run_id not in replayed}
    assert by_daemon == {new_data_sensor_name(spec), monitoring_sensor_name(spec)}
