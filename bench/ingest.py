"""Ingest benchmark: rows/s through raw -> validated -> features, and history independence.

1. Throughput: 30 days x 200 machines through the real Dagster job (one run per day, the
   raw_data, validated_data/quarantine and features assets with their checks), and the same
   work through the mlops/ functions alone (no orchestration overhead).
2. History independence: the cost of one new day with 90 days of history divided by one new
   day with 7 days of history (goal <= 1.2). Two lakes are built, then the two new days are
   timed alternately, round after round, so machine noise hits both alike.
3. Memory (--memory, run alone): one large CSV day (--size-mb, default 200, in --files
   files) through the real raw_data and validate assets in a fresh subprocess; its peak RSS
   against the day's size, raw and net of the interpreter's RSS with the same imports
   (goal: peak <= 4x the day's size). A second subprocess does the same steps through the
   mlops/ functions and records the peak after each step, to show which step sets it.

    .venv/bin/python bench/ingest.py [--machines 200] [--rounds 7] [--out bench/results/ingest.json]
    .venv/bin/python bench/ingest.py --memory [--size-mb 200] [--files 1] [--out bench/results/ingest_memory.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import features_day, project, validated_day  # noqa: E402
from demo.generate import generate  # noqa: E402
from mlops.lake import Lake  # noqa: E402
from mlops.spec import Spec, load_spec  # noqa: E402
from orchestration.definitions import build_definitions  # noqa: E402
from orchestration.jobs import QUIET  # noqa: E402

ASSETS = ("raw_data", "validated_data", "quarantine", "features")
MEMORY_ASSETS = ("raw_data", "validated_data", "quarantine")
MEMORY_GOAL = 4.0  # peak RSS / the day's bytes
MB = 1024 * 1024


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


def write_large_day(spec: Spec, day: dt.date, size_bytes: int, files: int) -> list[Path]:
    """`files` CSV landing files for `day` of about `size_bytes` in all, in the spec's
    columns; one row in 100 has an unparseable temperature, so quarantine has work."""
    import numpy as np
    import polars as pl

    folder = spec.landing_dir
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    machines, chunk = 100_000, 50_000
    start = dt.datetime.combine(day, dt.time())
    written: list[Path] = []
    row = 0
    for k in range(files):
        path = folder / spec.source.file_pattern.replace("*", str(k)).replace(
            "{date}", day.isoformat()
        )
        with path.open("wb") as f:
            first = True
            while f.tell() < size_bytes // files:
                i = np.arange(row, row + chunk)
                row += chunk
                temp = np.round(rng.normal(60, 10, chunk), 3).astype(str)
                temp[i % 100 == 0] = "n/a"
                frame = pl.DataFrame(
                    {
                        "timestamp": (np.datetime64(start, "s") + (i // machines)).astype(
                            "datetime64[ms]"
                        ),
                        "machine_id": pl.Series(i % machines).cast(pl.String).str.zfill(6),
                        "machine_type": np.array(["A", "B", "C"])[i % 3],
                        "firmware": np.array(["1.0", "1.1", "2.0"])[i % 3],
                        "temperature": temp,
                        "vibration": np.round(rng.uniform(0, 50, chunk), 3),
                        "pressure": np.round(rng.uniform(0, 300, chunk), 3),
                        "rpm": np.round(rng.uniform(0, 6000, chunk), 1),
                        "voltage": np.round(rng.uniform(100, 300, chunk), 2),
                    }
                ).with_columns(
                    pl.col("timestamp").dt.to_string("%Y-%m-%dT%H:%M:%S"),
                    ("M" + pl.col("machine_id")).alias("machine_id"),
                )
                frame.write_csv(f, include_header=first)
                first = False
        written.append(path)
    return written


def _memory_child(mode: str, root: Path, day: dt.date) -> dict:
    """Runs in a fresh interpreter: the peak RSS of `mode` (bytes; per step for 'steps')."""

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    runner = Runner(root, root / f"lake_{mode}")
    out: dict = {}
    if mode == "assets":
        runner.job.execute_in_process(
            partition_key=day.isoformat(),
            instance=runner.instance,
            run_config=QUIET,
            asset_selection=[dg.AssetKey(["machine_failure", a]) for a in MEMORY_ASSETS],
        )
    elif mode == "steps":
        from mlops import ingest, validation

        spec, lake, key = runner.spec, runner.lake, day.isoformat()
        steps: dict[str, int] = {"imports": peak()}
        frame = ingest.load_day(spec.source, spec.landing_dir, day).frame
        steps["load_day"] = peak()
        lake.write(spec.name, "raw_data", frame, key)
        steps["write raw_data"] = peak()
        del frame
        # As the validate asset does: the raw partition read a column at a time.
        raw = validation.RawColumns(
            lake.columns(spec.name, "raw_data", key),
            lambda c: lake.read(spec.name, "raw_data", key, [c])[c],
        )
        result = validation.validate(spec, raw, day)
        steps["validate (raw by column)"] = peak()
        lake.write(spec.name, "validated_data", result.valid, key)
        lake.write(spec.name, "quarantine", result.quarantine, key)
        steps["write validated_data, quarantine"] = peak()
        out["steps"] = steps
    out["peak_rss"] = peak()
    return out


def _run_child(mode: str, root: Path, day: dt.date) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--day", str(day)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} subprocess failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(size_mb: float, files: int, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mlops-bench-mem-") as tmp:
        root = Path(tmp)
        spec_path = project(root)
        if files > 1:  # the embedded spec's pattern names one file per day
            text = spec_path.read_text().replace(
                '"readings_{date}.csv"', '"part*_readings_{date}.csv"'
            )
            spec_path.write_text(text)
        spec = load_spec(spec_path)
        day = spec.source.start_date
        t = time.perf_counter()
        paths = write_large_day(spec, day, int(size_mb * MB), files)
        size = sum(p.stat().st_size for p in paths)
        print(
            f"wrote {len(paths)} file(s), {size / MB:,.0f} MiB in {time.perf_counter() - t:.0f} s"
        )
        base = _run_child("baseline", root, day)["peak_rss"]
        t = time.perf_counter()
        run = _run_child("assets", root, day)["peak_rss"]
        run_s = time.perf_counter() - t
        steps = _run_child("steps", root, day)["steps"]
    ratio, net = run / size, (run - base) / size
    print(f"interpreter with the imports: {base / MB:,.0f} MiB RSS")
    print(
        f"raw_data + validate ({run_s:.0f} s): peak {run / MB:,.0f} MiB = {ratio:.2f}x the "
        f"day's {size / MB:,.0f} MiB; net of the interpreter {net:.2f}x (goal <= {MEMORY_GOAL}x)"
    )
    print("peak RSS after each step (mlops functions, another fresh process):")
    for name, rss in steps.items():
        print(f"  {name:34s} {rss / MB:8,.0f} MiB  {(rss - base) / size:5.2f}x net")
    result = {
        "benchmark": "ingest_memory",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": files,
        "file_bytes": size,
        "baseline_rss_bytes": base,
        "peak_rss_bytes": run,
        "ratio": ratio,
        "ratio_net_of_baseline": net,
        "goal_ratio": MEMORY_GOAL,
        "seconds": run_s,
        "steps_peak_rss_bytes": steps,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--memory", action="store_true", help="run the memory benchmark alone")
    ap.add_argument("--size-mb", type=float, default=200, help="--memory: the day's MiB")
    ap.add_argument("--files", type=int, default=1, help="--memory: files the day is split in")
    ap.add_argument("--child", choices=("baseline", "assets", "steps"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--day", help=argparse.SUPPRESS)
    ap.add_argument("--machines", type=int, default=200)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--history", type=int, default=90)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="default: bench/results/ingest.json (ingest_memory.json)")
    args = ap.parse_args()
    if args.child:
        doc = _memory_child(args.child, Path(args.root), dt.date.fromisoformat(args.day))
        print(json.dumps(doc))
        return 0
    results = REPO / "bench" / "results"
    if args.memory:
        memory(args.size_mb, args.files, Path(args.out or results / "ingest_memory.json"))
        return 0
    args.out = args.out or str(results / "ingest.json")

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
