"""Ingest benchmark: rows/s through raw -> validated -> features, and history independence.

1. Throughput: 30 days x 200 machines through the real Dagster job (one run per day, the
   raw_data, validated_data/quarantine and features assets with their checks), and the same
   work through the mlops/ functions alone (no orchestration overhead).
2. History independence: the cost of one new day with 90 days of history divided by one new
   day with 7 days of history (goal <= 1.2). Two lakes are built, then the two new days are
   timed alternately, round after round, so machine noise hits both alike.

    .venv/bin/python bench/ingest.py [--machines 200] [--rounds 7] [--out bench/results/ingest.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import features_day, project, validated_day  # noqa: E402
from mlops.generate import generate  # noqa: E402
from mlops.lake import Lake  # noqa: E402
from mlops.spec import load_spec  # noqa: E402
from orchestration.definitions import build_definitions  # noqa: E402

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
ASSETS = ("raw_data", "validated_data", "quarantine", "features")


class Runner:
    def __init__(self, root: Path, lake_dir: Path):
        spec_path = root / "specs" / "machine_failure.yaml"
        self.spec = load_spec(spec_path)
        self.lake = Lake(str(lake_dir))
        defs = build_definitions(root / "specs", str(lake_dir))
        self.job = defs.resolve_job_def("machine_failure_data_job")
        self.selection = [dg.AssetKey(["machine_failure", a]) for a in ASSETS]
        self.instance = dg.DagsterInstance.ephemeral()

    def run(self, day: dt.date) -> float:
        t = time.perf_counter()
        result = self.job.execute_in_process(
            partition_key=day.isoformat(),
            instance=self.instance,
            run_config=QUIET,
            asset_selection=self.selection,
        )
        assert result.success
        return time.perf_counter() - t

    def compute_only(self, day: dt.date) -> float:
        """The same work as one run, without Dagster: read, validate, write, features."""
        t = time.perf_counter()
        validated_day(self.spec, self.lake, day, with_raw=True)
        features_day(self.spec, self.lake, day)
        return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--machines", type=int, default=200)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--history", type=int, default=90)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as tmp:
        root = Path(tmp)
        spec_path = project(root)
        spec = load_spec(spec_path)
        t = time.perf_counter()
        report = generate(
            spec, days=args.history + 1, machines=args.machines, seed=11, bad_rows=0.01
        )
        gen_s = time.perf_counter() - t
        days = [spec.source.start_date + dt.timedelta(days=i) for i in range(args.history + 1)]
        rows_per_day = report.rows / len(days)

        # 1. Throughput over the first `days` days, through Dagster and without it.
        big = Runner(root, root / "lake_history")
        t = time.perf_counter()
        for day in days[: args.days]:
            big.run(day)
        dagster_s = time.perf_counter() - t
        bare = Runner(root, root / "lake_bare")
        t = time.perf_counter()
        for day in days[: args.days]:
            bare.compute_only(day)
        bare_s = time.perf_counter() - t
        rows = rows_per_day * args.days
        print(
            f"generated {report.rows} rows ({len(days)} days x {args.machines} machines) "
            f"in {gen_s:.1f} s ({report.rows / gen_s:,.0f} rows/s)"
        )
        print(f"throughput, {args.days} days x {args.machines} machines = {rows:,.0f} rows:")
        print(f"  dagster runs (1 per day): {dagster_s:6.1f} s  {rows / dagster_s:10,.0f} rows/s")
        print(f"  mlops functions only:     {bare_s:6.1f} s  {rows / bare_s:10,.0f} rows/s")

        # 2. History independence: lake A holds 7 days, lake B the full history.
        for day in days[args.days : args.history]:
            big.run(day)
        small = Runner(root, root / "lake_week")
        for day in days[:7]:
            small.run(day)
        new_small, new_big = days[7], days[args.history]
        times: dict[str, list[float]] = {
            "week_run": [],
            "history_run": [],
            "week_compute": [],
            "history_compute": [],
        }
        for _ in range(args.rounds):
            times["week_run"].append(small.run(new_small))
            times["history_run"].append(big.run(new_big))
            times["week_compute"].append(small.compute_only(new_small))
            times["history_compute"].append(big.compute_only(new_big))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio_run = med["history_run"] / med["week_run"]
        ratio_compute = med["history_compute"] / med["week_compute"]
        print(f"one new day ({rows_per_day:,.0f} rows), median of {args.rounds} alternated rounds:")
        print(
            f"  dagster run: {args.history} days of history {med['history_run']:.3f} s, "
            f"7 days {med['week_run']:.3f} s, ratio {ratio_run:.2f} (goal <= 1.2)"
        )
        print(
            f"  compute:     {args.history} days of history {med['history_compute']:.3f} s, "
            f"7 days {med['week_compute']:.3f} s, ratio {ratio_compute:.2f} (goal <= 1.2)"
        )

    result = {
        "benchmark": "ingest",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machines": args.machines,
        "days": args.days,
        "rows": rows,
        "generate_rows_per_s": report.rows / gen_s,
        "dagster_rows_per_s": rows / dagster_s,
        "compute_rows_per_s": rows / bare_s,
        "new_day_seconds_median": med,
        "history_ratio_run": ratio_run,
        "history_ratio_compute": ratio_compute,
        "goal_history_ratio": 1.2,
        "rounds": args.rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
