"""`mlops status`: where a spec's continuous-training loop stands.

Reads the registry (aliases, version tags), the lake (monitoring summaries, deployment
history), the Dagster instance's runs (retraining runs with their trigger tags, failed runs)
and the landing folders (files the new-data sensor skips, and why), and asks the retraining
rules (mlops/retraining.py) what they would decide now.

It imports neither Dagster nor MLflow nor the code location: the default profile's instance
and registry are SQLite files read directly (orchestration/run_records.py,
mlops/registry_reader.py), so the verb answers in about a second; other storages go through
the Dagster and MLflow APIs.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from catalog.jobs import training_job_name
from mlops import monitoring, promotion, registry, retraining, watch
from mlops.lake import Lake
from mlops.registry_reader import RegistryReader, open_registry
from mlops.spec import FileSource, Spec
from orchestration.run_records import RunReader, RunRecord, iso, open_runs

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl


def _outcome(versions: list, run: RunRecord) -> dict[str, Any]:
    """The version a training run registered and what the gate made of it: `promote: ...`,
    `refused: <reason>` (champion_model's record, a successful run), or why there is none."""
    for mv in reversed(versions):
        if mv.tags.get(f"{registry.TAG}dagster_run_id") != run.run_id:
            continue
        decided = promotion.decision_text(mv.tags)
        if decided is None:
            decided = "not decided yet" if retraining.is_active(run) else "not decided (run ended)"
        return {"version": mv.version, "outcome": decided}
    return {"version": None, "outcome": "no version registered"}


def landing(spec: Spec, now: float | None = None) -> list[dict[str, Any]]:
    """Per landing folder: the days it holds and the files the new-data sensor skips (still
    changing, dated outside the partitions, symlinks leading out, names matching no pattern),
    the same way the sensor's tick sees them (on the wall clock)."""
    import time

    now = time.time() if now is None else now
    feeds = []
    if isinstance(spec.source, FileSource):
        feeds.append((spec.source, spec.landing_dir, True))
    if spec.labels.events is not None:
        feeds.append((spec.labels.events, spec.resolve(spec.labels.events.path), False))
    today = dt.datetime.now(dt.UTC).date()
    out = []
    for feed, folder, partitioned in feeds:
        others = tuple(f for f, d, _ in feeds if d == folder and f is not feed)
        if not partitioned and others:
            continue  # the folder is the readings' too: listed once, with them
        bounds = (spec.source.start_date, watch.last_partition(spec, today)) if partitioned else ()
        seen = watch.scan(feed, folder, now, *bounds, others=others)
        out.append({"feed": "source" if partitioned else "labels.events"} | seen.summary())
    return out


def status(spec: Spec, runs: RunReader, lake: Lake, reg: RegistryReader) -> dict[str, Any]:
    name = spec.registered_model_name
    drift = monitoring.summaries(lake, spec.name, monitoring.DRIFT_REPORT, last=1)
    perf = monitoring.summaries(lake, spec.name, monitoring.MODEL_PERFORMANCE, last=1)
    training = runs.runs(
        job_name=training_job_name(spec),
        tags={monitoring.TAG_SPEC: spec.name},
        limit=100,
    )
    versions = reg.versions(name)
    last_retrain = None
    if training:
        r = training[0]
        last_retrain = {
            "run_id": r.run_id,
            "status": r.status,
            "trigger": r.tags.get(monitoring.TAG_TRIGGER),
            "reason": r.tags.get(monitoring.TAG_REASON),
            "partition": r.tags.get(monitoring.TAG_PARTITION),
            "started": iso(r.start_time),
            **_outcome(versions, r),
        }
    # The last move of the champion alias; refusals are the retraining's outcome above.
    history = registry.deployment_history(lake, spec.name).filter(
        pl.col("action").is_in(registry.MOVES)
    )
    last_deploy = None
    if history.height:
        row = history.sort("time").row(-1, named=True)
        last_deploy = {
            k: row[k] for k in ("time", "action", "from_version", "to_version", "reason")
        }
    pending = {}
    for trigger in (monitoring.DRIFT, monitoring.METRIC_DECLINE):
        decision, _, busy = retraining.evaluate(spec, trigger, training, lake, None)
        pending[trigger] = {
            "would_retrain": decision.retrain and not busy,
            "reason": decision.reason + ("; a retraining is running" if busy else ""),
            "partition": decision.partition,
        }
    failures = [
        {
            "run_id": f.run_id,
            "job": f.job_name,
            "partition": f.tags.get("dagster/partition"),
            "trigger": f.tags.get(monitoring.TAG_TRIGGER),
            "ended": iso(f.end_time),
        }
        for f in runs.runs(statuses=["FAILURE"], limit=200)
        if f.job_name.startswith(f"{spec.name}_")
    ][:5]
    d, p = (drift[-1] if drift else None), (perf[-1] if perf else None)
    return {
        "spec": spec.name,
        "model": name,
        "champion": reg.alias_version(name, registry.CHAMPION),
        "challenger": reg.alias_version(name, registry.CHALLENGER),
        "last_deployment": last_deploy,
        "last_drift": d
        and {
            k: d.get(k)
            for k in ("partition", "drift_share", "threshold", "dataset_drift", "champion_version")
        }
        | {"drifted_columns": len(d.get("drifted_columns") or [])},
        "last_performance": p
        and {
            k: p.get(k)
            for k in (
                "partition",
                "primary_metric",
                "realized",
                "baseline",
                "declined",
                "champion_version",
            )
        },
        "last_retraining": last_retrain,
        "retraining_running": any(retraining.is_active(r) for r in training),
        "pending_triggers": pending,
        "last_failures": failures,
        "landing": landing(spec),
    }


def read_status(spec: Spec, lake: Lake, dagster_home: str, tracking_uri: str) -> dict[str, Any]:
    """`status` over the instance at `dagster_home` and the registry at `tracking_uri`, each
    read directly when it is the default profile's SQLite file."""
    runs, handle = open_runs(dagster_home)
    try:
        with open_registry(tracking_uri) as reg:
            return status(spec, runs, lake, reg)
    finally:
        handle.close()


def render(s: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)

    lines = [
        f"{s['spec']}  (model {s['model']})",
        f"  champion     v{f(s['champion'])}    challenger v{f(s['challenger'])}",
    ]
    if s["last_deployment"]:
        d = s["last_deployment"]
        lines.append(
            f"  deployed     {d['action']} v{f(d['from_version'])} -> v{d['to_version']} "
            f"at {d['time']:%Y-%m-%d %H:%M}: {d['reason']}"
        )
    if s["last_drift"]:
        d = s["last_drift"]
        lines.append(
            f"  last drift   {d['partition']}: share {f(d['drift_share'])} "
            f"(threshold {f(d['threshold'])}, {d['drifted_columns']} columns) vs v{d['champion_version']}"
        )
    else:
        lines.append("  last drift   none yet (drift_report runs after scoring)")
    if s["last_performance"]:
        p = s["last_performance"]
        lines.append(
            f"  realized     {p['partition']}: {p['primary_metric']} {f(p['realized'])} vs "
            f"baseline {f(p['baseline'])}{'  DECLINED' if p['declined'] else ''}"
        )
    r = s["last_retraining"]
    lines.append(
        f"  retraining   {r['trigger']} at {r['partition']} ({r['status']}): {r['reason']}\n"
        f"               -> v{f(r['version'])} {r['outcome']}"
        if r
        else "  retraining   none yet"
    )
    for trigger, p in s["pending_triggers"].items():
        lines.append(
            f"  {trigger:<15}{'RETRAIN NOW' if p['would_retrain'] else 'waiting'}: {p['reason']}"
        )
    if s["last_failures"]:
        lines.append("  failures")
        for fl in s["last_failures"]:
            lines.append(
                f"    {fl['ended']} {fl['job']} {fl['partition'] or ''} run {fl['run_id'][:8]}"
            )
    else:
        lines.append("  failures     none")
    lines += _render_landing(s.get("landing") or [])
    return "\n".join(lines)


_SKIPPED = {
    "still_changing": "still changing, wait for a later tick",
    "before_start": "dated before source.start_date, skipped",
    "after_last_partition": "dated after the last partition, wait for their day",
    "symlinks_refused": "symlinks leading out of the folder, not read",
    "unmatched": "match no file pattern, not read",
}


def _render_landing(folders: list[dict[str, Any]]) -> list[str]:
    lines = []
    for d in folders:
        lines.append(f"  landing      {d['feed']}: {d['days']} day(s) in {d['folder']}")
        for key, what in _SKIPPED.items():
            got = d[key]
            if got["count"]:
                more = got["count"] - len(got["names"])
                names = ", ".join(got["names"]) + (f" (+{more} more)" if more else "")
                lines.append(f"    {got['count']} {what}: {names}")
    return lines
