"""drift_retrain_sensor and metric_decline_sensor: the monitoring summaries -> retraining.

The rules are mlops.monitoring.decide: N consecutive breached partitions with the same
champion, one retraining per episode, none within the cooldown (counted in partitions, from
the newest retraining run of any trigger). Every request carries the reason and evidence
as run tags; the retraining ends in the promotion gate like any other.
"""

import json

import dagster as dg

from mlops import monitoring
from mlops.spec import Spec
from orchestration.jobs import training_job_name
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


def last_retrain_partition(runs: list, cursor_value: str | None = None) -> str | None:
    parts = [r.tags.get(monitoring.TAG_PARTITION) for r in runs]
    parts = [p for p in (*parts, cursor_value) if p]
    return max(parts) if parts else None


def drift_retrain_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_drift_retrain_sensor"


def metric_decline_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_metric_decline_sensor"


def evaluate(
    spec: Spec, trigger: str, instance: dg.DagsterInstance, lake, cursor: str | None
) -> tuple[monitoring.Decision, dict, bool]:
    """The decision for one tick, the next cursor, and whether a retraining is running."""
    state = json.loads(cursor) if cursor else {}
    if trigger == monitoring.DRIFT:
        docs = monitoring.summaries(lake, spec.name, monitoring.DRIFT_REPORT)
        obs = monitoring.drift_observations(spec, docs)
        consecutive = spec.monitoring.consecutive_drift_days
    else:
        docs = monitoring.summaries(lake, spec.name, monitoring.MODEL_PERFORMANCE)
        obs = monitoring.performance_observations(spec, docs)
        consecutive = spec.monitoring.consecutive_decline_days
    runs = retraining_runs(instance, spec)
    handled = set(state.get("episodes", [])) | {
        r.tags[monitoring.TAG_EPISODE] for r in runs if r.tags.get(monitoring.TAG_EPISODE)
    }
    features = lake.partitions(spec.name, "features")
    decision = monitoring.decide(
        trigger,
        obs,
        consecutive,
        spec.monitoring.retrain_cooldown_partitions,
        last_retrain_partition(runs, state.get("last")),
        handled,
        now=features[-1] if features else None,
    )
    busy = any(r.status in ACTIVE for r in runs)
    return decision, state, busy


def _build(spec: Spec, trigger: str, name: str, job, description: str) -> dg.SensorDefinition:
    @dg.sensor(name=name, minimum_interval_seconds=60, job=job, description=description)
    def _sensor(context: dg.SensorEvaluationContext, lake: LakeResource):
        decision, state, busy = evaluate(
            spec, trigger, context.instance, lake.get(), context.cursor
        )
        if not decision.retrain:
            return dg.SkipReason(decision.reason)
        if busy:
            return dg.SkipReason(f"{decision.reason}; a retraining is already running")
        episodes = [*state.get("episodes", []), decision.episode][-200:]
        context.update_cursor(json.dumps({"last": decision.partition, "episodes": episodes}))
        context.log.info(f"retraining: {decision.reason}")
        return dg.RunRequest(run_key=decision.episode, tags=decision.tags(spec))

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
