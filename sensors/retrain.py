"""drift_retrain_sensor and metric_decline_sensor: the monitoring summaries -> retraining.

The rules are mlops.monitoring.decide: N consecutive breached partitions against the
serving champion; an episode's first retraining waits for the cooldown (counted in
partitions from the newest drift- or decline-triggered retraining); a refused one re-arms
after `retry_after_partitions` more breached partitions, up to `max_attempts_per_episode`. Every request carries the reason and evidence
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
    """The newest trigger partition of a retraining started by a detected change (drift,
    metric decline): what the cooldown counts from. Scheduled and manual retrainings never
    delay the recovery from a change."""
    parts = [
        r.tags.get(monitoring.TAG_PARTITION)
        for r in runs
        if r.tags.get(monitoring.TAG_TRIGGER) in monitoring.CHANGE_TRIGGERS
    ]
    parts = [p for p in (*parts, cursor_value) if p]
    return max(parts) if parts else None


def last_any_retrain_partition(runs: list) -> str | None:
    """The newest trigger partition of any retraining (the retraining schedule's cooldown)."""
    parts = [r.tags.get(monitoring.TAG_PARTITION) for r in runs]
    parts = [p for p in parts if p]
    return max(parts) if parts else None


def episode_attempts(runs: list, cursor_attempts: dict | None = None) -> dict[str, list]:
    """Episode -> [observed, labelled_through] of each of its retrainings: the newest
    breached partition it saw and the newest labelled day it had (runs, plus the cursor's
    record of requests the daemon may not have launched yet)."""
    out: dict[str, dict[str, str]] = {}
    for r in runs:
        ep = r.tags.get(monitoring.TAG_EPISODE)
        part = r.tags.get(monitoring.TAG_OBSERVED) or r.tags.get(monitoring.TAG_PARTITION)
        if ep and part:
            out.setdefault(ep, {})[part] = r.tags.get(monitoring.TAG_LABELLED, "")
    for ep, entries in (cursor_attempts or {}).items():
        for e in entries:
            observed, labelled = (e, "") if isinstance(e, str) else e
            got = out.setdefault(ep, {})
            got[observed] = max(got.get(observed, ""), labelled or "")
    return {ep: sorted([k, v] for k, v in parts.items()) for ep, parts in out.items()}


def drift_retrain_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_drift_retrain_sensor"


def metric_decline_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_metric_decline_sensor"


def evaluate(
    spec: Spec, trigger: str, instance: dg.DagsterInstance, lake, cursor: str | None
) -> tuple[monitoring.Decision, dict, bool]:
    """The decision for one tick, the cursor state, and whether a retraining is running."""
    state = json.loads(cursor) if cursor else {}
    m = spec.monitoring
    if trigger == monitoring.DRIFT:
        docs = monitoring.summaries(lake, spec.name, monitoring.DRIFT_REPORT)
        obs = monitoring.drift_observations(spec, docs)
        consecutive = m.consecutive_drift_days
    else:
        docs = monitoring.summaries(lake, spec.name, monitoring.MODEL_PERFORMANCE)
        obs = monitoring.performance_observations(spec, docs)
        consecutive = m.consecutive_decline_days
    runs = retraining_runs(instance, spec)
    features = lake.partitions(spec.name, "features")
    decision = monitoring.decide(
        trigger,
        obs,
        consecutive,
        m.retrain_cooldown_partitions,
        last_retrain_partition(runs, state.get("last")),
        episode_attempts(runs, state.get("attempts")),
        now=features[-1] if features else None,
        champion=monitoring.current_champion(lake, spec),
        labelled=lake.partitions(spec.name, monitoring.MODEL_PERFORMANCE),
        retry_after=m.retry_after_partitions,
        max_attempts=m.max_attempts_per_episode,
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
