"""Scale benchmark: backfill throughput of the data job, default profile versus production.

One run, the same generated days and the same daemon-free backfill for both sides
(`python -m orchestration.direct_backfill`: dependency waves, N runs in flight; no daemon, so
the figures are the executors' and the instances', not the daemon's launch overhead or its 30 s
backfill ticks; production backfills go through the daemon, orchestration/backfills.py):

- default: the default profile's in-process executor (every step inside its run's process),
  the instance on SQLite (a fresh DAGSTER_HOME); `--start-method spawn|forkserver` runs it
  on the multiprocess executor instead (a fresh interpreter per step, or forked from a
  process per run slot that imported the code location once);
- production: the dagster-celery executor with two worker processes on the Redis broker
  (one step at a time each), the instance in PostgreSQL (deploy/dagster.yaml, a fresh
  database, dropped afterwards).

Prints partitions/s for both and their ratio, checks that both lakes hold the same bytes,
and writes bench/results/scale.json. Needs PostgreSQL on 127.0.0.1:5432 (user root, trust)
and Redis on 127.0.0.1:6379.

    .venv/bin/python bench/scale.py [--days 60] [--machines 5] [--concurrency 4] [--workers 2]
                                    [--start-method in_process|spawn|forkserver]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import project  # noqa: E402
from demo.generate import generate  # noqa: E402
from deploy import processes, services  # noqa: E402
from mlops.lake import Lake  # noqa: E402
from mlops.spec import load_spec  # noqa: E402

BIN = Path(sys.executable).parent
JOB = "machine_failure_data_job"
ASSETS = ("raw_data", "validated_data", "quarantine", "labels", "features")
PG = services.PG


@contextlib.contextmanager
def celery_workers(root: Path, env: dict[str, str], n: int):
    """n `dagster-celery worker` processes (one step at a time each) on the profile's broker."""
    prefix = env["MLOPS_CELERY_KEY_PREFIX"]
    config = services.celery_config(root / "celery.yaml", prefix)
    procs, logs = [], {}
    try:
        for i in range(1, n + 1):
            name = f"bench-w{i}-{uuid.uuid4().hex[:4]}"
            logs[name] = root / f"{name}.log"
            procs.append(
                processes.start(services.celery_worker_args(config, name), logs[name], env)
            )
        for name, log in logs.items():
            processes.wait_until(lambda log=log: services.worker_ready(log), name, log)
        yield list(logs)
    finally:
        for p in procs:
            processes.stop(p, grace=30)
        services.forget_broker_keys(env["MLOPS_CELERY_BROKER"], prefix)


def backfill(env: dict[str, str], first: str, last: str, concurrency: int, out: Path) -> dict:
    args = [sys.executable, "-m", "orchestration.direct_backfill", "--job", JOB]
    args += ["--from", first, "--to", last, f"--concurrency={concurrency}", "--out", str(out)]
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout.strip())
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"backfill failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(out.read_text())
    runs = summary.pop("outcomes")
    summary["median_run_seconds"] = sorted(r["seconds"] for r in runs)[len(runs) // 2]
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--machines", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4, help="runs in flight, both sides")
    ap.add_argument("--workers", type=int, default=2, help="celery worker processes")
    ap.add_argument(
        "--start-method",
        choices=["in_process", "spawn", "forkserver"],
        default="in_process",
        help="the default profile's executor (in_process), or how a multiprocess executor "
        "starts its steps",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlops-scale-") as tmp:
        root = Path(tmp)
        spec = load_spec(project(root))
        report = generate(spec, days=args.days, machines=args.machines, seed=11, bad_rows=0.01)
        first = spec.source.start_date.isoformat()
        last = (spec.source.start_date + dt.timedelta(days=args.days - 1)).isoformat()
        base = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLOPS_SPECS_DIR": str(root / "specs"),
            "MLOPS_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "MLOPS_MLFLOW_ARTIFACT_ROOT": str(root / "mlartifacts"),
        }

        # 1. The production profile: celery workers on Redis, PostgreSQL instance.
        with services.scratch_database("mlops_bench") as db:
            home = root / "home_prod"
            home.mkdir()
            (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster.yaml").read_text())
            prod_env = {
                **base,
                "DAGSTER_HOME": str(home),
                "MLOPS_PG_HOST": PG["host"],
                "MLOPS_PG_PORT": str(PG["port"]),
                "MLOPS_PG_USER": PG["user"],
                "MLOPS_PG_PASSWORD": "",
                "MLOPS_PG_DB": db,
                "MLOPS_EXECUTOR": "celery",
                "MLOPS_CELERY_BROKER": "redis://127.0.0.1:6379/1",
                "MLOPS_CELERY_BACKEND": "redis://127.0.0.1:6379/2",
                "MLOPS_CELERY_KEY_PREFIX": f"mlops-bench-{uuid.uuid4().hex[:8]}:",
                "MLOPS_LAKE_URL": str(root / "lake_prod"),
                "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / 'online_prod.db'}",
            }
            with celery_workers(root, prod_env, args.workers) as names:
                print(f"production profile: {len(names)} celery workers ...")
                prod = backfill(prod_env, first, last, args.concurrency, root / "prod.json")

        # 2. The default profile: its executor (in process unless --start-method), SQLite.
        home = root / "home_default"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        default_env = {
            **base,
            "DAGSTER_HOME": str(home),
            "MLOPS_EXECUTOR": "in_process" if args.start_method == "in_process" else "multiprocess",
            "MLOPS_MULTIPROCESS_START_METHOD": ""
            if args.start_method == "in_process"
            else args.start_method,
            "MLOPS_LAKE_URL": str(root / "lake_default"),
            "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / 'online_default.db'}",
        }
        print(f"default profile ({args.start_method}): {args.days} days x {args.machines} machines")
        default = backfill(default_env, first, last, args.concurrency, root / "default.json")

        a, b = Lake(str(root / "lake_default")), Lake(str(root / "lake_prod"))
        days = [
            (spec.source.start_date + dt.timedelta(days=i)).isoformat() for i in range(args.days)
        ]
        differ = [
            f"{x}/{d}"
            for x in ASSETS
            for d in days
            if a.content_hash(spec.name, x, d) != b.content_hash(spec.name, x, d)
        ]
        ratio = prod["partitions_per_s"] / default["partitions_per_s"]
        print(
            f"\n{args.days} partitions ({report.rows} rows), {args.concurrency} runs in flight:\n"
            f"  default    ({args.start_method}, SQLite) {default['partitions_per_s']:.3f} "
            f"partitions/s ({default['seconds']:.0f} s)\n"
            f"  production (celery x{args.workers}, PostgreSQL)  {prod['partitions_per_s']:.3f} "
            f"partitions/s ({prod['seconds']:.0f} s)\n"
            f"  ratio production/default: {ratio:.2f}; lakes identical: {not differ}"
        )
        result = {
            "benchmark": "scale",
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "load_average_1m_at_end": os.getloadavg()[0],
            "days": args.days,
            "machines": args.machines,
            "rows": report.rows,
            "runs_in_flight": args.concurrency,
            "celery_workers": args.workers,
            "default_start_method": args.start_method,
            "default": default,
            "production": prod,
            "ratio_production_to_default": round(ratio, 3),
            "lakes_identical": not differ,
            "differing_partitions": differ[:20],
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
