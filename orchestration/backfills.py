"""Production backfills: Dagster asset backfills, launched the way the UI launches them.

    python -m orchestration.backfills --url http://127.0.0.1:3030 \\
        --job machine_failure_data_job --from 2026-01-01 --to 2026-02-19

`make prod-backfill` runs this (deploy/prod.py). It sends the webserver the UI's own GraphQL
mutation, `launchPartitionBackfill`, for the job's assets over the given days: a pure asset
backfill, recorded in the instance and shown in the UI (Overview > Backfills). The daemon's
backfill daemon then requests runs as partitions become ready: it honours the partition
mappings, so a day's features run once every day of their lookback (a TimeWindowPartitionMapping
over validated_data) is materialized, and the day-only assets of many days run at once. The
queued run coordinator launches those runs within deploy/dagster.yaml's limits and each run
sends its steps to the job's executor (celery in the production profile). The command waits
for the backfill to end (unless --no-wait) and prints each run's status and where its steps
ran.

The webserver is the only thing this process talks to for the launch (the daemon does the
rest); the report after it reads the instance in $DAGSTER_HOME.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import dagster as dg

LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""
STATUS = """
query Status($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
    ... on Error { message }
  }
}
"""
# BulkActionStatus values the backfill daemon leaves a backfill in when it is done with it.
FINISHED = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
SUCCEEDED = {"COMPLETED", "COMPLETED_SUCCESS"}
TAG_BACKFILL = "dagster/backfill"  # Dagster tags every run of a backfill with its id
ONE_DAY = dt.timedelta(days=1)


class BackfillError(RuntimeError):
    """The webserver refused the backfill, or could not be reached."""


def graphql(url: str, query: str, variables: dict, timeout: float = 300) -> dict:
    """One GraphQL request to the webserver at `url`; the `data` of the answer."""
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/graphql", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise BackfillError(
            f"no Dagster webserver answered at {url} ({e}): start it (`make prod-up`) or pass "
            "the right --url"
        ) from e
    if answer.get("errors"):
        raise BackfillError(f"{url}/graphql: {answer['errors'][0].get('message')}")
    return answer["data"]


def job_asset_keys(defs: dg.Definitions, job_name: str) -> list[dg.AssetKey]:
    """The assets a job materializes: what an asset backfill of that job selects."""
    keys = defs.resolve_job_def(job_name).asset_layer.executable_asset_keys
    return sorted(keys, key=lambda k: k.to_user_string())


def day_ranges(partitions: Sequence[str]) -> list[dict[str, str]]:
    """Days as runs of consecutive days: [{"start": first, "end": last}, ...]."""
    ranges: list[dict[str, str]] = []
    for d in sorted(set(partitions)):
        if (
            ranges
            and dt.date.fromisoformat(d) - dt.date.fromisoformat(ranges[-1]["end"]) == ONE_DAY
        ):
            ranges[-1]["end"] = d
        else:
            ranges.append({"start": d, "end": d})
    return ranges


def launch(
    url: str,
    assets: Sequence[dg.AssetKey],
    partitions: Sequence[str],
    tags: dict[str, str] | None = None,
    title: str | None = None,
) -> str:
    """An asset backfill of exactly these days of each of `assets`, through the webserver; its
    id. Per asset (`partitionsByAssets`), not `partitionNames` + `assetSelection`: Dagster
    reads the latter as the days of the root assets plus every day downstream of them, so the
    features of the day after the last (its lookback reaches the last day) would run too, on a
    day whose own rows were never validated."""
    params = {
        "partitionsByAssets": [
            {"assetKey": {"path": list(k.path)}, "partitions": {"ranges": day_ranges(partitions)}}
            for k in assets
        ],
        "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
        "title": title,
    }
    result = graphql(url, LAUNCH, {"params": params})["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise BackfillError(f"the backfill was refused ({result['__typename']}): {result}")
    return result["backfillId"]


def status(url: str, backfill_id: str) -> str:
    result = graphql(url, STATUS, {"id": backfill_id})["partitionBackfillOrError"]
    if result["__typename"] != "PartitionBackfill":
        raise BackfillError(f"backfill {backfill_id}: {result.get('message', result)}")
    return result["status"]


def wait(url: str, backfill_id: str, timeout: float, poll: float = 3) -> str:
    """Until the backfill daemon has finished the backfill; its final status."""
    deadline = time.monotonic() + timeout
    while (state := status(url, backfill_id)) not in FINISHED:
        if time.monotonic() > deadline:
            raise BackfillError(
                f"backfill {backfill_id} still {state} after {timeout:.0f} s: see the Dagster "
                f"UI ({url}/runs/b/{backfill_id}); is dagster-daemon running?"
            )
        time.sleep(poll)
    return state


def report(instance: dg.DagsterInstance, backfill_id: str) -> list[str]:
    """One line per run of the backfill: partition, assets, status, the celery workers that
    ran its steps (none for other executors)."""
    runs = instance.get_runs(dg.RunsFilter(tags={TAG_BACKFILL: backfill_id}))
    lines = []
    for r in sorted(
        runs, key=lambda r: (r.tags.get("dagster/partition", ""), len(r.asset_selection or ()))
    ):
        workers = set()
        for rec in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            data = rec.dagster_event.engine_event_data if rec.dagster_event else None
            if data and "Celery worker" in data.metadata:
                workers.add(data.metadata["Celery worker"].value.split("@")[0])
        assets = ",".join(sorted(k.path[-1] for k in r.asset_selection or ()))
        lines.append(
            f"  {r.tags.get('dagster/partition', '-')} [{assets}]: {r.status.value}"
            + (f", steps on {sorted(workers)}" if workers else "")
        )
    return lines


def days(first: str, last: str) -> list[str]:
    a, b = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    return [(a + dt.timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.backfills",
        description="Launch a Dagster asset backfill of a partitioned job's assets through the "
        "webserver; the daemon runs it.",
    )
    p.add_argument("--url", required=True, help="the Dagster webserver, http://host:port")
    p.add_argument("--job", required=True, help="e.g. machine_failure_data_job")
    p.add_argument("--from", dest="first", default="", help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="last", default="", help="last day, YYYY-MM-DD (included)")
    p.add_argument("--partition", action="append", default=[], help="instead of a range")
    p.add_argument("--tag", action="append", default=[], help="KEY=VALUE on every run")
    p.add_argument("--no-wait", action="store_true", help="launch, print the id, return")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")
    args = p.parse_args(argv)
    if not args.partition and not (args.first and args.last):
        p.error("give --from and --to, or one --partition per day")
    if any("=" not in t for t in args.tag):
        p.error("--tag takes KEY=VALUE")

    from orchestration.definitions import defs

    try:
        job = defs.resolve_job_def(args.job)
    except Exception:
        names = sorted(j.name for j in defs.get_repository_def().get_all_jobs())
        print(f"no job named {args.job}; jobs: {', '.join(names)}", file=sys.stderr)
        return 2
    parts = args.partition or days(args.first, args.last)
    known = set(job.partitions_def.get_partition_keys()) if job.partitions_def else set()
    unknown = [d for d in parts if d not in known]
    if unknown:
        print(
            f"{args.job} has no partition {unknown[0]} ({len(unknown)} unknown): its days run "
            f"from {min(known, default='-')} to {max(known, default='-')}",
            file=sys.stderr,
        )
        return 2
    tags = dict(t.split("=", 1) for t in args.tag)
    t = time.monotonic()
    try:
        backfill_id = launch(args.url, job_asset_keys(defs, args.job), parts, tags, args.job)
        print(
            f"asset backfill {backfill_id}: {len(parts)} day(s) of {args.job}'s assets, "
            f"{args.url}/runs/b/{backfill_id}"
        )
        if args.no_wait:
            return 0
        state = wait(args.url, backfill_id, args.timeout)
    except BackfillError as e:
        print(e, file=sys.stderr)
        return 1
    with dg.DagsterInstance.get() as instance:
        lines = report(instance, backfill_id)
    print(f"backfill {backfill_id}: {state} after {time.monotonic() - t:.0f} s, {len(lines)} runs")
    print("\n".join(lines))
    return 0 if state in SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
