"""`mlops exporter`: the pipeline side of the platform as Prometheus metrics.

`mlops serve` exposes the serving side; this exposes what operators alert on for the
pipeline, per spec (every sample labelled `spec="<name>"`): the champion and when it was
promoted, the last drift share and realized metric against the champion's evaluation, the
latest day's quarantine rate, how old the newest built, scored and label-mature partitions
are, retrainings and refusals by trigger, and failed runs by job.

Every value is read when Prometheus scrapes (a custom collector), from the same places
`mlops status` reads, and with the same shortcuts: the default profile's Dagster run storage
and MLflow registry are SQLite files opened read-only (orchestration/run_records.py,
mlops/registry_reader.py), the lake's JSON summaries and the deployment history are small
files. No scrape imports the code location, Dagster or MLflow (other storages fall back to
their APIs, which are slower). A spec whose state cannot be read reports
`mlops_exporter_spec_up{spec} 0` and the others still answer.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from catalog import jobs
from mlops import monitoring, registry, validation
from mlops.labels import MATURE
from mlops.lake import Lake
from mlops.registry_reader import RegistryReader, open_registry
from mlops.spec import Spec
from orchestration.run_records import RunReader, open_runs

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

log = logging.getLogger(__name__)

TRIGGERS = (monitoring.DRIFT, monitoring.METRIC_DECLINE, monitoring.SCHEDULE, monitoring.MANUAL)
BUILT, SCORED, LABELS_MATURE = "built", "scored", "labels_mature"
# Stage -> the lake asset whose partitions say how far it got.
STAGE_ASSETS = {BUILT: "features", SCORED: "batch_predictions"}
LABEL_LOOKBACK = 31  # label partitions searched, newest first, for one with a mature row
UNKNOWN = "unknown"


def spec_jobs(spec: Spec) -> list[str]:
    """The spec's job names, each given a failed-runs series from the first scrape."""
    return [
        jobs.data_job_name(spec),
        jobs.training_set_job_name(spec),
        jobs.training_job_name(spec),
        jobs.batch_predictions_job_name(spec),
        jobs.scoring_job_name(spec),
        jobs.labels_job_name(spec),
    ]


def day_end(partition: str) -> float:
    """Unix seconds at the end (UTC) of a daily partition: when its data is complete."""
    day = dt.date.fromisoformat(partition[:10])
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()


@dataclass
class SpecState:
    """One spec's values for one scrape; None: not known yet (no sample is written)."""

    champion: int | None = None
    promoted_at: float | None = None
    drift_share: float | None = None
    metric: str = ""
    realized: float | None = None
    baseline: float | None = None
    declined: bool | None = None
    quarantine_rate: float | None = None
    newest: dict[str, float] | None = None  # stage -> end of its newest partition (unix s)
    retrainings: Counter | None = None  # trigger -> runs
    refusals: Counter | None = None  # trigger -> refused versions
    refusals_in_a_row: int = 0
    failed_runs: Counter | None = None  # job -> failed runs


def _newest_mature_labels(lake: Lake, spec: Spec) -> str | None:
    for day in reversed(lake.partitions(spec.name, "labels")[-LABEL_LOOKBACK:]):
        if lake.read(spec.name, "labels", day, [MATURE])[MATURE].any():
            return day
    return None


def _quarantine_rate(lake: Lake, spec: Spec) -> float | None:
    days = lake.partitions(spec.name, "validated_data")
    if not days:
        return None
    day = days[-1]
    valid = lake.read(spec.name, "validated_data", day).height
    quarantined = (
        lake.read(spec.name, "quarantine", day).height
        if lake.exists(spec.name, "quarantine", day)
        else 0
    )
    return validation.quarantine_rate(valid, quarantined)


def _deployments(lake: Lake, spec: Spec, reg: RegistryReader, st: SpecState) -> None:
    history = registry.deployment_history(lake, spec.name).sort("time")
    moves = history.filter(pl.col("action").is_in(registry.MOVES))
    if moves.height:
        st.promoted_at = moves["time"][-1].timestamp()
    # A refusal's trigger is the refused version's: what started the training that made it.
    triggers = {v.version: v.tags.get(f"{registry.TAG}trigger") for v in reg.versions(
        spec.registered_model_name
    )}  # fmt: skip
    st.refusals = Counter({t: 0 for t in TRIGGERS})
    in_a_row = 0
    for action, version in history.select("action", "to_version").iter_rows():
        if action == registry.REFUSED:
            st.refusals[triggers.get(version) or UNKNOWN] += 1
            in_a_row += 1
        elif action in registry.PROMOTIONS:
            in_a_row = 0
    st.refusals_in_a_row = in_a_row


def read_spec(spec: Spec, lake: Lake, reg: RegistryReader, runs: RunReader) -> SpecState:
    st = SpecState()
    st.champion = reg.alias_version(spec.registered_model_name, registry.CHAMPION)
    _deployments(lake, spec, reg, st)
    drift = monitoring.summaries(lake, spec.name, monitoring.DRIFT_REPORT, last=1)
    if drift and drift[-1].get("drift_share") is not None:
        st.drift_share = float(drift[-1]["drift_share"])
    perf = monitoring.summaries(lake, spec.name, monitoring.MODEL_PERFORMANCE, last=1)
    if perf:
        p = perf[-1]
        st.metric = str(p.get("primary_metric") or "")
        st.realized = None if p.get("realized") is None else float(p["realized"])
        st.baseline = None if p.get("baseline") is None else float(p["baseline"])
        st.declined = None if p.get("declined") is None else bool(p["declined"])
    st.quarantine_rate = _quarantine_rate(lake, spec)
    st.newest = {}
    for stage, asset in STAGE_ASSETS.items():
        days = lake.partitions(spec.name, asset)
        if days:
            st.newest[stage] = day_end(days[-1])
    mature = _newest_mature_labels(lake, spec)
    if mature:
        st.newest[LABELS_MATURE] = day_end(mature)
    training = runs.runs(
        job_name=jobs.training_job_name(spec), tags={monitoring.TAG_SPEC: spec.name}
    )
    st.retrainings = Counter({t: 0 for t in TRIGGERS})
    st.retrainings.update(r.tags.get(monitoring.TAG_TRIGGER) or UNKNOWN for r in training)
    st.failed_runs = Counter({j: 0 for j in spec_jobs(spec)})
    st.failed_runs.update(
        r.job_name
        for r in runs.runs(statuses=["FAILURE"])
        if r.job_name.startswith(f"{spec.name}_")
    )
    return st


class PipelineCollector(Collector):
    """Per-spec gauges and counters, read afresh on every scrape."""

    def __init__(
        self,
        specs: list[Spec],
        lake_url: str,
        tracking_uri: str,
        dagster_home: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.specs = specs
        self.lake = Lake(lake_url)
        self.tracking_uri = tracking_uri
        self.dagster_home = dagster_home
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # registering must not read the state; collect() says what there is

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        f = _families()
        runs, handle = open_runs(self.dagster_home)
        reg = open_registry(self.tracking_uri)
        try:
            now = self.clock()
            for spec in self.specs:
                try:
                    st = read_spec(spec, self.lake, reg, runs)
                except Exception:  # one unreadable spec must not hide the others
                    log.exception("exporter: reading %s failed", spec.name)
                    f["up"].add_metric([spec.name], 0)
                    continue
                f["up"].add_metric([spec.name], 1)
                _add(f, spec, st, now)
        finally:
            handle.close()
            reg.close()
        f["duration"].add_metric([], time.perf_counter() - t0)
        yield from f.values()


def _families() -> dict[str, Any]:
    g, c, s = GaugeMetricFamily, CounterMetricFamily, ["spec"]
    return {
        "up": g(
            "mlops_exporter_spec_up", "1 when the spec's state was read, 0 on error.", labels=s
        ),
        "champion": g("mlops_champion_version", "Version the champion alias points at.", labels=s),
        "promoted": g(
            "mlops_champion_promoted_timestamp_seconds",
            "When the champion alias last moved (promotion or rollback), unix seconds.",
            labels=s,
        ),
        "drift": g("mlops_drift_share", "Drifted share of columns, newest drift report.", labels=s),
        "drift_limit": g(
            "mlops_drift_threshold", "The spec's monitoring.drift_threshold.", labels=s
        ),
        "realized": g(
            "mlops_realized_metric",
            "Primary metric on the newest day with mature labels (model_performance).",
            labels=["spec", "metric"],
        ),
        "baseline": g(
            "mlops_realized_metric_baseline",
            "The evaluation metric of the champion that scored that day.",
            labels=["spec", "metric"],
        ),
        "tolerance": g(
            "mlops_realized_metric_tolerance",
            "The spec's monitoring.metric_decline_tolerance.",
            labels=s,
        ),
        "declined": g(
            "mlops_realized_metric_declined",
            "1 when the newest realized metric counts as a decline (the retraining rule).",
            labels=s,
        ),
        "quarantine": g(
            "mlops_quarantine_rate", "Quarantined share of the newest validated day.", labels=s
        ),
        "quarantine_limit": g(
            "mlops_quarantine_rate_limit", "The spec's schema.max_quarantine_rate.", labels=s
        ),
        "maturity": g(
            "mlops_label_maturity_seconds", "The spec's labels.maturity, in seconds.", labels=s
        ),
        "age": g(
            "mlops_partition_age_seconds",
            "Seconds since the end of the newest partition per stage (built: features, "
            "scored: batch_predictions, labels_mature: a label partition with a mature row).",
            labels=["spec", "stage"],
        ),
        "retrainings": c(
            "mlops_retrainings",
            "Training runs by trigger (drift, metric_decline, schedule, manual).",
            labels=["spec", "trigger"],
        ),
        "refusals": c(
            "mlops_retraining_refusals",
            "Challengers the promotion gate refused, by the trigger of their training.",
            labels=["spec", "trigger"],
        ),
        "in_a_row": g(
            "mlops_retraining_refusals_in_a_row",
            "Refusals since the last promotion (0 after one).",
            labels=s,
        ),
        "failed": c(
            "mlops_failed_runs",
            "Failed Dagster runs by job (dagster_job: the target label job is Prometheus's).",
            labels=["spec", "dagster_job"],
        ),
        "duration": g(
            "mlops_exporter_collect_duration_seconds", "Time this scrape took to read the state."
        ),
    }


def _add(f: dict[str, Any], spec: Spec, st: SpecState, now: float) -> None:
    n = spec.name
    f["drift_limit"].add_metric([n], spec.monitoring.drift_threshold)
    f["tolerance"].add_metric([n], spec.monitoring.metric_decline_tolerance)
    f["quarantine_limit"].add_metric([n], spec.schema_.max_quarantine_rate)
    f["maturity"].add_metric([n], spec.maturity.total_seconds())
    f["in_a_row"].add_metric([n], st.refusals_in_a_row)
    for key, value in (
        ("champion", st.champion),
        ("promoted", st.promoted_at),
        ("drift", st.drift_share),
        ("quarantine", st.quarantine_rate),
        ("declined", None if st.declined is None else float(st.declined)),
    ):
        if value is not None:
            f[key].add_metric([n], value)
    if st.realized is not None:
        f["realized"].add_metric([n, st.metric], st.realized)
    if st.baseline is not None:
        f["baseline"].add_metric([n, st.metric], st.baseline)
    for stage, end in (st.newest or {}).items():
        f["age"].add_metric([n, stage], max(0.0, now - end))
    for key, counts in (
        ("retrainings", st.retrainings),
        ("refusals", st.refusals),
        ("failed", st.failed_runs),
    ):
        for label, count in sorted((counts or {}).items()):
            f[key].add_metric([n, label], count)


def build_registry(collector: PipelineCollector) -> Any:
    from prometheus_client import CollectorRegistry

    r = CollectorRegistry(auto_describe=False)
    r.register(collector)
    return r


def serve(collector: PipelineCollector, host: str, port: int) -> None:
    """Answer GET /metrics (and /) on host:port until interrupted."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=build_registry(collector))
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()
