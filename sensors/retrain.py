"""drift_retrain_sensor and metric_decline_sensor: the monitoring summaries -> retraining.

The rules are mlops.monitoring.decide_retraining (run through mlops.retraining): N consecutive breached partitions against the
serving champion; an episode's first retraining waits for the cooldown (counted in
partitions from the newest drift- or decline-triggered retraining); a refused one re-arms
after `retry_after_partitions` more breached partitions, up to `max_attempts_per_episode`. Every request carries the reason and evidence
as run tags; the retraining ends in the promotion gate like any other.
"""

import json

import dagster as dg

from catalog.jobs import training_job_name
from mlops import monitoring
from mlops.retraining import evaluate
from mlops.spec import Spec
from resources.lake import LakeResource

ACTIVE = (
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
)


def retraining_runs(instance: dg.DagsterInstance, spec: Spec, limit: int = 100) -> list:
    """Training runs of this spec that a trigger (or a person) started, newest first."""
    return list(
        instance.get_runs(
            dg.RunsFilter(job_name=training_job_name(spec), tags={monitoring.TAG_SPEC: spec.name}),
            limit=limit,
        )
    )


def drift_retrain_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_drift_retrain_sensor"


def metric_decline_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_metric_decline_sensor"


def _build(spec: Spec, trigger: str, name: str, job, description: str) -> dg.SensorDefinition:
    @dg.sensor(name=name, minimum_interval_seconds=60, job=job, description=description)
    def _sensor(context: dg.SensorEvaluationContext, lake: LakeResource):
        runs = retraining_runs(context.instance, spec)
        decision, state, busy = evaluate(spec, trigger, runs, lake.get(), context.cursor)
        if not decision.retrain:
            return dg.SkipReason(decision.reason)
        if busy:
            return dg.SkipReason(f"{decision.reason}; a retraining is already running")
        attempts = dict(state.get("attempts", {}))
        entry = [decision.observed, decision.labelled_through or ""]
        attempts[decision.episode] = [*attempts.get(decision.episode, []), entry]
        newest = lambda kv: max(e if isinstance(e, str) else e[0] for e in kv[1])  # noqa: E731
        recent = dict(sorted(attempts.items(), key=newest)[-200:])
        context.update_cursor(json.dumps({"last": decision.partition, "attempts": recent}))
        context.log.info(f"retraining: {decision.reason}")
        return dg.RunRequest(run_key=decision.run_key, tags=decision.tags(spec))

    return _sensor


def build_retrain_sensors(spec: Spec, training_job) -> list[dg.SensorDefinition]:
    return [
        _build(
            spec,
            monitoring.DRIFT,
            drift_retrain_sensor_name(spec),
            training_job,
            f"{spec.name}: retrain when the drift share exceeds "
            f"{spec.monitoring.drift_threshold} for {spec.monitoring.consecutive_drift_days} "
            "consecutive days (one retraining per episode, cooldown in partitions).",
        ),
        _build(
            spec,
            monitoring.METRIC_DECLINE,
            metric_decline_sensor_name(spec),
            training_job,
            f"{spec.name}: retrain when the realized metric falls more than "
            f"{spec.monitoring.metric_decline_tolerance} below the champion's evaluation.",
        ),
    ]
