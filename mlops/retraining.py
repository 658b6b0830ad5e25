"""The retraining rules over a spec's run records, without Dagster.

The drift and metric-decline sensors (sensors/retrain.py), the retraining schedule and
`mlops status` all decide from the same facts: the monitoring summaries in the lake and the
spec's training runs with their trigger tags. The sensors read the runs through the Dagster
instance; `mlops status` reads them straight from the instance's storage
(orchestration/run_records.py) so it answers without importing Dagster. A run record here is
anything with `tags` (a mapping) and `status` (a DagsterRunStatus or its string value).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mlops import monitoring
from mlops.lake import Lake
from mlops.spec import Spec

# Dagster's run statuses of a run that has not ended (DagsterRunStatus values).
ACTIVE_STATUSES = frozenset({"NOT_STARTED", "QUEUED", "STARTING", "STARTED"})


def is_active(run: Any) -> bool:
    status = run.status
    return getattr(status, "value", status) in ACTIVE_STATUSES


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


def evaluate(
    spec: Spec, trigger: str, runs: Sequence[Any], lake: Lake, cursor: str | None
) -> tuple[monitoring.RetrainDecision, dict, bool]:
    """The decision for one tick, the cursor state, and whether a retraining is running.
    `runs`: the spec's training runs, newest first."""
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
    features = lake.partitions(spec.name, "features")
    decision = monitoring.decide_retraining(
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
    busy = any(is_active(r) for r in runs)
    return decision, state, busy
