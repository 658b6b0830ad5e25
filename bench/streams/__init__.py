"""Known-truth streams for the closed-loop benchmark (bench/closed_loop.py).

Each stream is a binary-classification problem over three numeric readings x1, x2, x3 with
the label in the rows (`target`, labels `kind: column`), deterministic from a seed, and with
one known truth about when and how the world changes:

- concept_abrupt: the inputs keep their distribution; at the onset the label rule changes
  abruptly (x1's weight flips sign and x3 replaces x2). One row per machine and hour.
- covariate_shift: the label rule never changes, but it has an interaction: where x1 > 0
  the label follows x2, where x1 < 0 it follows x3 (logit 3 * (w * x2 + (1 - w) * x3),
  w = sigmoid(8 * x1)). At the onset x1 moves from N(+1.5, 0.4) to N(-1.5, 0.4), a region
  the old model has almost never seen and where its x2 rule is wrong. No entity column.
- gradual: the rule's weight vector rotates from x1 towards x2 by 90 degrees, linearly
  in time over `gradual_days` days from the onset, then stays. No entity column.
- control: the base rule of concept_abrupt, with no change at all. One row per machine
  and hour.

In its regime every rule is learnable: the Bayes ROC AUC is about 0.90-0.92.
`write_project` lays a stream out as a project: `<root>/landing/<name>/readings_<day>.csv`
and `<root>/specs/<name>.yaml` (column labels mature at once, xgboost with 5 trials and a
logistic-regression baseline, the passthrough readings plus one rolling mean).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

STREAMS = ("concept_abrupt", "covariate_shift", "gradual", "control")
FEATURES = ("x1", "x2", "x3")
TARGET = "target"
ENTITY = "machine_id"
START = dt.date(2026, 1, 1)
N_MACHINES = 30  # entity streams: one reading per machine and hour, ~5 % missing

TRUTH = {
    "concept_abrupt": "label rule flips at onset (logit 2.5*x1+1.5*x2 -> -2.5*x1+1.5*x3); "
    "inputs unchanged",
    "covariate_shift": "x1 moves from N(+1.5, 0.4) to N(-1.5, 0.4) at onset; the fixed rule "
    "follows x2 where x1 > 0 and x3 where x1 < 0",
    "gradual": "rule 3*(cos(a)*x1 + sin(a)*x2), a rotating 0 -> 90 degrees linearly over "
    "8 days from onset",
    "control": "no change (logit 2.5*x1+1.5*x2 throughout)",
}
CHANGES = {"concept_abrupt": True, "covariate_shift": True, "gradual": True, "control": False}
HAS_ENTITY = {"concept_abrupt": True, "covariate_shift": False, "gradual": False, "control": True}


@dataclass
class Stream:
    """One generated stream: its rows per day (timestamp, [machine_id], x1..x3, target)."""

    name: str
    seed: int
    start: dt.date
    onset: int  # index of the first changed day (nominal for the control)
    build_days: int
    truth: str
    changes: bool
    entity: bool
    days: list[pl.DataFrame] = field(repr=False)

    @property
    def n_days(self) -> int:
        return len(self.days)

    def date(self, i: int) -> dt.date:
        return self.start + dt.timedelta(days=i)

    @property
    def onset_date(self) -> dt.date:
        return self.date(self.onset)

    def index(self, day: str | dt.date) -> int:
        """Day index of a date (or an ISO date string) in this stream."""
        d = dt.date.fromisoformat(day) if isinstance(day, str) else day
        return (d - self.start).days

    def rows(self, lo: int, hi: int) -> pl.DataFrame:
        """The rows of days [lo, hi)."""
        return pl.concat(self.days[max(lo, 0) : hi])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _times(rng: np.random.Generator, day: dt.date, entity: bool, rows: int) -> dict:
    """Timestamps (datetime64[s]) and, for entity streams, machine ids of one day's rows."""
    t0 = np.datetime64(day.isoformat(), "s")
    if entity:
        machine = np.repeat(np.arange(N_MACHINES), 24)
        hour = np.tile(np.arange(24), N_MACHINES)
        offset = hour * 3600 + rng.integers(0, 3600, hour.size)
        keep = rng.random(hour.size) >= 0.05
        order = np.argsort(offset[keep], kind="stable")
        return {
            "timestamp": t0 + offset[keep][order].astype("timedelta64[s]"),
            ENTITY: np.array([f"m{m:02d}" for m in machine[keep][order]]),
        }
    offset = np.sort(rng.integers(0, 86_400, rows))
    return {"timestamp": t0 + offset.astype("timedelta64[s]")}


def _rules(name: str, onset: int, gradual_days: float) -> tuple[Callable, Callable]:
    """(x1 mean for day i, logit(x, day index i, fraction of the day t)) of a stream."""

    def base(x: np.ndarray, i: int, t: np.ndarray) -> np.ndarray:
        return 2.5 * x[0] + 1.5 * x[1]

    def centred(i: int) -> float:
        return 0.0

    if name == "control":
        return centred, base
    if name == "concept_abrupt":

        def concept(x: np.ndarray, i: int, t: np.ndarray) -> np.ndarray:
            return base(x, i, t) if i < onset else -2.5 * x[0] + 1.5 * x[2]

        return centred, concept
    if name == "covariate_shift":

        def shifted(i: int) -> float:
            return 1.5 if i < onset else -1.5

        def interaction(x: np.ndarray, i: int, t: np.ndarray) -> np.ndarray:
            w = _sigmoid(8.0 * x[0])
            return 3.0 * (w * x[1] + (1.0 - w) * x[2])

        return shifted, interaction
    if name == "gradual":

        def rotating(x: np.ndarray, i: int, t: np.ndarray) -> np.ndarray:
            a = (math.pi / 2) * np.clip((i + t - onset) / gradual_days, 0.0, 1.0)
            return 3.0 * (np.cos(a) * x[0] + np.sin(a) * x[1])

        return centred, rotating
    raise ValueError(f"unknown stream '{name}'; expected one of {', '.join(STREAMS)}")


def generate(
    name: str,
    seed: int = 0,
    days: int = 45,
    onset: int = 30,
    build_days: int = 20,
    rows: tuple[int, int] = (600, 1200),
    gradual_days: float = 8.0,
    start: dt.date = START,
) -> Stream:
    """A stream's rows, deterministic from (name, seed): `days` days from `start`, the change
    at day index `onset`. Entity streams have ~680 rows a day (30 machines x 24 hours); the
    others draw [rows[0], rows[1]) rows a day at random times."""
    if not 0 < build_days < onset < days:
        raise ValueError(f"need 0 < build_days ({build_days}) < onset ({onset}) < days ({days})")
    x1_mean, logit = _rules(name, onset, gradual_days)
    entity = HAS_ENTITY[name]
    rng = np.random.default_rng([seed, STREAMS.index(name)])
    frames = []
    for i in range(days):
        n_rows = int(rng.integers(rows[0], rows[1]))
        cols = _times(rng, start + dt.timedelta(days=i), entity, n_rows)
        n = len(cols["timestamp"])
        sd = 0.4 if name == "covariate_shift" else 1.0
        x = np.vstack([rng.normal(x1_mean(i), sd, n), rng.normal(0, 1, n), rng.normal(0, 1, n)])
        t = (cols["timestamp"] - cols["timestamp"].astype("datetime64[D]")).astype(float) / 86_400
        y = (rng.random(n) < _sigmoid(logit(x, i, t))).astype(np.int64)
        frames.append(
            pl.DataFrame(
                {
                    **cols,
                    **{f: np.round(x[k], 5) for k, f in enumerate(FEATURES)},
                    TARGET: y,
                    "timestamp": cols["timestamp"].astype("datetime64[us]"),
                }
            ).select(["timestamp", *(c for c in cols if c != "timestamp"), *FEATURES, TARGET])
        )
    return Stream(
        name=name,
        seed=seed,
        start=start,
        onset=onset,
        build_days=build_days,
        truth=TRUTH[name],
        changes=CHANGES[name],
        entity=entity,
        days=frames,
    )


def spec_text(stream: Stream) -> str:
    """The stream's spec YAML (paths relative to the project root, see write_project)."""
    entity_source = f"\n  entity_column: {ENTITY}" if stream.entity else ""
    entity_schema = f"\n    - {{name: {ENTITY}, type: string}}" if stream.entity else ""
    return f"""\
# Closed-loop bench stream, generated by bench/streams (seed {stream.seed}).
# Known truth: {stream.truth}; onset {stream.onset_date}.
name: {stream.name}
description: closed-loop bench stream {stream.name}

source:
  kind: files
  path: landing/{stream.name}
  format: csv
  file_pattern: "readings_{{date}}.csv"
  timestamp_column: timestamp{entity_source}
  start_date: {stream.start}

schema:
  unknown_columns: fail
  columns:
    - {{name: timestamp, type: timestamp}}{entity_schema}
    - {{name: x1, type: float}}
    - {{name: x2, type: float}}
    - {{name: x3, type: float}}
    - {{name: {TARGET}, type: int, min: 0, max: 1}}

labels: {{kind: column, column: {TARGET}, name: label, maturity: 0h}}

features:
  lookback_days: 1
  passthrough: [x1, x2, x3]
  aggregates:
    - {{columns: [x1], functions: [mean], windows: [6h]}}

model:
  task: binary_classification
  trials: 5
  seed: 42
  training_window_days: 14
  candidates:
    - estimator: xgboost
      params: {{tree_method: hist, n_estimators: 300, early_stopping_rounds: 30}}
      search_space:
        max_depth: {{type: int, low: 2, high: 6}}
        learning_rate: {{type: float, low: 0.03, high: 0.3, log: true}}
    - estimator: logistic_regression
      search_space:
        C: {{type: float, low: 0.01, high: 10, log: true}}

gates:
  primary_metric: roc_auc
  thresholds: {{roc_auc: 0.7}}
  min_improvement: 0.005

monitoring:
  retraining_schedule: null     # no periodic retraining: every retraining is a trigger's
"""


def write_project(stream: Stream, root: Path) -> Path:
    """Write the stream's landing files and spec under `root`; return the spec's path."""
    landing = root / "landing" / stream.name
    landing.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(stream.days):
        frame.with_columns(pl.col("timestamp").dt.strftime("%Y-%m-%dT%H:%M:%S")).write_csv(
            landing / f"readings_{stream.date(i)}.csv"
        )
    specs = root / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    path = specs / f"{stream.name}.yaml"
    path.write_text(spec_text(stream))
    return path
