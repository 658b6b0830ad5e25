"""Monitoring after deployment: realized performance once labels mature, and the retraining
decision rules of DESIGN §6 (consecutive partitions, one retraining per episode, cooldown).

Everything here is plain data in, plain data out, so the sensors stay thin and the rules can
be tested tick by tick without Dagster.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from mlops import evaluation, modeling
from mlops.labels import MATURE, entity_column
from mlops.lake import Lake, read_json
from mlops.spec import Spec

DRIFT_REPORT = "drift_report"
MODEL_PERFORMANCE = "model_performance"
MONITORING_ASSET_NAMES = (DRIFT_REPORT, MODEL_PERFORMANCE)

DRIFT = "drift"
METRIC_DECLINE = "metric_decline"
SCHEDULE = "schedule"
MANUAL = "manual"

# Run tags every retraining carries (DESIGN §6: the reason and the evidence on the run).
TAG_TRIGGER = "mlops/trigger"
TAG_PARTITION = "mlops/trigger_partition"
TAG_REASON = "mlops/trigger_reason"
TAG_EVIDENCE = "mlops/trigger_evidence"
TAG_EPISODE = "mlops/episode"
TAG_SPEC = "mlops/spec"


class MonitoringError(ValueError):
    pass


# --- what was served --------------------------------------------------------------------


def served_rows(spec: Spec, log: pl.DataFrame, route: str = "champion") -> pl.DataFrame:
    """The inference log's rows of one route as a batch_predictions-like frame: entity and
    timestamp keys, score, decision, model version, plus the served features as columns."""
    rows = log.filter((pl.col("route") == route) & pl.col("score").is_not_null())
    keys = {
        entity_column(spec): pl.col("entity"),
        spec.source.timestamp_column: pl.col("event_time"),
    }
    base = rows.select(
        *[e.alias(k) for k, e in keys.items()],
        "score",
        "decision",
        "model_version",
        pl.col("features"),
    )
    if base.height == 0:
        return base.drop("features")
    feats = base["features"].str.json_decode().struct.unnest()
    return pl.concat([base.drop("features"), feats], how="horizontal")


# --- realized performance ---------------------------------------------------------------


@dataclass
class Performance:
    rows_scored: int
    rows_labelled: int  # scored rows whose label is mature
    model_versions: list[int]
    metrics: dict[str, float]
    primary_metric: str
    realized: float | None
    baseline: float | None  # the champion's evaluation metric on its test split
    tolerance: float
    declined: bool
    slices: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def join_predictions(spec: Spec, predictions: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Scored rows with their mature label (inner join on entity + timestamp)."""
    keys = [entity_column(spec), spec.source.timestamp_column]
    lab = labels.filter(pl.col(MATURE)).select(*keys, spec.labels.name)
    return predictions.join(lab, on=keys, how="inner")


def realized_performance(
    spec: Spec,
    predictions: pl.DataFrame,
    labels: pl.DataFrame,
    features: pl.DataFrame | None,
    baseline: float | None,
    threshold: float | None,
) -> Performance:
    """Metrics of what was served against what happened, compared with the champion's
    evaluation metric. A day whose labels are not mature yet has no realized metric."""
    metric = modeling.primary_metric(spec)
    joined = join_predictions(spec, predictions, labels)
    versions = sorted({int(v) for v in predictions["model_version"].unique().to_list()})
    if joined.height == 0:
        return Performance(
            predictions.height, 0, versions, {}, metric, None, baseline, _tol(spec), False
        )
    task = spec.model.task
    y = joined[spec.labels.name].cast(pl.Float64).to_numpy()
    if task == "binary_classification":
        y = y.astype("int64")
    pred = joined["score"].to_numpy()
    scores = _finite(evaluation.metrics(task, y, pred, threshold))
    realized = scores.get(metric)
    slices: dict[str, Any] = {}
    if features is not None and spec.gates.slice_columns:
        keys = [entity_column(spec), spec.source.timestamp_column]
        cols = [c for c in spec.gates.slice_columns if c in features.columns]
        frame = joined.join(features.select(*keys, *cols), on=keys, how="left").to_pandas()
        frame["y"], frame["pred"] = y, pred
        slices = evaluation.slice_metrics(task, frame, "y", "pred", cols, threshold)
    return Performance(
        rows_scored=predictions.height,
        rows_labelled=joined.height,
        model_versions=versions,
        metrics=scores,
        primary_metric=metric,
        realized=realized,
        baseline=baseline,
        tolerance=_tol(spec),
        declined=declined(spec, realized, baseline),
        slices=slices,
    )


def _tol(spec: Spec) -> float:
    return spec.monitoring.metric_decline_tolerance


def _finite(d: dict[str, float]) -> dict[str, float]:
    """NaN metrics (one-class days) are dropped, not reported as numbers."""
    return {k: float(v) for k, v in d.items() if v is not None and np.isfinite(v)}


def declined(spec: Spec, realized: float | None, baseline: float | None) -> bool:
    """Realized below the baseline minus the tolerance (above it, for error metrics)."""
    if realized is None or baseline is None:
        return False
    from mlops.promotion import better

    # Declined = the baseline beats the realized value by more than the tolerance.
    return better(modeling.primary_metric(spec), baseline, realized, _tol(spec) + 1e-12)


# --- the retraining rules ---------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One monitored partition: did it breach its rule, against which champion."""

    partition: str
    breached: bool
    value: float | None
    threshold: float | None
    champion_version: int | None


@dataclass
class Decision:
    trigger: str
    retrain: bool
    partition: str | None  # the partition the decision was made at
    episode: str | None  # "<trigger>:v<champion>:<first partition>" of the current run
    reason: str
    evidence: dict[str, Any]

    def tags(self, spec: Spec) -> dict[str, str]:
        import json

        return {
            TAG_SPEC: spec.name,
            TAG_TRIGGER: self.trigger,
            TAG_PARTITION: self.partition or "",
            TAG_REASON: self.reason[:900],
            TAG_EPISODE: self.episode or "",
            TAG_EVIDENCE: json.dumps(self.evidence, sort_keys=True, default=str)[:3000],
        }


def _day(p: str) -> dt.date:
    return dt.date.fromisoformat(p)


def partitions_between(a: str, b: str) -> int:
    """Daily partitions from a to b (b - a); cooldowns count partitions, not wall time."""
    return (_day(b) - _day(a)).days


def current_run(observations: list[Observation]) -> list[Observation]:
    """The trailing run of breached, calendar-consecutive partitions with one champion."""
    obs = sorted(observations, key=lambda o: o.partition)
    run: list[Observation] = []
    for o in reversed(obs):
        if not o.breached:
            break
        if run and (
            partitions_between(o.partition, run[-1].partition) != 1
            or o.champion_version != run[-1].champion_version
        ):
            break
        run.append(o)
    return list(reversed(run))


def decide(
    trigger: str,
    observations: list[Observation],
    consecutive: int,
    cooldown_partitions: int,
    last_retrain_partition: str | None,
    handled_episodes: set[str],
    now: str | None = None,
) -> Decision:
    """Retrain when the newest partitions breached `consecutive` times in a row (same
    champion), the episode has not had its retraining, and the cooldown has passed.

    `now` is the newest data partition: the clock of the cooldown, since realized metrics
    lag the data by the label maturity (default: the newest observation)."""
    if not observations:
        return Decision(trigger, False, now, None, "no observations yet", {})
    latest = max(o.partition for o in observations)
    now = max(now or latest, latest)
    run = current_run(observations)
    if not run or run[-1].partition != latest:
        return Decision(trigger, False, now, None, f"{latest}: no breach", {})
    episode = f"{trigger}:v{run[0].champion_version}:{run[0].partition}"
    evidence = {
        "partitions": [o.partition for o in run],
        "values": [o.value for o in run],
        "threshold": run[-1].threshold,
        "champion_version": run[-1].champion_version,
        "consecutive_required": consecutive,
    }
    if len(run) < consecutive:
        return Decision(
            trigger,
            False,
            now,
            episode,
            f"{len(run)}/{consecutive} consecutive breached partitions",
            evidence,
        )
    if episode in handled_episodes:
        return Decision(
            trigger, False, now, episode, f"episode {episode} already retrained", evidence
        )
    if last_retrain_partition is not None:
        since = partitions_between(last_retrain_partition, now)
        evidence["last_retrain_partition"] = last_retrain_partition
        if since < cooldown_partitions:
            return Decision(
                trigger,
                False,
                now,
                episode,
                f"cooldown: {since}/{cooldown_partitions} partitions since the retraining "
                f"at {last_retrain_partition}",
                evidence,
            )
    what = "drift share" if trigger == DRIFT else "realized metric"
    reason = (
        f"{what} breached {run[-1].threshold:.3f} for {len(run)} consecutive partition(s) "
        f"{run[0].partition}..{run[-1].partition} (champion v{run[-1].champion_version})"
    )
    return Decision(trigger, True, now, episode, reason, evidence)


def cooldown_ok(
    partition: str, last_retrain_partition: str | None, cooldown_partitions: int
) -> bool:
    return (
        last_retrain_partition is None
        or partitions_between(last_retrain_partition, partition) >= cooldown_partitions
    )


# --- what the monitoring assets recorded ------------------------------------------------


def summaries(lake: Lake, spec_name: str, asset: str, last: int = 60) -> list[dict[str, Any]]:
    """The newest `last` per-day summaries a monitoring asset wrote, oldest first."""
    days = lake.partitions(spec_name, asset)[-last:]
    docs = [read_json(lake, spec_name, asset, d) for d in days]
    return [d for d in docs if d is not None]


def drift_observations(spec: Spec, docs: list[dict[str, Any]]) -> list[Observation]:
    """A partition breaches when its drift share exceeds monitoring.drift_threshold."""
    limit = spec.monitoring.drift_threshold
    return [
        Observation(
            d["partition"],
            float(d["drift_share"]) > limit,
            float(d["drift_share"]),
            limit,
            d.get("champion_version"),
        )
        for d in docs
    ]


def performance_observations(spec: Spec, docs: list[dict[str, Any]]) -> list[Observation]:
    """A partition breaches when its realized metric fell below baseline - tolerance."""
    out = []
    for d in docs:
        if d.get("realized") is None or d.get("baseline") is None:
            continue
        out.append(
            Observation(
                d["partition"],
                declined(spec, d["realized"], d["baseline"]),
                float(d["realized"]),
                float(d["baseline"]) - spec.monitoring.metric_decline_tolerance,
                d.get("champion_version"),
            )
        )
    return out
