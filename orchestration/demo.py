"""`make demo`: the closed loop. Generate 60 days of IoT data (stable, then covariate and
concept drift from day 36), land days 1-30 and let the new-data sensor build them, train,
gate and promote the first champion, then replay days 31-60 one at a time through the real
sensors and schedules (orchestration/replay.py) and print the per-day timeline; the
timeline is also written as .mlops/reports/<spec>/timeline.{json,png}.

Everything runs against the persistent Dagster instance in $DAGSTER_HOME (default
.mlops/dagster), so `make ui` shows every run, materialization and check afterwards. With
`--runs executor` (the default when MLOPS_EXECUTOR=celery, as in the production profile:
`make prod-demo`) each run's steps go to the code location's executor, i.e. celery workers.
"""

import argparse
import datetime as dt
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import dagster as dg

from mlops import modeling, monitoring
from mlops.config import (
    PROJECT_ROOT,
    lake_url,
    mlflow_artifact_root,
    mlflow_tracking_uri,
    online_store_url,
    specs_dir,
)
from mlops.generate import generate
from mlops.lake import Lake
from mlops.monitoring import DRIFT_REPORT, MODEL_PERFORMANCE
from mlops.online_store import make_store
from mlops.spec import Spec, load_spec
from orchestration.definitions import build_definitions
from orchestration.jobs import data_job_name, labels_job_name, training_job_name
from orchestration.pools import initialize_pools
from orchestration.replay import EXECUTOR, IN_PROCESS, RUN_MODES, Replay


def _instance() -> dg.DagsterInstance:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".mlops" / "dagster")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.get()


def staged_spec(spec: Spec, staging: Path) -> Spec:
    """The spec with its landing folders moved to `staging`: where the demo generates the
    days before landing them one at a time."""
    src = spec.source.model_copy(update={"path": str(staging / spec.landing_dir.name)})
    labels = spec.labels
    if labels.events is not None:
        folder = staging / spec.resolve(labels.events.path).name
        labels = labels.model_copy(
            update={"events": labels.events.model_copy(update={"path": str(folder)})}
        )
    return spec.model_copy(update={"source": src, "labels": labels})


def main(argv: list[str] | None = None) -> int:
    # MLflow's advice about integer columns and dataset sources is for interactive use.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default=str(PROJECT_ROOT / "specs" / "machine_failure.yaml"))
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--build-days", type=int, default=30, help="days built before the replay")
    p.add_argument("--drift-from", type=int, default=36, help="first drifted day (1-based)")
    p.add_argument("--drift", default="covariate,concept")
    p.add_argument("--machines", type=int, default=50)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bad-rows", type=float, default=0.01)
    p.add_argument("--trials", type=int, default=None, help="first champion's Optuna trials")
    p.add_argument("--redeliver", type=int, default=45, help="day that re-delivers the day before")
    p.add_argument(
        "--runs",
        choices=RUN_MODES,
        default=IN_PROCESS
        if (os.environ.get("MLOPS_EXECUTOR") or "multiprocess").strip().lower() == "multiprocess"
        else EXECUTOR,
        help="execute runs in this process, or send their steps to the code location's "
        "executor (celery workers when MLOPS_EXECUTOR=celery, the default then)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    spec = load_spec(args.spec)
    if args.runs == EXECUTOR and spec.path.parent.resolve() != specs_dir().resolve():
        p.error(
            f"--runs executor reloads the code location, which loads the specs in "
            f"{specs_dir()}: set MLOPS_SPECS_DIR={spec.path.parent} for this demo and the workers"
        )
    timeline = run_demo(spec, args)
    if timeline is None:
        return 1
    out = write_timeline(spec, timeline, drift_from=args.drift_from)
    ui = os.environ.get("MLOPS_DAGSTER_UI_PORT")
    dagster_ui = (
        f"http://{os.environ.get('MLOPS_DAGSTER_UI_HOST', '127.0.0.1')}:{ui}"
        if ui
        else "`make ui`, http://127.0.0.1:3000"
    )
    mlflow_ui = os.environ.get("MLOPS_MLFLOW_UI_URL") or "`make mlflow`, http://127.0.0.1:5000"
    print(
        f"\ndone in {time.perf_counter() - t0:.0f} s. Timeline: {out}.png\n"
        f"See it all: Dagster ({dagster_ui}; Assets > {spec.name}; Runs show each trigger's "
        f"tags), MLflow ({mlflow_ui}; Models > {spec.registered_model_name}) and "
        f"`.venv/bin/mlops status --spec {spec.name}`"
    )
    return 0


def fresh_start(
    spec: Spec, staging: Path, defs: dg.Definitions, instance: dg.DagsterInstance
) -> Lake:
    """The demo regenerates everything: landing files, lake, registry, online store, and the
    spec's runs and materializations in the Dagster instance (the regenerated files have the
    same content, so their run keys would otherwise count as already run)."""
    _forget_runs(spec, defs, instance)
    for folder in (spec.landing_dir, spec.resolve(spec.labels.events.path), staging):
        shutil.rmtree(folder, ignore_errors=True)
    lake = Lake(lake_url())
    spec_folder = f"{lake.root}/{spec.name}"
    if lake.fs.exists(spec_folder):
        lake.fs.rm(spec_folder, recursive=True)
    _fresh_mlflow(spec.registered_model_name)
    store = make_store(online_store_url())
    store.delete_spec(spec.name)
    store.close()
    return lake


def _forget_runs(spec: Spec, defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    repo = defs.get_repository_def()
    jobs = [j.name for j in repo.get_all_jobs() if j.name.startswith(f"{spec.name}_")]
    runs = [r for job in jobs for r in instance.get_runs(dg.RunsFilter(job_name=job))]
    for r in runs:
        instance.delete_run(r.run_id)
    keys = [k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[0] == spec.name]
    instance.wipe_assets(keys)
    if runs:
        print(f"forgot {len(runs)} earlier {spec.name} runs and their materializations")


def run_demo(spec: Spec, args: argparse.Namespace) -> list[dict] | None:
    staging = spec.root / ".mlops" / "staging" / spec.name
    defs = build_definitions(spec.path.parent)
    instance = _instance()
    lake = fresh_start(spec, staging, defs, instance)
    report = generate(
        staged_spec(spec, staging),
        days=args.days,
        machines=args.machines,
        seed=args.seed,
        drift_from=args.drift_from,
        drift=args.drift,
        bad_rows=args.bad_rows,
        progress=True,
    )
    print(
        f"generated {args.days} days: {report.rows} readings, {report.events} failure events, "
        f"{len(report.bad_rows)} bad rows (drift {args.drift} from day {args.drift_from})"
    )
    initialize_pools(instance, [spec])  # before runs race to (orchestration/pools.py)
    alerts = _alerts_to_file(spec)
    replay = Replay(spec, defs, instance, lake, mlflow_tracking_uri(), staging, runs=args.runs)
    days = [spec.source.start_date + dt.timedelta(days=i) for i in range(args.days)]
    build, rest = days[: args.build_days], days[args.build_days :]

    # 1. The first month lands at once: the sensor turns it into one run per day.
    for day in build:
        replay.land(day)
    runs = replay.ingest_round()
    failed = [r for r in runs if not r.success]
    if failed:
        print(
            f"{len(failed)} run(s) failed, e.g. {failed[0].error}; see `make ui`", file=sys.stderr
        )
        return None
    data = [r for r in runs if r.job == data_job_name(spec)]
    rows = sum(r.metadata["validated_data"]["rows_in"] for r in data)
    quar = sum(r.metadata["validated_data"]["rows_quarantined"] for r in data)
    print(
        f"days 1-{len(build)}: {len(data)} data runs and "
        f"{sum(r.job == labels_job_name(spec) for r in runs)} label runs from the new-data "
        f"sensor; {rows} rows, {quar} quarantined"
    )

    # 2. The first champion.
    if not _train_and_promote(replay, spec, args.trials, build[-1].isoformat()):
        return None

    # 3. The replay: one day at a time through the sensors and schedules.
    print(f"\n{'day':<12}{'rows':>6}{'quar.':>6}{'drift':>7}{'champ':>6}{'realized':>16}  event")
    timeline = []
    training = training_job_name(spec)
    t_replay = time.perf_counter()
    for n, day in enumerate(rest, start=len(build) + 1):
        replay.land(day)
        events = []
        if n == args.redeliver:
            again = replay.land(day - dt.timedelta(days=1))
            events.append(f"re-delivered {', '.join(again)}")
        result = replay.day(day, training)
        row = timeline_row(replay, spec, n, day, result, events)
        row["elapsed_s"] = round(time.perf_counter() - t_replay, 1)
        timeline.append(row)
        print(_fmt_row(row))
    n_alerts = sum(1 for _ in alerts.open()) if alerts.exists() else 0
    print(f"\n{n_alerts} run-failure alert(s) (refused gates included): {alerts}")
    return timeline


def _alerts_to_file(spec: Spec) -> Path:
    """The run-failure sensor's alerts go to a file during the demo, not over the timeline."""
    import logging

    path = spec.root / ".mlops" / "reports" / spec.name / "alerts.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    log = logging.getLogger("mlops.alerts")
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    return path


def timeline_row(
    replay: Replay, spec: Spec, n: int, day: dt.date, result, events: list[str]
) -> dict:
    key = day.isoformat()
    data = next(
        (r for r in result.runs if r.job == data_job_name(spec) and r.partition == key), None
    )
    v = (data.metadata.get("validated_data") if data else None) or {}
    if events and not any(r.job == data_job_name(spec) and r.partition != key for r in result.runs):
        events[-1] += ": no run (same content)"
    drift = replay.summary(DRIFT_REPORT, key) or {}
    perf = [r for r in result.runs if MODEL_PERFORMANCE in r.metadata]
    realized, realized_day = None, None
    if perf:
        realized_day = perf[-1].partition
        realized = (replay.summary(MODEL_PERFORMANCE, realized_day) or {}).get("realized")
    for r in result.runs:
        if not r.success and r.job != training_job_name(spec):
            events.append(f"{r.job} {r.partition} failed: {r.error[:80]}")
        if r.job != training_job_name(spec):
            continue
        why = r.tags.get(monitoring.TAG_TRIGGER, "?")
        champ = r.metadata.get("champion_model")
        cand = r.metadata.get("candidate_model", {})
        if champ and champ.get("promoted"):
            events.append(f"retrain ({why}) -> v{cand.get('model_version')} promoted")
        else:
            failed = [f"{c[0]}: {c[2]}" for c in r.checks if not c[1]]
            reason = failed[0] if failed else (champ or {}).get("reason") or r.error
            events.append(
                f"retrain ({why}) -> v{cand.get('model_version')} refused ({reason[:100]})"
            )
    return {
        "n": n,
        "day": key,
        "rows": v.get("rows_in"),
        "quarantined": v.get("rows_quarantined"),
        "drift_share": drift.get("drift_share"),
        "drifted": (drift.get("drift_share") or 0) > spec.monitoring.drift_threshold,
        "champion": replay.champion(),
        "realized": realized,
        "realized_day": realized_day,
        "metric": modeling.primary_metric(spec),
        "events": events,
    }


def _fmt_row(r: dict) -> str:
    drift = f"{r['drift_share']:.2f}" if r["drift_share"] is not None else "-"
    drift += "*" if r["drifted"] else " "
    real = f"{r['realized']:.3f} ({r['realized_day'][5:]})" if r["realized"] is not None else "-"
    return (
        f"{r['n']:>3} {r['day']:<8}{r['rows'] or 0:>6}{r['quarantined'] or 0:>6}{drift:>7}"
        f"{'v' + str(r['champion']):>6}{real:>16}  {'; '.join(r['events'])}"
    )


def write_timeline(spec: Spec, timeline: list[dict], drift_from: int | None = None) -> Path:
    """timeline.json and timeline.png under .mlops/reports/<spec>/."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = spec.root / ".mlops" / "reports" / spec.name / "timeline"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(timeline, indent=2))
    days = [r["n"] for r in timeline]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    ax1.bar(
        days,
        [r["drift_share"] or 0 for r in timeline],
        color=["tab:red" if r["drifted"] else "tab:gray" for r in timeline],
    )
    ax1.axhline(spec.monitoring.drift_threshold, ls="--", c="k", lw=1)
    ax1.set_ylabel("drift share")
    pts = [(r["n"] - _lag(r), r["realized"]) for r in timeline if r["realized"] is not None]
    if pts:
        ax2.plot(*zip(*pts, strict=True), "o-")
    ax2.set_ylabel(f"realized {timeline[0]['metric']}\n(by labelled day)")
    ax3.step(days, [r["champion"] or 0 for r in timeline], where="post")
    ax3.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax3.set_ylabel("champion version")
    if drift_from is not None:
        for ax in (ax1, ax2, ax3):
            ax.axvline(drift_from - 0.5, c="k", ls=":", lw=1)
        ax1.annotate("drift starts", (drift_from - 0.4, ax1.get_ylim()[1] * 0.9), fontsize=8)
    ax3.set_xlabel("day")
    for r in timeline:
        for e in r["events"]:
            if e.startswith("retrain"):
                for ax in (ax1, ax2, ax3):
                    ax.axvline(r["n"], c="tab:green" if "promoted" in e else "tab:orange", lw=1)
    fig.suptitle(f"{spec.name}: closed loop (green: promoted, orange: refused)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)
    plt.close(fig)
    return out


def _lag(r: dict) -> int:
    return (dt.date.fromisoformat(r["day"]) - dt.date.fromisoformat(r["realized_day"])).days


def _fresh_mlflow(model_name: str) -> None:
    """The demo regenerates everything, so it starts its registry afresh too: the local store
    is removed; on a tracking server (the production profile) the registered model is
    deleted, so versions count from 1 again (runs stay in their experiment)."""
    uri = mlflow_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).unlink(missing_ok=True)
        shutil.rmtree(mlflow_artifact_root(), ignore_errors=True)
        return
    from mlflow.exceptions import MlflowException

    from mlops import registry

    c = registry.client(uri)
    try:
        c.get_registered_model(model_name)
    except MlflowException:
        return
    c.delete_registered_model(model_name)
    print(f"deleted registered model {model_name} at {uri} (the demo starts from v1)")


def _train_and_promote(replay: Replay, spec: Spec, trials: int | None, partition: str) -> bool:
    """Candidate -> evaluation -> gate -> champion, printed as the gate decided it."""
    from mlops import registry

    cfg = {"ops": {f"{spec.name}__candidate_model": {"config": {"trials": trials}}}}
    first = monitoring.Decision(
        "initial", True, partition, None, "first champion", {"latest_partition": partition}
    )
    run = replay.run_job(training_job_name(spec), run_config=cfg, tags=first.tags(spec))
    cand = run.metadata.get("candidate_model")
    if cand is None or "model_evaluation" not in run.metadata:
        print(f"training failed: {run.error}", file=sys.stderr)
        return False
    ev = run.metadata["model_evaluation"]
    print(
        f"\ncandidate v{cand['model_version']}: {cand['estimator']} after {cand['trials']} "
        f"trials (valid {_primary(cand)})"
    )
    for name, passed, reason in run.checks:
        print(f"  {'PASS' if passed else 'FAIL'} {name}: {reason}")
    tracking = replay.tracking_uri
    champ = registry.alias_version(tracking, spec.registered_model_name, registry.CHAMPION)
    print(f"champion: v{champ}" if champ else "no champion: the gate kept it out")
    print(ev["metrics"])
    mlflow_run = cand["mlflow_run_id"]
    exp = registry.client(tracking).get_run(mlflow_run).info.experiment_id
    ui = os.environ.get("MLOPS_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    print(f"  MLflow run: {ui}/#/experiments/{exp}/runs/{mlflow_run}")
    print(
        f"  lineage:    .venv/bin/mlops lineage --spec {spec.name} "
        f"--version {cand['model_version']}"
    )
    return champ is not None


def _primary(meta: dict) -> str:
    return ", ".join(
        f"{k.removeprefix('valid_')} {v:.4f}" for k, v in meta.items() if k.startswith("valid_")
    )


if __name__ == "__main__":
    sys.exit(main())
