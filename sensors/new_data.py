"""new_data_sensor: landing files -> daily runs, one per (partition, content hash).

- a new day's readings -> the data job for that partition;
- a corrected file (same day, other content) -> the data job again, then, once that run has
  succeeded, what depends on the day: later days' features within the lookback, the day's
  scoring and drift report, its realized performance; a day that lands after later days
  were built (late) cascades to their features and scores the same way;
- the label feed: a day's labels (and realized performance, when the day was scored) run
  once every arrival day its labels can depend on has landed, and again if one is corrected;
- an identical re-delivery changes nothing;
- a file still being written (changed within `settle_seconds`) waits, its day with it; a file
  dated outside the partitions that exist (before the start date, or a day not yet complete),
  a symlink leading out of the landing folder and a name matching no pattern are skipped with
  a warning on the tick (its log, and its skip reason): every other day goes on.
The cursor holds the state (see mlops/watch.py); run keys make a lost cursor harmless.
"""

import datetime as dt

import dagster as dg
from dagster._time import get_current_timestamp

from catalog.jobs import data_job_name, labels_job_name, scoring_job_name
from mlops import sources, watch
from mlops.monitoring import MODEL_PERFORMANCE
from mlops.spec import FileSource, Spec
from mlops.watch import last_partition
from resources.clock import ClockResource
from resources.lake import LakeResource

MAX_RUNS_PER_TICK = 500
SQL_RESCAN_DAYS = 3  # a SQL source's recent days are re-read for late or corrected rows
TAG_CHANGE = "mlops/change"


def new_data_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_new_data_sensor"


def _days_after(day: str, n: int) -> list[str]:
    d = dt.date.fromisoformat(day)
    return [(d + dt.timedelta(days=i)).isoformat() for i in range(1, n + 1)]


def build_new_data_sensor(spec: Spec, jobs: list) -> dg.SensorDefinition:
    """`jobs`: the spec's data, labels and scoring jobs (the sensor's targets)."""
    name = spec.name
    key = lambda a: dg.AssetKey([name, a])  # noqa: E731
    files_source = isinstance(spec.source, FileSource)
    readings_dir = spec.landing_dir if files_source else None
    events_feed = spec.labels.events
    events_dir = spec.resolve(events_feed.path) if events_feed else None
    data_job, labels_job, scoring_job = (
        data_job_name(spec),
        labels_job_name(spec),
        scoring_job_name(spec),
    )

    def labels_request(lake, part: str, digest: str, why: str) -> dg.RunRequest:
        assets = [key("labels")]
        if lake.exists(name, "batch_predictions", part):
            assets.append(key(MODEL_PERFORMANCE))
        return dg.RunRequest(
            run_key=f"labels:{part}:{watch.short(digest)}",
            job_name=labels_job,
            partition_key=part,
            asset_selection=assets,
            tags={TAG_CHANGE: why},
        )

    def downstream(lake, part: str, after: str) -> list[dg.RunRequest]:
        """What a corrected day invalidates, requested once its data run has succeeded."""
        out = []
        for d in [part, *_days_after(part, spec.features.lookback_days)]:
            if d != part and lake.exists(name, "features", d):
                out.append(
                    dg.RunRequest(
                        run_key=f"{after}:features:{d}",
                        job_name=data_job,
                        partition_key=d,
                        asset_selection=[key("features")],
                        tags={TAG_CHANGE: f"lookback of corrected {part}"},
                    )
                )
            if lake.exists(name, "batch_predictions", d):
                out.append(
                    dg.RunRequest(
                        run_key=f"{after}:scoring:{d}",
                        job_name=scoring_job,
                        partition_key=d,
                        tags={TAG_CHANGE: f"rescore after corrected {part}"},
                    )
                )
        if lake.exists(name, MODEL_PERFORMANCE, part):
            out.append(
                dg.RunRequest(
                    run_key=f"{after}:performance:{part}",
                    job_name=labels_job,
                    partition_key=part,
                    asset_selection=[key(MODEL_PERFORMANCE)],
                    tags={TAG_CHANGE: f"corrected {part}"},
                )
            )
        return out

    @dg.sensor(
        name=new_data_sensor_name(spec),
        minimum_interval_seconds=30,
        jobs=jobs,
        description=f"{name}: new or corrected landing files -> one run per (day, content hash).",
    )
    def new_data_sensor(
        context: dg.SensorEvaluationContext, lake: LakeResource, clock: ClockResource
    ):
        """Watch the landing folders and request the day's runs."""
        store = lake.get()
        state = watch.decode(context.cursor)
        # Dagster's clock (the one it checks partition keys against; tests can freeze it).
        now, notes = get_current_timestamp(), []
        shared = files_source and events_feed is not None and readings_dir == events_dir
        first, last = spec.source.start_date, last_partition(spec, clock.date(), now)
        if files_source:
            seen = watch.scan(
                spec.source, readings_dir, now, first, last, (events_feed,) if shared else ()
            )
            notes += seen.notes(first, last)
            readings, changes = watch.diff(state.get("r", {}), readings_dir, seen.files)
        else:  # SQL: poll the recent days' row fingerprints (one query per day)
            days = (
                watch.sql_days(first, last, list(state.get("r", {})), SQL_RESCAN_DAYS)
                if last
                else []
            )
            fps = {d.isoformat(): sources.partition_fingerprint(spec, d) for d in days}
            readings, changes = watch.diff_fingerprints(state.get("r", {}), fps)
        events = state.get("e", {})
        if events_feed is not None:
            seen = watch.scan(events_feed, events_dir, now, others=(spec.source,) if shared else ())
            if shared:  # the folder's odd files were listed once, with the readings
                seen.unmatched, seen.refused = [], []
            notes += seen.notes()
            events, _ = watch.diff(events, events_dir, seen.files)
        for note in notes:
            context.log.warning(note)
        labelled = dict(state.get("l", {}))
        pending = dict(state.get("p", {}))
        requests: list[dg.RunRequest] = []
        budget = MAX_RUNS_PER_TICK

        # 1. Corrected days whose data run has finished: their downstream, once.
        for part, run_key in sorted(pending.items()):
            runs = context.instance.get_runs(
                dg.RunsFilter(tags={"dagster/run_key": run_key, "mlops/spec": name}), limit=1
            )
            if runs and runs[0].status == dg.DagsterRunStatus.SUCCESS:
                requests.extend(downstream(store, part, run_key))
                del pending[part]
            elif runs and runs[0].status in (
                dg.DagsterRunStatus.FAILURE,
                dg.DagsterRunStatus.CANCELED,
            ):
                context.log.warning(f"{part}: corrected data run {run_key} failed; not cascading")
                del pending[part]

        # 2. New and corrected readings.
        kept = dict(state.get("r", {}))
        for ch in changes:
            if budget <= 0:
                break  # the rest stay unrecorded and come next tick
            run_key = f"data:{ch.partition}:{watch.short(ch.content_hash)}"
            requests.append(
                dg.RunRequest(
                    run_key=run_key,
                    job_name=data_job,
                    partition_key=ch.partition,
                    tags={TAG_CHANGE: ch.kind, "mlops/spec": name},
                )
            )
            later = _days_after(ch.partition, spec.features.lookback_days)
            if ch.kind == watch.CORRECTED or any(store.exists(name, "features", d) for d in later):
                # A corrected day, or a late one whose later days were built without it:
                # their features and scores are redone once its run has succeeded.
                pending[ch.partition] = run_key
            kept[ch.partition] = readings[ch.partition]
            budget -= 1
        # Unchanged content with a new signature (re-delivery) is recorded as seen.
        changed = {c.partition for c in changes}
        for part, v in readings.items():
            if part not in changed:
                kept[part] = v

        # 3. Labels whose feed has fully arrived (or was corrected), once the day is in the lake.
        if events_feed is not None:
            for part, digest in sorted(watch.label_readiness(spec, kept, events).items()):
                if budget <= 0:
                    break
                if labelled.get(part) == digest or part in changed:
                    continue
                if not store.exists(name, "validated_data", part):
                    continue  # its data run has not finished yet
                why = "labels corrected" if part in labelled else "labels matured"
                requests.append(labels_request(store, part, digest, why))
                labelled[part] = digest
                budget -= 1

        context.update_cursor(watch.encode({"r": kept, "e": events, "l": labelled, "p": pending}))
        if not requests:
            why = f"no new or corrected data in {readings_dir or 'the SQL source'}"
            return dg.SkipReason("; ".join([why, *notes]))
        return requests

    return new_data_sensor
