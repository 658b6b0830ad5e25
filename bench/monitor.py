"""Monitoring benchmark: how long the drift computation takes on one large day.

1. drift: mlops.drift.compute_drift on a current day of 1,000,000 rows x 30 feature columns
   (25 numeric, 5 categorical, plus the model's score as the prediction column) against a
   reference of the same size, with a shift in 5 numeric columns, 1 categorical column and
   the prediction. Timed end to end, Evidently HTML included, with the spec's defaults
   (20,000 sampled rows per side, wasserstein / Jensen-Shannon). The first call of a fresh
   process also pays evidently's import and plotly's first-use set-up; it is reported apart
   from the median of the repeats that follow. Goal: <= 10 s.

More sections (sensor tick time, closed-loop time) are added as more bench_* functions
collected by main().

    .venv/bin/python bench/monitor.py [--rows 1000000] [--repeats 3] [--out bench/results/monitor.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlops.drift import compute_drift  # noqa: E402

GOAL_DRIFT_S = 10.0
N_NUMERIC, N_CATEGORICAL = 25, 5
SHIFTED_NUMERIC = ("num_00", "num_01", "num_02", "num_03", "num_04")
SHIFTED_CATEGORICAL = ("cat_0",)
CATEGORIES = np.array([f"level_{i}" for i in range(8)])


def _day(rows: int, seed: int, shifted: bool) -> pl.DataFrame:
    """A synthetic feature day: numeric columns of varied scale, 8-level categoricals and
    a score in [0, 1]; `shifted` moves the SHIFTED_* columns and the score."""
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {}
    for i in range(N_NUMERIC):
        name = f"num_{i:02d}"
        scale = 1.0 + i
        shift = 0.5 * scale if shifted and name in SHIFTED_NUMERIC else 0.0
        cols[name] = rng.normal(10.0 * i, scale, rows) + shift
    base = np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    moved = np.r_[0.3, np.full(len(CATEGORIES) - 1, 0.7 / (len(CATEGORIES) - 1))]
    for j in range(N_CATEGORICAL):
        name = f"cat_{j}"
        p = moved if shifted and name in SHIFTED_CATEGORICAL else base
        cols[name] = pl.Series(name, CATEGORIES[rng.choice(len(CATEGORIES), rows, p=p)])
    cols["prediction"] = np.clip(rng.beta(2, 8, rows) + (0.1 if shifted else 0.0), 0.0, 1.0)
    return pl.DataFrame(cols)


def bench_drift(rows: int = 1_000_000, repeats: int = 3) -> dict:
    """Seconds per compute_drift call on rows x 30 columns per side (median of repeats)."""
    t = time.perf_counter()
    reference, current = _day(rows, seed=1, shifted=False), _day(rows, seed=2, shifted=True)
    gen_s = time.perf_counter() - t
    numeric = [f"num_{i:02d}" for i in range(N_NUMERIC)]
    categorical = [f"cat_{j}" for j in range(N_CATEGORICAL)]

    def once() -> tuple[float, object]:
        t = time.perf_counter()
        result = compute_drift(
            reference,
            current,
            numeric=numeric,
            categorical=categorical,
            prediction_column="prediction",
        )
        return time.perf_counter() - t, result

    already_imported = "evidently" in sys.modules
    first_s, result = once()
    times = [once()[0] for _ in range(repeats)]
    median = statistics.median(times)
    summary = result.summary()
    found = set(summary["drifted_columns"])
    expected = set(SHIFTED_NUMERIC) | set(SHIFTED_CATEGORICAL)
    print(
        f"drift: {rows:,} rows x {len(numeric) + len(categorical)} columns per side "
        f"(+ prediction), generated in {gen_s:.1f} s"
    )
    print(
        f"  compute_drift, median of {repeats}: {median:6.2f} s (goal <= {GOAL_DRIFT_S:.0f} s)"
        f"  runs: {', '.join(f'{x:.2f}' for x in times)}"
    )
    print(
        f"  first call in a fresh process:  {first_s:6.2f} s "
        f"({'evidently already imported' if already_imported else 'includes the evidently import'})"
    )
    print(
        f"  sampled {summary['reference_rows']:,} + {summary['current_rows']:,} rows, HTML on "
        f"{summary['html_reference_rows']:,} + {summary['html_current_rows']:,}, "
        f"{len(result.html) / 1e6:.1f} MB; drift share {summary['drift_share']:.3f}, "
        f"drifted {sorted(found)}, prediction drifted: {summary['prediction']['drifted']}"
    )
    if found != expected:
        print(f"  WARNING: expected drifted columns {sorted(expected)}")
    return {
        "rows_per_side": rows,
        "numeric_columns": len(numeric),
        "categorical_columns": len(categorical),
        "prediction_column": True,
        "repeats": repeats,
        "seconds": times,
        "median_seconds": median,
        "first_call_seconds": first_s,
        "first_call_includes_import": not already_imported,
        "goal_seconds": GOAL_DRIFT_S,
        "meets_goal": median <= GOAL_DRIFT_S,
        "sample_rows": summary["reference_rows"],
        "html_rows": summary["html_reference_rows"],
        "html_bytes": len(result.html),
        "drift_share": summary["drift_share"],
        "drifted_columns": summary["drifted_columns"],
        "expected_drifted_columns": sorted(expected),
        "prediction_drifted": summary["prediction"]["drifted"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "monitor.json"))
    args = ap.parse_args()

    results = {"drift": bench_drift(rows=args.rows, repeats=args.repeats)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "monitor",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **results,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
