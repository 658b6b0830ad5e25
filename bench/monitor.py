"""Monitoring benchmark: how long the drift computation takes on one large day.

1. drift: mlops.drift.compute_drift on a current day of 1,000,000 rows x 30 feature columns
   (25 numeric, 5 categorical, plus the model's score as the prediction column) against a
   reference of the same size, with a shift in 5 numeric columns, 1 categorical column and
   the prediction. Timed end to end, Evidently HTML included, with the spec's defaults
   (20,000 sampled rows per side, wasserstein / Jensen-Shannon). The first call of a fresh
   process also pays evidently's import and plotly's first-use set-up; it is reported apart
   from the median of the repeats that follow. Goal: <= 10 s.

2. sensor tick: the new-data sensor over a landing folder of 10,000 files (one per day):
   the first tick (every file new: hashed, up to 500 run requests, the rest next tick),
   a steady tick (nothing changed: one directory scan, no file read), and a tick with one
   new file. Goal: one tick over 10,000 files within 5 s.

3. closed loop: `make demo`'s loop in a throwaway project (60 days, drift from day 36):
   from the drift onset to a new champion, in partitions and in seconds of replay, and the
   whole demo's time. --skip-loop leaves it out (it takes minutes).

    .venv/bin/python bench/monitor.py [--rows 1000000] [--repeats 3] [--skip-loop]
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


def bench_sensor_tick(files: int = 10_000) -> dict:
    import os
    import tempfile

    import dagster as dg

    from bench.common import project
    from orchestration.definitions import build_definitions
    from resources.lake import LakeResource

    root = Path(tempfile.mkdtemp(prefix="bench-sensor-"))
    spec_path = project(root)
    start = dt.date(1990, 1, 1)
    text = spec_path.read_text().replace("start_date: 2026-01-01", f"start_date: {start}")
    spec_path.write_text(text)
    landing = root / ".mlops" / "landing" / "machine_failure" / "readings"
    landing.mkdir(parents=True)
    header = (
        "timestamp,machine_id,machine_type,firmware,temperature,vibration,pressure,rpm,voltage\n"
    )
    for i in range(files):
        d = start + dt.timedelta(days=i)
        (landing / f"readings_{d}.csv").write_text(
            header + f"{d}T00:00:00,m{i % 7},A,1.0,70.0,3.0,100.0,1500.0,230.0\n"
        )
    defs = build_definitions(root / "specs", str(root / ".mlops" / "lake"))
    sensor = defs.get_repository_def().get_sensor_def(new_data_sensor_name_for(defs))
    home = root / "dagster"
    home.mkdir()
    instance = dg.DagsterInstance.local_temp(str(home))
    from resources.clock import ClockResource

    # Complete files: dated past the spec's settle_seconds, so the first tick reads them all.
    old = time.time() - 3600
    for f in landing.iterdir():
        os.utime(f, (old, old))
    resources = {
        "lake": LakeResource(base_url=str(root / ".mlops" / "lake")),
        "clock": ClockResource(),
    }

    def tick(cursor):
        ctx = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=resources, definitions=defs
        )
        t = time.perf_counter()
        data = sensor.evaluate_tick(ctx)
        return time.perf_counter() - t, len(data.run_requests or []), data.cursor or cursor

    first_s, first_runs, cursor = tick(None)
    backlog = []
    while True:  # drain the backlog the per-tick cap left
        s_, n, cursor = tick(cursor)
        if n == 0:
            break
        backlog.append((s_, n))
    steady_s, steady_runs, cursor = tick(cursor)
    d = start + dt.timedelta(days=files)
    new = landing / f"readings_{d}.csv"
    new.write_text(header + f"{d}T00:00:00,m0,A,1.0,70,3,100,1500,230\n")
    os.utime(new, (old, old))
    one_s, one_runs, cursor = tick(cursor)
    os.system(f"rm -rf {root}")
    out = {
        "files": files,
        "first_tick_s": round(first_s, 3),
        "first_tick_run_requests": first_runs,
        "backlog_ticks": len(backlog),
        "backlog_tick_max_s": round(max((b[0] for b in backlog), default=0.0), 3),
        "steady_tick_s": round(steady_s, 3),
        "steady_tick_run_requests": steady_runs,
        "one_new_file_tick_s": round(one_s, 3),
        "one_new_file_run_requests": one_runs,
        "cursor_bytes": len(cursor or ""),
        "goal_s": 5.0,
    }
    print(
        f"sensor tick over {files} files: first {first_s:.2f} s ({first_runs} runs requested, "
        f"{len(backlog)} more ticks for the backlog, at most {out['backlog_tick_max_s']:.2f} s), "
        f"steady {steady_s:.2f} s, one new file {one_s:.2f} s ({one_runs} run); "
        f"cursor {out['cursor_bytes'] / 1e3:.0f} kB"
    )
    return out


def new_data_sensor_name_for(defs) -> str:
    return next(
        s.name for s in defs.get_repository_def().sensor_defs if s.name.endswith("_new_data_sensor")
    )


def bench_loop() -> dict:
    import os
    import subprocess
    import tempfile

    from bench.common import project

    root = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    spec_path = project(root)
    home = root / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MLOPS_SPECS_DIR": str(root / "specs"),
        "MLOPS_LAKE_URL": str(root / ".mlops" / "lake"),
        "MLOPS_MLFLOW_TRACKING_URI": f"sqlite:///{root / '.mlops' / 'mlflow.db'}",
        "MLOPS_MLFLOW_ARTIFACT_ROOT": str(root / ".mlops" / "mlartifacts"),
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / '.mlops' / 'online.db'}",
    }
    (root / ".mlops").mkdir(exist_ok=True)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "demo", "--spec", str(spec_path)],
        env=env,
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    total = time.perf_counter() - t
    timeline = json.loads(
        (root / ".mlops" / "reports" / "machine_failure" / "timeline.json").read_text()
    )
    onset = 36
    before = next(r for r in timeline if r["n"] == onset - 1)
    first_retrain = next(
        (r for r in timeline if r["n"] >= onset and any("retrain" in e for e in r["events"])), None
    )
    promoted = next(
        (r for r in timeline if r["n"] >= onset and any("promoted" in e for e in r["events"])), None
    )
    early = [
        r["n"] for r in timeline if r["n"] < onset and any("retrain" in e for e in r["events"])
    ]
    out = {
        "demo_total_s": round(total, 1),
        "drift_onset_day": onset,
        "retrainings_before_onset": early,
        "first_retraining_day": first_retrain and first_retrain["n"],
        "new_champion_day": promoted and promoted["n"],
        "onset_to_new_champion_partitions": promoted and promoted["n"] - onset,
        "onset_to_new_champion_s": promoted
        and round(promoted["elapsed_s"] - before["elapsed_s"], 1),
        "champions": sorted({r["champion"] for r in timeline}),
    }
    os.system(f"rm -rf {root}")
    print(
        f"closed loop: demo {total:.0f} s; drift from day {onset}, first retraining day "
        f"{out['first_retraining_day']}, new champion day {out['new_champion_day']} "
        f"({out['onset_to_new_champion_partitions']} partitions, "
        f"{out['onset_to_new_champion_s']} s of replay); retrainings before the drift: {early}"
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "monitor.json"))
    ap.add_argument("--skip-loop", action="store_true", help="leave out the closed loop")
    args = ap.parse_args()

    results = {"drift": bench_drift(rows=args.rows, repeats=args.repeats)}
    results["sensor_tick"] = bench_sensor_tick()
    if not args.skip_loop:
        results["closed_loop"] = bench_loop()

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
