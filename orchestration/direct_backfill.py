"""A daemon-free backfill, for bench/scale.py and tests only: production backfills are Dagster
asset backfills run by the daemon (orchestration/backfills.py, `make prod-backfill`).

    python -m orchestration.direct_backfill --job JOB --from D --to D [--concurrency N]

Kept because two users need runs without the daemon in between: bench/scale.py measures the
executors' throughput (in process against celery) without the daemon's launch overhead and its
30 s backfill ticks, and tests/test_production.py races two runs of one day straight into the
executor (the run queue would hold the second back). It materializes a partitioned job over
days against the instance in $DAGSTER_HOME, several runs at once, with whatever executor the
code location has. Runs go in dependency waves, the order an asset backfill keeps: first every
day's assets that read only their own day, then the assets that read earlier days (features
read their lookback of validated rows), so no step reads a partition another run has not
written yet. Nothing shows in the UI as a Backfill; its runs carry the tag mlops/backfill.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import dagster as dg

from mlops.settings import settings
from orchestration.backfills import days
from orchestration.executors import recon_job
from orchestration.jobs import QUIET

TAG_BACKFILL = "mlops/backfill"


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
    job = defs.resolve_job_def(job_name)
    graph = defs.resolve_asset_graph()
    keys = set(job.asset_layer.executable_asset_keys)
    wave: dict[dg.AssetKey, int] = {}

    def level(key: dg.AssetKey) -> int:
        if key not in wave:
            w = 0
            for parent in graph.get(key).parent_keys & keys:
                mapping = graph.get_partition_mapping(key, parent)
                same_day = isinstance(mapping, dg.IdentityPartitionMapping) or (
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.direct_backfill",
        description="Daemon-free backfill (benchmarks, tests): a partitioned job over days in "
        "dependency waves, through the code location's executor (MLOPS_EXECUTOR), against the "
        "instance in $DAGSTER_HOME. Production backfills: python -m orchestration.backfills.",
    )
    p.add_argument("--job", required=True, help="e.g. machine_failure_data_job")
    p.add_argument("--from", dest="first", default="", help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="last", default="", help="last day, YYYY-MM-DD (included)")
    p.add_argument("--partition", action="append", default=[], help="instead of a range")
    p.add_argument("--concurrency", type=int, default=4, help="runs in flight at once")
    p.add_argument(
        "--no-waves",
        action="store_true",
        help="one run of the whole job per partition (no dependency waves)",
    )
    p.add_argument("--out", default="", help="write the outcomes as JSON here")
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
        "executor": settings().executor,
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
