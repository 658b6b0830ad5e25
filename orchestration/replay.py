"""Replay days through the real sensors and schedules against a Dagster instance.

What the daemon does in production, with a simulated clock: land a day's files, tick the
new-data sensor and the monitoring sensor and run what they request, tick the scoring
schedule at the day's scoring time, the retraining sensors and the retraining schedule (when
the spec names one), then the run-failure sensor. The clock resource tells the sensors the
simulated day (a SQL source is polled up to it). Runs
carry the same `dagster/sensor_name` / `dagster/run_key` / schedule tags the daemon would
set, and a request whose run key already ran is skipped, as the daemon skips it. Each run
carries the workspace's code-location origin and each evaluation is recorded as a tick
(orchestration/ui_origin.py), so the UI shows the replay's runs and ticks as the daemon's.

Where a run executes (`runs`):
- `in-process`: `execute_in_process` in this process, every step in turn (the default
  profile: nothing but Python);
- `executor`: `dg.execute_job` of the job reconstructed from the code location
  (orchestration.definitions), so the job's own executor runs the steps: with
  MLOPS_EXECUTOR=celery (the production profile) each step is a task that a dagster-celery
  worker executes against the same instance. This process orchestrates the run, as the run
  worker the daemon launches would.
"""

import datetime as dt
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from catalog.jobs import data_job_name, labels_job_name, scoring_job_name
from mlops import ingest, monitoring, registry
from mlops.lake import Lake, read_json
from mlops.spec import FileFeed, Spec
from orchestration.jobs import quiet
from orchestration.schedules import next_fire, retraining_schedule_name, scoring_schedule_name
from orchestration.ui_origin import SCHEDULE, SENSOR, Origin, launched_from, record_tick
from resources.clock import ClockResource
from sensors.alerts import run_failure_sensor_name
from sensors.monitoring import monitoring_sensor_name
from sensors.new_data import new_data_sensor_name
from sensors.retrain import drift_retrain_sensor_name, metric_decline_sensor_name

# Step logs are in the UI and the timeline is on the console: keep the two apart.
STEP_LOGS_OFF = quiet("CRITICAL")
# Data before labels before scoring: the order the daemon's runs would finish in.
_JOB_ORDER = ("data", "labels", "scoring")
IN_PROCESS, EXECUTOR = "in-process", "executor"
RUN_MODES = (IN_PROCESS, EXECUTOR)


@dataclass
class ReplayedRun:
    """A run the replay executed: its job, partition, tags, materializations and checks."""

    job: str
    partition: str | None
    success: bool
    run_id: str
    tags: dict[str, str]
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset -> metadata
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # name, passed, reason
    error: str = ""


@dataclass
class DayResult:
    day: str
    runs: list[ReplayedRun]
    events: list[str]


@dataclass(frozen=True)
class Feed:
    """Where a feed's files wait (`source`) and where they land, one day at a time."""

    spec: FileFeed
    source: Path
    target: Path


class Replay:
    def __init__(
        self,
        spec: Spec,
        defs: dg.Definitions,
        instance: dg.DagsterInstance,
        lake: Lake,
        tracking_uri: str,
        feeds: list[Feed],
        runs: str = IN_PROCESS,
        training_config: dict | None = None,
        origin: Origin | None = None,
    ):
        if runs not in RUN_MODES:
            raise ValueError(f"runs={runs!r}: use one of {', '.join(RUN_MODES)}")
        self.spec, self.defs, self.instance, self.lake = spec, defs, instance, lake
        self.tracking_uri = tracking_uri
        self.feeds = feeds
        self.runs = runs
        self.training_config = training_config or {}
        self.cursors: dict[str, str | None] = {}
        self.resources = defs.resources
        self.today: dt.date | None = None  # the simulated clock (None: the wall clock)
        self.origin = origin or Origin.of_workspace()
        # An evaluation's tick is written once the runs it requested have run (their ids):
        # name -> (started, cursor, skip message, runs requested).
        self._ticks: dict[str, tuple[float, str | None, str | None, int]] = {}

    # --- landing ------------------------------------------------------------------------

    def land(self, day: dt.date) -> list[str]:
        """Copy the day's files into the landing folders (what a device gateway does)."""
        landed = []
        for feed in self.feeds:
            for f in ingest.files_for_day(feed.spec, feed.source, day):
                feed.target.mkdir(parents=True, exist_ok=True)
                landed.append(land_file(f, feed.target, feed.spec.settle_seconds).name)
        return landed

    # --- ticks --------------------------------------------------------------------------

    def tick_sensor(self, name: str) -> tuple[list[dg.RunRequest], str | None]:
        sensor = self.defs.get_repository_def().get_sensor_def(name)
        resources = dict(self.resources)
        if self.today is not None:
            resources["clock"] = ClockResource(today=self.today.isoformat())
        ctx = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursors.get(name),
            resources=resources,
            definitions=self.defs,
            sensor_name=name,
        )
        started = time.time()
        try:
            data = sensor.evaluate_tick(ctx)
        except Exception as e:
            record_tick(self.instance, self.origin, SENSOR, name, started, error=e)
            raise
        if data.cursor is not None:
            self.cursors[name] = data.cursor
        requests = list(data.run_requests or [])
        self._ticks[name] = (started, self.cursors.get(name), data.skip_message, len(requests))
        return requests, data.skip_message

    def tick_schedule(self, name: str, at: dt.datetime) -> tuple[list[dg.RunRequest], str | None]:
        schedule = self.defs.get_repository_def().get_schedule_def(name)
        ctx = dg.build_schedule_context(
            instance=self.instance,
            scheduled_execution_time=at,
            resources=self.resources,
            repository_def=self.defs.get_repository_def(),
        )
        started = time.time()
        try:
            data = schedule.evaluate_tick(ctx)
        except Exception as e:
            record_tick(self.instance, self.origin, SCHEDULE, name, started, error=e)
            raise
        requests = list(data.run_requests or [])
        self._ticks[name] = (started, None, data.skip_message, len(requests))
        return requests, data.skip_message

    def record(self, kind: str, name: str, runs: list["ReplayedRun"]) -> None:
        """The tick of `name`'s last evaluation, with the runs it started (see tick_sensor)."""
        started, cursor, skip, requested = self._ticks.pop(name)
        if not runs and requested and not skip:
            skip = f"{requested} run request(s), each of a run key that had already run"
        record_tick(
            self.instance,
            self.origin,
            kind,
            name,
            started,
            run_ids=[r.run_id for r in runs],
            run_keys=[r.tags["dagster/run_key"] for r in runs if "dagster/run_key" in r.tags],
            skip_reason=skip,
            cursor=cursor,
        )

    def execute(
        self, requests: list[dg.RunRequest], origin: dict[str, str], default_job: str | None
    ) -> list[ReplayedRun]:
        def order(r: dg.RunRequest) -> int:
            job = r.job_name or default_job or ""
            return next((i for i, k in enumerate(_JOB_ORDER) if f"_{k}_job" in job), 9)

        out = []
        for req in sorted(requests, key=order):
            job_name = req.job_name or default_job
            tags = {**origin, **req.tags}
            if req.run_key:
                tags["dagster/run_key"] = req.run_key
                if self._already_ran(tags):
                    continue
            assets = list(req.asset_selection) if req.asset_selection else None
            config = dict(req.run_config) if req.run_config else {}
            if job_name and job_name.endswith("_training_job") and self.training_config:
                config = {**self.training_config, **config}
            out.append(self.run_job(job_name, req.partition_key, assets, config, tags))
        return out

    def run_job(
        self,
        job_name: str,
        partition: str | None = None,
        assets: list[dg.AssetKey] | None = None,
        run_config: dict | None = None,
        tags: dict[str, str] | None = None,
    ) -> ReplayedRun:
        """One run of `job_name`, recorded in the instance, where `self.runs` says."""
        config = {**STEP_LOGS_OFF, **(run_config or {})}
        tags = dict(tags or {})
        if self.runs == IN_PROCESS:
            with launched_from(self.instance, self.origin, job_name):
                result = self.defs.resolve_job_def(job_name).execute_in_process(
                    instance=self.instance,
                    partition_key=partition,
                    asset_selection=assets,
                    run_config=config,
                    tags=tags,
                    raise_on_error=False,
                )
            return _outcome(job_name, partition, result, tags)
        from orchestration.executors import recon_job

        if partition is not None:
            tags["dagster/partition"] = partition
        with (
            launched_from(self.instance, self.origin, job_name),
            dg.execute_job(
                recon_job(job_name),
                self.instance,
                run_config=config,
                tags=tags,
                asset_selection=assets,
                raise_on_error=False,
            ) as result,
        ):
            return _outcome(job_name, partition, result, tags)

    def _already_ran(self, tags: dict[str, str]) -> bool:
        keys = ("dagster/run_key", "dagster/sensor_name", "dagster/schedule_name")
        filt = {k: tags[k] for k in keys if k in tags}
        return bool(self.instance.get_runs(dg.RunsFilter(tags=filt), limit=1))

    def _sensor_round(self, name: str, default_job: str | None = None) -> list[ReplayedRun]:
        requests, _ = self.tick_sensor(name)
        runs = self.execute(requests, {"dagster/sensor_name": name}, default_job)
        self.record(SENSOR, name, runs)
        return runs

    def _schedule_round(self, name: str, at: dt.datetime, default_job: str) -> list[ReplayedRun]:
        requests, _ = self.tick_schedule(name, at)
        runs = self.execute(requests, {"dagster/schedule_name": name}, default_job)
        self.record(SCHEDULE, name, runs)
        return runs

    # --- a day --------------------------------------------------------------------------

    def ingest_round(self) -> list[ReplayedRun]:
        """New-data sensor until it has nothing more (labels wait for their day's data run)."""
        return self._until_quiet(new_data_sensor_name(self.spec))

    def monitoring_round(self) -> list[ReplayedRun]:
        """Monitoring sensor until the lake lacks nothing: score, then evaluate."""
        return self._until_quiet(monitoring_sensor_name(self.spec))

    def _until_quiet(self, name: str, rounds: int = 4) -> list[ReplayedRun]:
        runs: list[ReplayedRun] = []
        for _ in range(rounds):
            got = self._sensor_round(name)
            runs += got
            if not got:
                break
        return runs

    def day(self, day: dt.date, training_job: str) -> DayResult:
        """One simulated day: files land during the day; the sensors build, score and
        evaluate what landed; the scoring schedule's tick the next morning (a safety net);
        then the retraining triggers."""
        s, spec = self.spec, self.spec.monitoring
        self.today = day
        runs = self.ingest_round()
        runs += self.monitoring_round()
        morning = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
        score_at = next_fire(spec.scoring_schedule, morning)
        if score_at < morning + dt.timedelta(days=1):
            runs += self._schedule_round(scoring_schedule_name(s), score_at, scoring_job_name(s))
        runs += self._sensor_round(drift_retrain_sensor_name(s), training_job)
        runs += self._sensor_round(metric_decline_sensor_name(s), training_job)
        if spec.retraining_schedule:
            at = next_fire(spec.retraining_schedule, morning)
            if at < morning + dt.timedelta(days=1):
                runs += self._schedule_round(retraining_schedule_name(s), at, training_job)
        self.tick_sensor(run_failure_sensor_name(s))
        self.record(SENSOR, run_failure_sensor_name(s), [])
        return DayResult(day.isoformat(), runs, [])

    # --- what to print ------------------------------------------------------------------

    def champion(self) -> int | None:
        return registry.alias_version(
            self.tracking_uri, self.spec.registered_model_name, registry.CHAMPION
        )

    def summary(self, asset: str, day: str) -> dict | None:
        return read_json(self.lake, self.spec.name, asset, day)


def land_file(source: Path, folder: Path, settle_seconds: float) -> Path:
    """Copy `source` into the landing `folder` as a complete, settled file.

    Written under a temporary name (never read) and renamed in, so a half-copied file is
    never visible. Its mtime is then set `settle_seconds` (plus a second) into the past: a
    replay lands each day's complete files and ticks at once on a simulated clock, where
    the wall-clock wait the settle rule asks of files written in place means nothing.
    """
    target = folder / source.name
    tmp = folder / f".{source.name}.part"
    shutil.copyfile(source, tmp)
    backdate([tmp], settle_seconds)
    tmp.rename(target)
    return target


def backdate(paths: Iterable[Path], settle_seconds: float) -> None:
    """Set each file's mtime `settle_seconds` (plus a second) into the past, so the new-data
    sensor counts it as settled at once (for complete files only: replays, tests)."""
    settled = time.time() - settle_seconds - 1
    for p in paths:
        os.utime(p, (settled, settled))


def _outcome(job: str, partition: str | None, result, tags: dict[str, str]) -> ReplayedRun:
    meta: dict[str, dict[str, Any]] = {}
    for ev in result.get_asset_materialization_events():
        mat = ev.step_materialization_data.materialization
        meta[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    checks = []
    for e in result.all_events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION":
            c = e.asset_check_evaluation_data
            reason = c.metadata.get("reason")
            checks.append((c.asset_check_key.name, c.passed, reason.value if reason else ""))

    def errors(of_steps: bool) -> list[str]:
        return [
            e.event_specific_data.error.message.strip().splitlines()[-1]
            for e in result.all_events
            if (e.is_step_failure if of_steps else e.is_failure)
            and e.event_specific_data
            and getattr(e.event_specific_data, "error", None)
        ]

    # A step's error says most; a run that failed before any step ran (an executor that
    # cannot reach its broker) has only the run's.
    return ReplayedRun(
        job,
        partition,
        result.success,
        result.run_id,
        tags,
        meta,
        checks,
        "; ".join(errors(True) or errors(False)),
    )


def trigger_of(run: ReplayedRun) -> str | None:
    return run.tags.get(monitoring.TAG_TRIGGER)


def job_kind(spec: Spec, job: str) -> str:
    for fn, kind in (
        (data_job_name, "data"),
        (labels_job_name, "labels"),
        (scoring_job_name, "scoring"),
    ):
        if job == fn(spec):
            return kind
    return "training" if job.endswith("_training_job") else job
