"""feedback_sensor: field feedback -> the labelled days' label_feedback, labels and performance.

For a spec whose labels use field feedback (labels.kind: feedback, or labels.feedback:
override), it reads what `POST /feedback` and `mlops labels import` appended since its last
tick (the cursor holds each file's offset), finds the days of the readings it labels (a
request id through the request log) and requests one labels-job run per day:
label_feedback -> labels -> model_performance (when the day is scored and its labels are
final by the data clock; otherwise the monitoring sensor evaluates it once they are).
A day whose partition does not exist yet (today) waits in the cursor for its midnight.
Feedback naming a request the log lacks makes its arrival day's label_feedback run too:
that run keeps the line with its reason (label_feedback_rejected), so nothing is lost.
"""

import hashlib
import json

import dagster as dg
from dagster._time import get_current_timestamp

from catalog.jobs import labels_job_name
from mlops import feedback, monitoring
from mlops.monitoring import MODEL_PERFORMANCE
from mlops.spec import Spec
from mlops.watch import last_partition
from resources.clock import ClockResource
from resources.lake import LakeResource

TAG_FEEDBACK = "mlops/feedback"
MAX_RUNS_PER_TICK = 200


def feedback_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_feedback_sensor"


def build_feedback_sensor(spec: Spec, labels_job) -> dg.SensorDefinition:
    name = spec.name
    key = lambda a: dg.AssetKey([name, a])  # noqa: E731

    @dg.sensor(
        name=feedback_sensor_name(spec),
        minimum_interval_seconds=60,
        jobs=[labels_job],
        description=f"{name}: field feedback -> the labelled days' label_feedback, labels "
        "and realized performance.",
    )
    def feedback_sensor(
        context: dg.SensorEvaluationContext, lake: LakeResource, clock: ClockResource
    ):
        """Read the feedback appended since the last tick and relabel the days it names."""
        state = json.loads(context.cursor) if context.cursor else {}
        folder = feedback.feedback_dir(name)
        scan = feedback.scan_new(folder, state.get("o", {}))
        pending = sorted(set(state.get("p", [])) | scan.days | scan.unresolved)
        last = last_partition(spec, clock.date(), get_current_timestamp())
        first = spec.source.start_date.isoformat()
        store = lake.get()
        built = store.partitions(name, "validated_data")
        through = built[-1] if built else None
        requests, waiting, outside = [], [], []
        for day in pending:
            if day < first or (spec.source.end_date and day > spec.source.end_date.isoformat()):
                outside.append(day)
                continue
            if last is None or day > last.isoformat() or len(requests) >= MAX_RUNS_PER_TICK:
                waiting.append(day)
                continue
            assets = [key("label_feedback")]
            if spec.labels.kind == "feedback" or store.exists(name, "validated_data", day):
                assets.append(key("labels"))
                scored = store.exists(name, "batch_predictions", day) or store.exists(
                    name, "inference_log", day
                )
                final = (  # by the labels' own clock: the newer of the data and the day
                    monitoring.label_due(spec, day, max(through or day, day))
                    if spec.labels.kind != "event_feed"
                    else store.exists(name, MODEL_PERFORMANCE, day)  # evaluated: feed arrived
                )
                if scored and final:
                    assets.append(key(MODEL_PERFORMANCE))
            digest = hashlib.sha256(
                json.dumps([day, scan.offsets], sort_keys=True).encode()
            ).hexdigest()[:16]
            requests.append(
                dg.RunRequest(
                    run_key=f"feedback:{day}:{digest}",
                    job_name=labels_job_name(spec),
                    partition_key=day,
                    asset_selection=assets,
                    tags={TAG_FEEDBACK: f"{scan.lines} new feedback line(s)", "mlops/spec": name},
                )
            )
        for day in outside:
            context.log.warning(
                f"feedback labels readings of {day}, outside {name}'s partitions "
                f"({first}..{spec.source.end_date or 'open'}): not ingested"
            )
        context.update_cursor(json.dumps({"o": scan.offsets, "p": waiting}, sort_keys=True))
        if not requests:
            why = f"no new feedback in {folder}" if not scan.lines else "no day to relabel yet"
            if waiting:
                why += f"; feedback waits for its day's partition: {', '.join(waiting)}"
            return dg.SkipReason(why)
        return requests

    return feedback_sensor
