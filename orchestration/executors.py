"""How steps execute, and a partition backfill that runs through the code location's executor.

MLOPS_EXECUTOR picks the step executor of every job in the code location:
- unset or `in_process` (the default profile): every step of a run in turn inside the run
  worker, which imports the code location once. Measured by bench/startup.py (b): a daily data
  run through the daemon took 4.2 s in process, 20.4 s with a fresh interpreter per step and
  9.2 s with forkserver. The jobs are chains of short steps with nothing to run in parallel
  inside a run; parallelism comes from runs in flight (the instance's run queue limits). The
  training job gains nothing from a process per step either (its four steps run one after the
  other, and the run worker's memory goes when the run ends);
- `multiprocess`: Dagster's multiprocess executor (each step in a child process of the run, a
  fresh interpreter; MLOPS_MULTIPROCESS_START_METHOD=forkserver forks the steps from a server
  process that imported the code location once per run);
- `celery`: dagster-celery. Each step is a task on the broker (MLOPS_CELERY_BROKER, default
  redis://127.0.0.1:6379/1), run by `dagster-celery worker` processes on any machine that has
  this code and the same MLOPS_* settings; step results come back through
  MLOPS_CELERY_BACKEND (default redis://127.0.0.1:6379/2). MLOPS_CELERY_KEY_PREFIX, when set,
  namespaces every broker key, so several deployments (or test runs) can share one Redis;
  workers must be started with the same prefix (deploy/celery.yaml, `config_source`).
  MLOPS_CELERY_POLL_SECONDS (default 0.2) is how often a run checks its steps' results.

`python -m orchestration.executors backfill ...` materializes a partitioned job over a range of
days against the instance in $DAGSTER_HOME, several runs at once, with whatever executor the
code location has (celery in the production profile). Runs go in dependency waves, as a Dagster
asset backfill would order them: first every day's assets that read only their own day, then
the assets that read earlier days (features read their lookback of validated rows), so no step
reads a partition another run has not written yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import dagster as dg

from orchestration.jobs import QUIET

EXECUTOR_ENV = "MLOPS_EXECUTOR"
DEFAULT_BROKER = "redis://127.0.0.1:6379/1"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/2"
TAG_BACKFILL = "mlops/backfill"
# Broker retries as dagster-celery's defaults (a config_source entry replaces the whole dict).
_TRANSPORT = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def celery_settings() -> dict:
    """The celery executor's config from the environment (the workers read the same values
    through deploy/celery.yaml)."""
    transport = dict(_TRANSPORT)
    prefix = os.environ.get("MLOPS_CELERY_KEY_PREFIX", "")
    if prefix:
        transport["global_keyprefix"] = prefix
    return {
        "broker": os.environ.get("MLOPS_CELERY_BROKER", DEFAULT_BROKER),
        "backend": os.environ.get("MLOPS_CELERY_BACKEND", DEFAULT_BACKEND),
        "config_source": {"broker_transport_options": transport},
    }


def step_executor() -> dg.ExecutorDefinition | None:
    """The executor for every job, from MLOPS_EXECUTOR (see the module docstring).

    - unset or `in_process`: `dg.in_process_executor`;
    - `multiprocess`: Dagster's multiprocess executor (None: Dagster's default), or its
      forkserver variant when MLOPS_MULTIPROCESS_START_METHOD=forkserver;
    - `celery`: dagster-celery.
    """
    kind = os.environ.get(EXECUTOR_ENV, "").strip().lower()
    start = os.environ.get("MLOPS_MULTIPROCESS_START_METHOD", "").strip().lower()
    if kind in ("", "in_process"):
        return dg.in_process_executor
    if kind == "multiprocess" and start in ("", "spawn"):
        return None
    if kind == "multiprocess":
        if start != "forkserver":
            raise ValueError(
                f"MLOPS_MULTIPROCESS_START_METHOD={start!r}: use `spawn` (the default) or "
                "`forkserver` (steps fork from a process that imported the code once per run)"
            )
        # Preload the code location itself: Dagster preloads only its own executor module
        # for a job reconstructed from a repository.
        preload = {"preload_modules": ["orchestration.definitions"]}
        return dg.multiprocess_executor.configured(
            {"start_method": {"forkserver": preload}}, name="multiprocess"
        )
    if kind == "celery":
        from dagster_celery import celery_executor

        _poll_faster()
        # dagster-celery re-declares its task for every step; celery 5.7 warns each time.
        warnings.filterwarnings("ignore", message=r"Task name '\w+' is already registered")
        return celery_executor.configured(celery_settings(), name="celery")
    raise ValueError(
        f"{EXECUTOR_ENV}={kind!r} is not an executor this platform knows: use `multiprocess` "
        "(the default), `in_process` (every step in the run's own process) or `celery` (with "
        "MLOPS_CELERY_BROKER pointing at the broker)"
    )


def _poll_faster() -> None:
    """The run process checks its steps' results every MLOPS_CELERY_POLL_SECONDS (default
    0.2) instead of dagster-celery's fixed second: a daily run is a chain of 5 short steps,
    and waiting a whole second after each one made runs 3x longer than their steps. A poll
    is one Redis GET per step in flight."""
    import dagster_celery.core_execution_loop as loop

    raw = os.environ.get("MLOPS_CELERY_POLL_SECONDS", "0.2")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 10:
        raise ValueError(f"MLOPS_CELERY_POLL_SECONDS={raw!r}: give seconds, between 0 and 10")
    loop.TICK_SECONDS = seconds


def recon_job(job_name: str):
    """The job as every process reloads it: orchestration.definitions:defs, job by name (the
    run process and each celery worker import the module with their own MLOPS_* settings)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from mlops.config import PROJECT_ROOT

    repo = ReconstructableRepository.for_module(
        "orchestration.definitions", "defs", working_directory=str(PROJECT_ROOT)
    )
    return repo.get_reconstructable_job(job_name)


@dataclass
class RunOutcome:
    partition: str
    run_id: str
    success: bool
    seconds: float
    wave: int = 0
    errors: list[str] = field(default_factory=list)


def run_partition(
    instance: dg.DagsterInstance,
    job_name: str,
    partition: str,
    assets: Sequence[dg.AssetKey] | None = None,
    tags: dict[str, str] | None = None,
) -> RunOutcome:
    """One run of a partitioned job (a subset of its assets, when given), through the job's
    executor, recorded in `instance`."""
    t = time.perf_counter()
    with dg.execute_job(
        recon_job(job_name),
        instance,
        run_config=QUIET,
        tags={"dagster/partition": partition, **(tags or {})},
        asset_selection=list(assets) if assets else None,
        raise_on_error=False,
    ) as result:
        errors = [
            e.event_specific_data.error.message.strip().splitlines()[-1]
            for e in result.all_events
            if e.is_failure
            and e.event_specific_data
            and getattr(e.event_specific_data, "error", None)
        ]
        return RunOutcome(
            partition, result.run_id, result.success, time.perf_counter() - t, errors=errors
        )


def dependency_waves(defs: dg.Definitions, job_name: str) -> list[list[dg.AssetKey]]:
    """The job's assets in waves: an asset that reads other partitions of an asset in the job
    (a lookback) goes one wave after it; same-partition dependencies share a run."""
    from dagster._core.definitions.partitions.mapping import IdentityPartitionMapping

    job = defs.resolve_job_def(job_name)
    graph = defs.resolve_asset_graph()
    keys = set(job.asset_layer.executable_asset_keys)
    wave: dict[dg.AssetKey, int] = {}

    def level(key: dg.AssetKey) -> int:
        if key not in wave:
            w = 0
            for parent in graph.get(key).parent_keys & keys:
                mapping = graph.get_partition_mapping(key, parent)
                same_day = isinstance(mapping, IdentityPartitionMapping) or (
                    isinstance(mapping, dg.TimeWindowPartitionMapping)
                    and mapping.start_offset == 0
                    and mapping.end_offset == 0
                )
                w = max(w, level(parent) + (0 if same_day else 1))
            wave[key] = w
        return wave[key]

    for k in keys:
        level(k)
    return [
        sorted((k for k in keys if wave[k] == n), key=lambda k: k.to_user_string())
        for n in range(max(wave.values(), default=-1) + 1)
    ]


_INSTANCE: dg.DagsterInstance | None = None  # one per backfill process, opened on first use


def _run_in_child(args: tuple) -> RunOutcome:
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = dg.DagsterInstance.get()
    return run_partition(_INSTANCE, *args)


def backfill(
    defs: dg.Definitions,
    job_name: str,
    partitions: Sequence[str],
    concurrency: int = 4,
    tags: dict[str, str] | None = None,
    waves: bool = True,
) -> list[RunOutcome]:
    """Every partition, wave after wave, `concurrency` runs at a time, against the instance
    in $DAGSTER_HOME; a partition whose run failed in a wave is left out of the later waves.
    `waves=False`: one run of the whole job per partition, started in the given order (the
    days a partition reads must exist already, or concurrency must be 1).

    Each run is orchestrated by its own process (forked from this one, so the code location
    is imported once): Dagster's run setup reconfigures Python logging, which is not safe
    for two runs in threads of one process.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    selections = dependency_waves(defs, job_name) if waves else [[]]
    tags = {TAG_BACKFILL: uuid.uuid4().hex[:8], **(tags or {})}
    outcomes: list[RunOutcome] = []
    todo = list(partitions)
    # The instance's tables and pools exist before several processes would race to create
    # them; the run processes fork once that instance is closed (no connection is shared). Not a
    # multiprocessing.Pool: its daemonic processes could not start the multiprocess
    # executor's step processes.
    from mlops.config import specs_dir
    from mlops.spec import find_specs
    from orchestration.pools import initialize_pools

    with dg.DagsterInstance.get() as instance:
        initialize_pools(instance, find_specs(specs_dir()))
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=concurrency, mp_context=fork) as pool:
        for n, assets in enumerate(selections):
            selection = None if len(selections) == 1 else assets
            done = list(pool.map(_run_in_child, [(job_name, p, selection, tags) for p in todo]))
            for o in done:
                o.wave = n
            outcomes += done
            todo = [o.partition for o in done if o.success]
    return outcomes


def days(first: str, last: str) -> list[str]:
    a, b = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    return [(a + dt.timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.executors",
        description="Backfill a partitioned job over a range of days through the code "
        "location's executor (MLOPS_EXECUTOR), against the instance in $DAGSTER_HOME.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backfill", help="materialize a job over days, in dependency waves")
    b.add_argument("--job", required=True, help="e.g. machine_failure_data_job")
    b.add_argument("--from", dest="first", default="", help="first day, YYYY-MM-DD")
    b.add_argument("--to", dest="last", default="", help="last day, YYYY-MM-DD (included)")
    b.add_argument("--partition", action="append", default=[], help="instead of a range")
    b.add_argument("--concurrency", type=int, default=4, help="runs in flight at once")
    b.add_argument(
        "--no-waves",
        action="store_true",
        help="one run of the whole job per partition (no dependency waves)",
    )
    b.add_argument("--out", default="", help="write the outcomes as JSON here")
    args = p.parse_args(argv)

    from orchestration.definitions import defs

    if not args.partition and not (args.first and args.last):
        p.error("give --from and --to, or one --partition per day")
    parts = args.partition or days(args.first, args.last)
    try:
        defs.resolve_job_def(args.job)
    except Exception:
        names = sorted(j.name for j in defs.get_repository_def().get_all_jobs())
        print(f"no job named {args.job}; jobs: {', '.join(names)}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    outcomes = backfill(defs, args.job, parts, args.concurrency, waves=not args.no_waves)
    seconds = time.perf_counter() - t
    failed = [o for o in outcomes if not o.success]
    summary = {
        "job": args.job,
        "executor": os.environ.get(EXECUTOR_ENV) or "in_process",
        "partitions": len(parts),
        "runs": len(outcomes),
        "failed": len(failed),
        "seconds": round(seconds, 2),
        "partitions_per_s": round(len(parts) / seconds, 3),
        "outcomes": [asdict(o) for o in outcomes],
    }
    if args.out:
        from mlops.lake import put_file

        put_file(args.out, json.dumps(summary, indent=2))
    print(
        f"{len(parts)} partition(s) of {args.job}: {len(outcomes)} runs, {len(failed)} failed, "
        f"{seconds:.1f} s ({summary['partitions_per_s']} partitions/s, {summary['executor']})"
    )
    for o in failed[:5]:
        print(f"  {o.partition} (wave {o.wave}) failed: {'; '.join(o.errors)[:300]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
