"""Schedules from the spec: daily scoring + monitoring (a safety net behind the monitoring
sensor, which scores every built day), and periodic retraining only where the spec names
a cron.

Both act on the day before the tick (the last complete partition), so a schedule replayed
with a simulated clock behaves like the real one.
"""

import datetime as dt

import dagster as dg

from mlops import monitoring
from mlops.retraining import is_active, last_any_retrain_partition
from mlops.spec import Spec
from resources.lake import LakeResource
from sensors.retrain import retraining_runs


def next_fire(cron: str, after: dt.datetime) -> dt.datetime:
    """The first tick of `cron` at or after `after`, in UTC (the schedules' timezone): when a
    replay's simulated clock fires a schedule. Dagster's own cron handling, through its public
    time-window partitions (a window starts at each tick), so replay and daemon agree."""
    ticks = dg.TimeWindowPartitionsDefinition(
        cron_schedule=cron, start=after, fmt="%Y-%m-%dT%H:%M:%S", timezone="UTC"
    )
    return ticks.get_next_partition_window(after, respect_bounds=False).start


def scoring_schedule_name(spec: Spec) -> str:
    return f"{spec.name}_scoring_schedule"


def retraining_schedule_name(spec: Spec) -> str:
    return f"{spec.name}_retraining_schedule"


def _yesterday(context: dg.ScheduleEvaluationContext) -> str:
    return (context.scheduled_execution_time.date() - dt.timedelta(days=1)).isoformat()


def build_schedules(spec: Spec, scoring_job, training_job) -> list[dg.ScheduleDefinition]:
    name = spec.name

    @dg.schedule(
        name=scoring_schedule_name(spec),
        cron_schedule=spec.monitoring.scoring_schedule,
        job=scoring_job,
        description=f"{name}: score yesterday with the champion and build its drift report.",
    )
    def scoring_schedule(context: dg.ScheduleEvaluationContext, lake: LakeResource):
        """Score and monitor the last complete day."""
        day, store = _yesterday(context), lake.get()
        if not store.exists(name, "features", day):
            return dg.SkipReason(f"no features for {day} yet: nothing to score")
        if store.exists(name, "batch_predictions", day):
            # The monitoring sensor scores every built day; this is the safety net.
            return dg.SkipReason(f"{day} is already scored")
        return dg.RunRequest(run_key=f"scoring:{day}", partition_key=day)

    schedules = [scoring_schedule]
    if spec.monitoring.retraining_schedule:

        @dg.schedule(
            name=retraining_schedule_name(spec),
            cron_schedule=spec.monitoring.retraining_schedule,
            job=training_job,
            description=f"{name}: periodic retraining (skipped within the cooldown).",
        )
        def retraining_schedule(context: dg.ScheduleEvaluationContext, lake: LakeResource):
            """Retrain on the latest data unless a retraining ran within the cooldown."""
            day = _yesterday(context)
            days = [d for d in lake.get().partitions(name, "features") if d <= day]
            if not days:
                return dg.SkipReason("no features yet: nothing to train on")
            runs = retraining_runs(context.instance, spec)
            if any(is_active(r) for r in runs):
                return dg.SkipReason("a retraining is already running")
            last = last_any_retrain_partition(runs)
            cooldown = spec.monitoring.retrain_cooldown_partitions
            if not monitoring.cooldown_ok(days[-1], last, cooldown):
                return dg.SkipReason(
                    f"cooldown: last retraining at {last}, fewer than {cooldown} partitions "
                    f"before {days[-1]}"
                )
            decision = monitoring.RetrainDecision(
                monitoring.SCHEDULE,
                True,
                days[-1],
                None,
                f"scheduled retraining ({spec.monitoring.retraining_schedule})",
                {"latest_partition": days[-1], "last_retrain_partition": last},
            )
            return dg.RunRequest(run_key=f"schedule:{days[-1]}", tags=decision.tags(spec))

        schedules.append(retraining_schedule)
    return schedules
