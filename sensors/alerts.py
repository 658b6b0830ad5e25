"""Run-failure alerts: a failed run of the spec's jobs goes to the alerting resource once
Dagster will not retry it.

With run retries on (orchestration/instance.py, deploy/dagster.yaml), Dagster tags each failed
run `dagster/will_retry` (true or false) as it stores the failure; the daemon then re-executes
the runs tagged true, each retry tagged `dagster/retry_number` and `dagster/parent_run_id`. A
failure that will be retried is logged on the sensor tick, not alerted: the user hears of a
run that failed to launch or died before its first step only if its last attempt failed too.
A run whose step raised is not retried (retry_on_asset_or_op_failure: false) and alerts at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg
from dagster._core.storage.tags import (
    MAX_RETRIES_TAG,
    RETRY_NUMBER_TAG,
    RUN_FAILURE_REASON_TAG,
    WILL_RETRY_TAG,
)

from mlops.spec import Spec
from resources.alerting import AlertingResource


def run_failure_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_run_failure_sensor"


@dataclass(frozen=True)
class Attempt:
    """Where a failed run stands among the attempts run retries allow."""

    number: int  # 1 for the run itself, 2 for its first retry, ...
    allowed: int  # 1 + max retries (1 when run retries are off)
    will_retry: bool
    reason: str  # Dagster's failure reason (STEP_FAILURE, START_TIMEOUT, ...), "" when unknown

    @property
    def outcome(self) -> str:
        if self.will_retry:
            return f"attempt {self.number} of {self.allowed} failed; Dagster will retry it"
        if self.allowed == 1:
            return "not retried: run retries are off, or the run was not launched by the daemon"
        if self.reason == "STEP_FAILURE":
            return "a step raised: not retried (retry_on_asset_or_op_failure is off)"
        return f"retries exhausted: attempt {self.number} of {self.allowed} failed"


def failed_attempt(instance: dg.DagsterInstance, run: dg.DagsterRun) -> Attempt:
    """The attempt a failed run was, and whether Dagster will retry it: its `dagster/will_retry`
    tag, or (a sensor that read the run between the failure and the tag) Dagster's own rule."""
    run = instance.get_run_by_id(run.run_id) or run  # the tags as they are now
    number = int(run.tags.get(RETRY_NUMBER_TAG, "0")) + 1
    reason = run.tags.get(RUN_FAILURE_REASON_TAG, "")
    if not instance.run_retries_enabled:
        return Attempt(number, 1, False, reason)
    allowed = 1 + int(run.tags.get(MAX_RETRIES_TAG, instance.run_retries_max_retries))
    if run.remote_job_origin is None:
        # Run in a process of its own (the demo, `mlops backtest`, execute_in_process): the
        # daemon cannot re-launch it, whatever the tag says.
        return Attempt(number, 1, False, reason)
    tag = run.tags.get(WILL_RETRY_TAG)
    if tag is None:
        from dagster._core.events import RunFailureReason
        from dagster._core.execution.retries import auto_reexecution_should_retry_run

        will_retry = auto_reexecution_should_retry_run(
            instance, run, RunFailureReason(reason) if reason else None
        )
    else:
        will_retry = tag.lower() == "true"
    return Attempt(number, allowed, will_retry, reason)


def build_failure_sensor(spec: Spec, jobs: list) -> dg.SensorDefinition:
    @dg.run_failure_sensor(
        name=run_failure_sensor_name(spec),
        monitored_jobs=jobs,
        description=(
            f"{spec.name}: alert on every failed run Dagster will not retry "
            "(log; webhook when configured)."
        ),
    )
    def run_failure_sensor(context: dg.RunFailureSensorContext, alerting: AlertingResource):
        """Alert with the job, partition, error, trigger and attempt of a failed run."""
        run = context.dagster_run
        attempt = failed_attempt(context.instance, run)
        if attempt.will_retry:
            # Logged, not returned: a run status sensor that returns ends its tick there.
            context.log.info(f"{run.job_name} run {run.run_id}: {attempt.outcome}; no alert yet")
            return None
        error = context.failure_event.message or "run failed"
        fields = {
            "spec": spec.name,
            "job": run.job_name,
            "run_id": run.run_id,
            "partition": run.tags.get("dagster/partition"),
            "trigger": run.tags.get("mlops/trigger"),
            "attempt": attempt.number,
            "attempts_allowed": attempt.allowed,
            "first_run_id": run.root_run_id or run.run_id,
            "retry": attempt.outcome,
        }
        title = f"[{spec.name}] {run.job_name} failed"
        if attempt.number > 1:
            title += f" (attempt {attempt.number} of {attempt.allowed})"
        alerting.alert(title, error, fields)
        return None

    return run_failure_sensor
