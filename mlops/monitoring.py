"""Monitoring after deployment: realized performance once labels mature, and the retraining
decision rules of DESIGN §6 (consecutive partitions, one retraining per episode, cooldown).

Everything here is plain data in, plain data out, so the sensors stay thin and the rules can
be tested tick by tick without Dagster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from mlops import evaluation, modeling
from mlops.labels import MATURE, entity_column
from mlops.lake import Lake, read_json, write_json
from mlops.model_evaluation import json_safe, load_evaluation
from mlops.spec import Spec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import polars as pl

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
TAG_ATTEMPT = "mlops/attempt"  # 1 for an episode's first retraining, 2 for its first retry...
TAG_CHANGE_POINT = "mlops/change_point"  # the episode's first breached partition
TAG_OBSERVED = "mlops/trigger_observed"  # the newest breached partition it saw
TAG_LABELLED = "mlops/labelled_through"  # the newest evaluated (labelled) day it had
# Triggers whose retrainings start a cooldown: a detected change. A scheduled or manual
# retraining never delays the recovery from one.
CHANGE_TRIGGERS = (DRIFT, METRIC_DECLINE)


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
    # Standard error of realized - baseline: the day's spread (entity bootstrap) and the
    # baseline's own, scaled from it by the rows each was measured on.
    realized_se: float | None = None

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
    baseline_rows: int | None = None,
) -> Performance:
    """Metrics of what was served against what happened, compared with the champion's
    evaluation metric (measured on `baseline_rows` test rows). A day whose labels are not
    mature yet has no realized metric."""
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
    se = None
    if realized is not None:
        ent, ts = entity_column(spec), spec.source.timestamp_column
        groups = (
            joined[ent].to_numpy()
            if spec.source.entity_column
            else joined[ts].dt.truncate("1h").cast(pl.String).to_numpy()
        )
        se = standard_error(task, metric, y, pred, threshold, groups)
        if se is not None and baseline_rows:
            # The baseline is a measurement too (the test split): same process, its own rows.
            se = float(np.sqrt(se**2 * (1 + joined.height / baseline_rows)))
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
        declined=declined(spec, realized, baseline, se),
        slices=slices,
        realized_se=se,
    )


def standard_error(
    task: str,
    metric: str,
    y: np.ndarray,
    pred: np.ndarray,
    threshold: float | None,
    groups: np.ndarray | None = None,
    resamples: int = 200,
) -> float | None:
    """How much `metric` on these rows would vary by chance: a seeded bootstrap.

    With `groups` (the entity, or the hour for a single series) whole groups are resampled:
    rows of one machine, or of one failure's horizon, are not independent, and a row
    bootstrap (or a formula that counts rows) would call a noisy day's dip significant."""
    n = len(y)
    if n < 2:
        return None
    rng = np.random.default_rng(0)
    y, pred = np.asarray(y), np.asarray(pred)
    if n > 20_000:  # the spread settles long before; bound the cost of a huge day
        keep = rng.choice(n, size=20_000, replace=False)
        y, pred = y[keep], pred[keep]
        groups = None if groups is None else np.asarray(groups)[keep]
    if groups is not None:
        _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    if groups is None or len(members) < 5:
        members = [np.array([i]) for i in range(len(y))]
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(members), len(members))
        b = np.concatenate([members[i] for i in pick])
        v = evaluation.metrics(task, y[b], pred[b], threshold).get(metric)
        if v is not None and np.isfinite(v):
            values.append(v)
    return float(np.std(values, ddof=1)) if len(values) > 10 else None


def _tol(spec: Spec) -> float:
    return spec.monitoring.metric_decline_tolerance


def _finite(d: dict[str, float]) -> dict[str, float]:
    """NaN metrics (one-class days) are dropped, not reported as numbers."""
    return {k: float(v) for k, v in d.items() if v is not None and np.isfinite(v)}


def decline_threshold(metric: str, baseline: float | None, tolerance: float) -> float | None:
    """The realized value past which a day counts as declined (before any confidence margin):
    the baseline minus the tolerance, plus it for error metrics."""
    if baseline is None:
        return None
    from mlops.promotion import LOWER_IS_BETTER

    return baseline + tolerance if metric in LOWER_IS_BETTER else baseline - tolerance


def declined(
    spec: Spec, realized: float | None, baseline: float | None, se: float | None = None
) -> bool:
    """Realized below the baseline minus the tolerance (above it, for error metrics), and,
    with `monitoring.decline_confidence`, by more than chance on the day's rows explains
    (z standard errors): one small day's noise must not retrain a model that is fine."""
    if realized is None or baseline is None:
        return False
    from mlops.promotion import better

    margin = _tol(spec) + 1e-12
    confidence = spec.monitoring.decline_confidence
    if se is not None and confidence is not None:
        from scipy.stats import norm

        margin += float(norm.ppf(confidence)) * se
    # Declined = the baseline beats the realized value by more than the margin.
    return better(modeling.primary_metric(spec), baseline, realized, margin)


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
class RetrainDecision:
    trigger: str
    retrain: bool
    partition: str | None  # the partition the decision was made at
    episode: str | None  # "<trigger>:v<champion>:<first partition>" of the current run
    reason: str
    evidence: dict[str, Any]
    attempt: int = 1  # which retraining of the episode this is
    change_point: str | None = None  # the episode's first breached partition
    observed: str | None = None  # the newest breached partition (retries count from it)
    labelled_through: str | None = None  # the newest labelled day when it was decided

    @property
    def run_key(self) -> str | None:
        if self.episode is None:
            return None
        return self.episode if self.attempt == 1 else f"{self.episode}#{self.attempt}"

    def tags(self, spec: Spec) -> dict[str, str]:
        import json

        tags = {
            TAG_SPEC: spec.name,
            TAG_TRIGGER: self.trigger,
            TAG_PARTITION: self.partition or "",
            TAG_REASON: self.reason[:900],
            TAG_EPISODE: self.episode or "",
            TAG_EVIDENCE: json.dumps(self.evidence, sort_keys=True, default=str)[:3000],
            TAG_ATTEMPT: str(self.attempt),
        }
        if self.change_point:
            tags[TAG_CHANGE_POINT] = self.change_point
        if self.observed:
            tags[TAG_OBSERVED] = self.observed
        if self.labelled_through:
            tags[TAG_LABELLED] = self.labelled_through
        return tags


def _day(p: str) -> dt.date:
    return dt.date.fromisoformat(p)


def partitions_between(a: str, b: str) -> int:
    """Daily partitions from a to b (b - a); cooldowns count partitions, not wall time."""
    return (_day(b) - _day(a)).days


def current_run(observations: list[Observation]) -> list[Observation]:
    """The trailing run of breached observations with one champion.

    A day with no observation (no data landed, or not labelled) does not end the run: only
    a monitored day that did not breach does, or a change of champion."""
    obs = sorted(observations, key=lambda o: o.partition)
    run: list[Observation] = []
    for o in reversed(obs):
        if not o.breached:
            break
        if run and o.champion_version != run[-1].champion_version:
            break
        run.append(o)
    return list(reversed(run))


def decide_retraining(
    trigger: str,
    observations: list[Observation],
    consecutive: int,
    cooldown_partitions: int,
    last_retrain_partition: str | None,
    attempts: Mapping[str, list],
    now: str | None = None,
    *,
    champion: int | None = None,
    retry_after: int = 1,
    max_attempts: int = 4,
    labelled: list[str] | None = None,
) -> RetrainDecision:
    """Retrain when the newest observations breached `consecutive` times in a row against
    the serving champion.

    - An episode is a run of breached observations against one champion. Its first
      retraining waits for the cooldown (partitions since the last change-triggered
      retraining); a refused one re-arms after `retry_after` more breached observations, up
      to `max_attempts`, so one refusal never ends the recovery. A promotion ends the
      episode (a new champion serves), and so does a day that no longer breaches.
    - `attempts`: episode -> [observed, labelled_through] of each earlier retraining: the
      newest breached partition it saw and the newest labelled day it had.
    - `labelled`: the days with realized metrics (mature labels). A retry waits for a
      labelled day after the change point that the previous attempt did not have: without
      one it would train on the same rows and be refused again.
    - `now` is the newest data partition: the clock of the cooldown, since realized metrics
      lag the data by the label maturity (default: the newest observation).
    """
    if not observations:
        return RetrainDecision(trigger, False, now, None, "no observations yet", {})
    latest = max(o.partition for o in observations)
    now = max(now or latest, latest)
    run = current_run(observations)
    if not run or run[-1].partition != latest:
        return RetrainDecision(trigger, False, now, None, f"{latest}: no breach", {})
    breached_v = run[-1].champion_version
    if champion is not None and breached_v is not None and breached_v != champion:
        return RetrainDecision(
            trigger,
            False,
            now,
            None,
            f"the breach was against v{breached_v}; v{champion} serves now (episode over)",
            {},
        )
    episode = f"{trigger}:v{run[0].champion_version}:{run[0].partition}"
    evidence: dict[str, Any] = {
        "partitions": [o.partition for o in run],
        "values": [o.value for o in run],
        "threshold": run[-1].threshold,
        "champion_version": breached_v,
        "consecutive_required": consecutive,
        "change_point": run[0].partition,
    }
    base = {
        "episode": episode,
        "evidence": evidence,
        "change_point": run[0].partition,
        "observed": run[-1].partition,
        "labelled_through": max(labelled) if labelled else None,
    }
    if len(run) < consecutive:
        why = f"{len(run)}/{consecutive} consecutive breached partitions"
        return RetrainDecision(trigger, False, now, reason=why, **base)  # type: ignore[arg-type]
    prior_entries = sorted(
        ([a, ""] if isinstance(a, str) else list(a)) for a in attempts.get(episode, [])
    )
    prior = [a[0] for a in prior_entries]
    what = "drift share" if trigger == DRIFT else "realized metric"
    reason = (
        f"{what} breached {run[-1].threshold:.3f} for {len(run)} consecutive partition(s) "
        f"{run[0].partition}..{run[-1].partition} (champion v{breached_v})"
    )
    if prior:
        evidence["earlier_attempts"] = prior
        if len(prior) >= max_attempts:
            why = (
                f"episode {episode}: {len(prior)} retraining(s), none promoted; no more "
                f"attempts (monitoring.max_attempts_per_episode {max_attempts}) until the "
                "breach ends or a champion is promoted by hand"
            )
            return RetrainDecision(trigger, False, now, reason=why, attempt=len(prior), **base)  # type: ignore[arg-type]
        since = sum(1 for o in run if o.partition > prior[-1])
        if since < retry_after:
            why = (
                f"episode {episode}: retraining {len(prior)} was not promoted; retry after "
                f"{retry_after} more breached partition(s) ({since} so far)"
            )
            return RetrainDecision(trigger, False, now, reason=why, attempt=len(prior), **base)  # type: ignore[arg-type]
        had = max((a[1] or "" for a in prior_entries), default="")
        fresh = [d for d in labelled or [] if d >= run[0].partition and d > had]
        if labelled is not None and not fresh:
            why = (
                f"episode {episode}: retraining {len(prior)} was not promoted; waiting for a "
                f"labelled day after the change point {run[0].partition} that it did not "
                f"have (labels through {had or '-'})"
            )
            return RetrainDecision(trigger, False, now, reason=why, attempt=len(prior), **base)  # type: ignore[arg-type]
        reason += f"; retry {len(prior) + 1}: the breach persists after {prior[-1]}"
        return RetrainDecision(trigger, True, now, reason=reason, attempt=len(prior) + 1, **base)  # type: ignore[arg-type]
    if last_retrain_partition is not None:
        since = partitions_between(last_retrain_partition, now)
        evidence["last_retrain_partition"] = last_retrain_partition
        if since < cooldown_partitions:
            why = (
                f"cooldown: {since}/{cooldown_partitions} partitions since the retraining "
                f"at {last_retrain_partition}"
            )
            return RetrainDecision(trigger, False, now, reason=why, **base)  # type: ignore[arg-type]
    return RetrainDecision(trigger, True, now, reason=reason, **base)  # type: ignore[arg-type]


def cooldown_ok(
    partition: str, last_retrain_partition: str | None, cooldown_partitions: int
) -> bool:
    return (
        last_retrain_partition is None
        or partitions_between(last_retrain_partition, partition) >= cooldown_partitions
    )


# --- every built day is scored and monitored (DESIGN §6: follow the data) ---------------

SCORE, LABELS, PERFORMANCE = "score", "labels", "performance"


@dataclass(frozen=True)
class FollowUp:
    """A day's next monitoring step: score it, refresh its labels, or evaluate it."""

    kind: str  # SCORE | LABELS | PERFORMANCE
    partition: str
    reason: str
    with_performance: bool = False  # LABELS: evaluate the day in the same run


def monitoring_start(lake: Lake, spec: Spec) -> str | None:
    """The last day the first champion trained on, or None while there is no champion.

    Days after it are scored and monitored whenever they land; the first champion's own
    training days are in-sample, so monitoring them would say nothing."""
    from mlops.registry import MOVES, deployment_history

    hist = deployment_history(lake, spec.name)
    moves = hist.filter(pl.col("action").is_in(MOVES)).sort("time")
    if moves.height == 0:
        return None
    first = int(moves["to_version"][0])
    doc = read_json(lake, spec.name, "model_evaluation", f"v{first}") or {}
    window = doc.get("window") or []
    # A champion promoted by hand with no recorded window: monitor every day.
    return max(window) if window else "0000-00-00"


def current_champion(lake: Lake, spec: Spec) -> int | None:
    """The version the deployment history last moved `champion` to (no registry call)."""
    from mlops.registry import MOVES, deployment_history

    moves = deployment_history(lake, spec.name).filter(pl.col("action").is_in(MOVES))
    return int(moves["to_version"][-1]) if moves.height else None


def label_due(spec: Spec, day: str, data_through: str | None) -> bool:
    """Column labels: every row of `day` is final once the data has reached day + maturity."""
    if data_through is None:
        return False
    end_of_day = dt.datetime.combine(_day(day) + dt.timedelta(days=1), dt.time())
    through = dt.datetime.combine(_day(data_through) + dt.timedelta(days=1), dt.time())
    return end_of_day + spec.maturity <= through


def follow_ups(
    spec: Spec,
    *,
    start: str | None,
    features: list[str],
    scored: set[str],
    labelled: list[str],
    mature: set[str],
    performed: set[str],
    data_through: str | None,
    busy: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[FollowUp]:
    """What the lake still lacks, oldest day first: with a champion, every day after
    `start` is scored (drift report included) and, once its labels are mature, evaluated;
    column labels are refreshed when the data clock passes their maturity (event feeds
    mature when their files arrive: the new-data sensor requests those)."""
    out: list[FollowUp] = []
    if spec.labels.kind in ("column", "feedback"):  # both mature by the data clock
        for d in labelled:
            if d not in mature and d not in busy and label_due(spec, d, data_through):
                perf = start is not None and d > start and d in scored
                why = f"labels of {d} final: data through {data_through}"
                out.append(FollowUp(LABELS, d, why, with_performance=perf))
    if start is not None:
        due = {f.partition for f in out}
        for d in features:
            if d > start and d not in scored and d not in busy:
                out.append(FollowUp(SCORE, d, f"{d} built and not scored yet"))
        for d in sorted(scored):
            if d > start and d in mature and d not in performed and d not in busy | due:
                out.append(FollowUp(PERFORMANCE, d, f"{d} scored and its labels are mature"))
    return sorted(out, key=lambda f: (f.partition, f.kind))


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
                declined(spec, d["realized"], d["baseline"], d.get("realized_se")),
                float(d["realized"]),
                float(d["baseline"]) - spec.monitoring.metric_decline_tolerance,
                d.get("champion_version"),
            )
        )
    return out


# --- a day's scored rows and realized performance (the monitoring assets' logic) ------------


def scored_rows(lake: Lake, spec: Spec, day: str) -> tuple[pl.DataFrame, str]:
    """The day's scored rows and where they came from: what the online service served when it
    served any (the inference_log asset: "served"), else the batch predictions ("batch")."""
    if lake.exists(spec.name, "inference_log", day):
        served = served_rows(spec, lake.read(spec.name, "inference_log", day))
        if served.height:
            return served, "served"
    return lake.read(spec.name, "batch_predictions", day), "batch"


def scored_version(predictions: pl.DataFrame) -> int:
    """The model version that scored most of the day's rows."""
    counts = predictions.group_by("model_version").len().sort("len", descending=True)
    return int(counts["model_version"][0])


class NoMatureLabels(MonitoringError):
    """None of the day's scored rows has a mature label yet: the message says when to re-run."""


@dataclass
class PerformanceDay:
    performance: Performance
    summary: dict[str, Any]  # what the lake's JSON summary (and the retraining rules) read
    table: pl.DataFrame  # one row: partition, model_version, rows_labelled, each metric
    source: str  # "served" or "batch"


def performance_day(spec: Spec, lake: Lake, day: str) -> PerformanceDay:
    """The day's realized metrics against the evaluation of the champion that scored it."""
    preds, source = scored_rows(lake, spec, day)
    version = scored_version(preds) if preds.height else None
    doc = load_evaluation(lake, spec, version) if version else None
    block = (doc or {}).get("challenger") or {}
    perf = realized_performance(
        spec,
        preds,
        lake.read(spec.name, "labels", day),
        # A day only the online service saw (feedback labels) has no lake features: no slices.
        lake.read(spec.name, "features", day) if lake.exists(spec.name, "features", day) else None,
        baseline=block.get("metrics", {}).get(modeling.primary_metric(spec)),
        threshold=block.get("threshold"),
        baseline_rows=(doc or {}).get("test_rows"),
    )
    if perf.rows_labelled == 0:
        raise NoMatureLabels(
            f"{spec.name} {day}: none of the {perf.rows_scored} scored rows has a mature label "
            f"yet (labels mature {spec.labels.maturity} after the row). Re-run "
            f"{spec.name}/labels for {day} once the label feed has arrived, then this asset."
        )
    summary = {**perf.summary(), "partition": day, "champion_version": version, "source": source}
    table = pl.DataFrame(
        {"partition": [day], "model_version": [version], "rows_labelled": [perf.rows_labelled]}
    ).with_columns(*[pl.lit(v, dtype=pl.Float64).alias(k) for k, v in perf.metrics.items()])
    return PerformanceDay(perf, summary, table, source)


def save_performance_day(lake: Lake, spec: Spec, day: str, p: PerformanceDay):
    """The day's table and its JSON summary; returns the table's write."""
    written = lake.write(spec.name, MODEL_PERFORMANCE, p.table, day)
    write_json(lake, spec.name, MODEL_PERFORMANCE, day, json_safe(p.summary))
    return written
