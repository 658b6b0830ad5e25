"""monitoring_sensor: every built day is scored, monitored and, once labelled, evaluated.

It follows the lake, not the wall clock (DESIGN §6): a day that lands late, a backfilled
day and a whole history landed at once are all scored (batch_predictions + drift_report)
once a champion exists, and evaluated (model_performance) once their labels are mature;
column labels are refreshed when the newest data passes their maturity. The rules are
mlops.monitoring.follow_ups; this is the wiring.

Why a sensor: "a champion exists", "labels are mature by the data clock" and "the first
champion's training days are in-sample" are facts in the lake and the registry history,
not partition statuses that declarative automation conditions can see; and a sensor ticks
the same way under the daemon and in `mlops backtest`'s simulated clock. The scoring
schedule stays as a safety net that skips a day already scored.
"""

import dagster as dg

from catalog.jobs import data_job_name, labels_job_name, scoring_job_name
from mlops import monitoring
from mlops.monitoring import MODEL_PERFORMANCE
from mlops.spec import Spec
from mlops.training_set import label_maturity
from resources.lake import LakeResource
from sensors.retrain import ACTIVE

MAX_RUNS_PER_TICK = 200
TAG_FOLLOW_UP = "mlops/follow_up"


def monitoring_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_monitoring_sensor"


def _busy(instance: dg.DagsterInstance, spec: Spec) -> set[str]:
    """Partitions with a data, labels or scoring run queued or in flight."""
    out: set[str] = set()
    for job in (data_job_name(spec), labels_job_name(spec), scoring_job_name(spec)):
        for r in instance.get_runs(dg.RunsFilter(job_name=job, statuses=list(ACTIVE))):
            if r.tags.get("dagster/partition"):
                out.add(r.tags["dagster/partition"])
    return out


def build_monitoring_sensor(spec: Spec, jobs: list) -> dg.SensorDefinition:
    """`jobs`: the spec's scoring and labels jobs (the sensor's targets)."""
    name = spec.name
    key = lambda a: dg.AssetKey([name, a])  # noqa: E731
    scoring_job, labels_job = scoring_job_name(spec), labels_job_name(spec)

    def request(f: monitoring.FollowUp) -> dg.RunRequest:
        tags = {TAG_FOLLOW_UP: f.reason, "mlops/spec": name}
        if f.kind == monitoring.SCORE:
            return dg.RunRequest(
                run_key=f"score:{f.partition}",
                job_name=scoring_job,
                partition_key=f.partition,
                tags=tags,
            )
        if f.kind == monitoring.PERFORMANCE:
            return dg.RunRequest(
                run_key=f"performance:{f.partition}",
                job_name=labels_job,
                partition_key=f.partition,
                asset_selection=[key(MODEL_PERFORMANCE)],
                tags=tags,
            )
        assets = [key("labels"), *([key(MODEL_PERFORMANCE)] if f.with_performance else [])]
        return dg.RunRequest(
            run_key=f"labels:{f.partition}:final",
            job_name=labels_job,
            partition_key=f.partition,
            asset_selection=assets,
            tags=tags,
        )

    @dg.sensor(
        name=monitoring_sensor_name(spec),
        minimum_interval_seconds=30,
        jobs=jobs,
        description=f"{name}: score and monitor every built day once a champion exists; "
        "evaluate it once its labels are mature (follows the data, not the clock).",
    )
    def monitoring_sensor(context: dg.SensorEvaluationContext, lake: LakeResource):
        """Request what the lake still lacks for each built day."""
        store = lake.get()
        known = set(context.cursor.split(",")) if context.cursor else set()
        labelled = store.partitions(name, "labels")
        unknown = [d for d in labelled if d not in known]
        mature = known | {d for d, ok in label_maturity(spec, store, unknown).items() if ok}
        built = store.partitions(name, "validated_data")
        follow = monitoring.follow_ups(
            spec,
            start=monitoring.monitoring_start(store, spec),
            features=store.partitions(name, "features"),
            scored=set(store.partitions(name, "batch_predictions")),
            labelled=labelled,
            mature=mature,
            performed=set(store.partitions(name, MODEL_PERFORMANCE)),
            data_through=built[-1] if built else None,
            busy=_busy(context.instance, spec),
        )
        context.update_cursor(",".join(sorted(mature & set(labelled))))
        if not follow:
            return dg.SkipReason("every built day is scored and, where labelled, evaluated")
        return [request(f) for f in follow[:MAX_RUNS_PER_TICK]]

    return monitoring_sensor
