"""Exporter benchmark: what one Prometheus scrape of `mlops exporter` costs (issue 18).

The state is the embedded example's, made the way the demo makes it: `mlops generate` (the
embedded spec, --days days, --machines machines) and `mlops backtest` (--build-days built at
once, then one day at a time through the real sensors, jobs and gates), in a temporary
folder. The backtest's state folder then holds what the exporter reads in production: the
default profile's SQLite Dagster instance (training and scoring runs with their trigger tags),
the SQLite MLflow registry, the lake (partitions, JSON summaries, deployment history).

Timed: a real `mlops exporter` subprocess on a free loopback port, GET /metrics over HTTP,
--scrapes times after one untimed scrape (the first warms the OS file cache), and the
collector's own time (`mlops_exporter_collect_duration_seconds`). Goal: median scrape under
200 ms.

    .venv/bin/python bench/exporter.py [--days 12] [--machines 8] [--build-days 6]
        [--scrapes 30] [--state DIR]   # --state: reuse a backtest state folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, project
from deploy import processes
from deploy.services import free_port

RESULTS = REPO / "bench" / "results"
MLOPS = str(Path(sys.executable).parent / "mlops")
GOAL_S = 0.2


def build_state(work: Path, days: int, machines: int, build_days: int) -> Path:
    spec = project(work)
    env = {**os.environ, "MLOPS_SPECS_DIR": str(work / "specs")}
    subprocess.run(
        [
            MLOPS,
            "generate",
            "--spec",
            str(spec),
            "--days",
            str(days),
            *("--machines", str(machines)),
            *("--seed", "0"),
        ],
        check=True,
        env=env,
        cwd=work,
    )
    state = work / "state"
    subprocess.run(
        [
            MLOPS,
            "backtest",
            "--spec",
            str(spec),
            "--build-days",
            str(build_days),
            *("--trials", "1"),
            *("--state", str(state)),
        ],
        check=True,
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
    )
    return state


def state_env(state: Path) -> dict[str, str]:
    from orchestration.backtest import isolated_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")}
    return env | isolated_env(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=12)
    ap.add_argument("--machines", type=int, default=8)
    ap.add_argument("--build-days", type=int, default=6)
    ap.add_argument("--scrapes", type=int, default=30)
    ap.add_argument("--state", type=Path, default=None, help="an existing backtest state")
    ap.add_argument("--out", default=str(RESULTS / "exporter.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-exporter-"))
    print(f"work folder {work}")
    t0 = time.perf_counter()
    state = args.state or build_state(work, args.days, args.machines, args.build_days)
    build_s = time.perf_counter() - t0
    port = free_port()
    log = work / "exporter.log"
    proc = processes.start(
        [MLOPS, "exporter", "--port", str(port)], log, state_env(state), cwd=work
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        processes.wait_until(lambda: processes.http_ok(url), "the exporter", log, 60, proc=proc)
        first = httpx.get(url, timeout=30).text
        walls, collects = [], []
        for _ in range(args.scrapes):
            t = time.perf_counter()
            text = httpx.get(url, timeout=30).text
            walls.append(time.perf_counter() - t)
            line = next(
                ln for ln in text.splitlines()
                if ln.startswith("mlops_exporter_collect_duration_seconds ")
            )  # fmt: skip
            collects.append(float(line.split()[1]))
    finally:
        processes.stop(proc)
    series = [ln for ln in first.splitlines() if ln.startswith("mlops_") and "{" in ln]
    median = statistics.median(walls)
    result = {
        "bench": "exporter",
        "state": {"days": args.days, "machines": args.machines, "build_days": args.build_days,
                  "built_s": round(build_s, 1), "reused": args.state is not None},
        "scrapes": args.scrapes,
        "series": len(series),
        "bytes": len(first),
        "scrape_median_s": round(median, 4),
        "scrape_p95_s": round(sorted(walls)[int(0.95 * (len(walls) - 1))], 4),
        "scrape_max_s": round(max(walls), 4),
        "collect_median_s": round(statistics.median(collects), 4),
        "goal_s": GOAL_S,
        "meets_goal": median < GOAL_S,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }  # fmt: skip
    print(f"state built in {build_s:.1f} s ({args.days} days, {args.machines} machines)")
    print(f"{len(series)} series, {len(first)} bytes per scrape")
    print(
        f"scrape over HTTP: median {median * 1000:.1f} ms, p95 {result['scrape_p95_s'] * 1000:.1f}"
        f" ms, max {result['scrape_max_s'] * 1000:.1f} ms; collector median "
        f"{result['collect_median_s'] * 1000:.1f} ms (goal < {GOAL_S * 1000:.0f} ms: "
        f"{'met' if result['meets_goal'] else 'MISSED'})"
    )
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
