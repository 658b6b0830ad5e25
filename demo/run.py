"""`make demo`: the closed loop. Generate 60 days of IoT data whose last day is yesterday (UTC;
`--start` picks the first day instead), stable, then covariate and concept drift from day 36;
land days 1-30 and let the new-data sensor build them, train, gate and promote the first
champion, then replay days 31-60 one at a time through the real sensors and schedules
(orchestration/replay.py) and print the per-day timeline; the timeline is also written as
.mlops/reports/<spec>/timeline.{json,png}.

The loop runs on the demo's dated copy of the spec, .mlops/specs/<spec>.yaml: source.start_date
on the first generated day, the same landing folders, no end. The code location loads that copy
instead of specs/<spec>.yaml while the spec is unchanged (orchestration/definitions.py), so the
UI's daily partitions begin where the data does, and a file dropped in the landing folder for a
later day is built by the daemon's new-data sensor once that day has ended.

Everything runs against the persistent Dagster instance in $DAGSTER_HOME (default
.mlops/dagster), so `make ui` shows every run, materialization and check afterwards. With
`--runs executor` (the default when MLOPS_EXECUTOR=celery, as in the production profile:
`make prod-demo`) each run's steps go to the code location's executor, i.e. celery workers.
"""

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import dagster as dg

from demo.generate import generate
from mlops.config import (
    PROJECT_ROOT,
    lake_url,
    mlflow_artifact_root,
    mlflow_tracking_uri,
    online_store_url,
    specs_dir,
)
from mlops.lake import Lake, put_file
from mlops.online_store import make_store
from mlops.settings import settings
from mlops.spec import FileSource, Spec, load_spec
from orchestration.backtest import BacktestError, dated_spec, write_plot
from orchestration.definitions import build_definitions, dated_copy_path
from orchestration.instance import write_default_instance
from orchestration.replay import EXECUTOR, IN_PROCESS, RUN_MODES


def _instance() -> dg.DagsterInstance:
    # DAGSTER_HOME: Dagster's own variable, not a platform setting (mlops/settings.py).
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".mlops" / "dagster")))
    write_default_instance(home)  # the default profile's settings, unless edited
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


def first_day(days: int, start: dt.date | None = None, today: dt.date | None = None) -> dt.date:
    """The demo's first day: `start`, or the one that makes the last of `days` days yesterday
    (UTC), so the daily partitions the UI lists are the newest ones and hold data."""
    if start is not None:
        return start
    today = today or dt.datetime.now(dt.UTC).date()
    return today - dt.timedelta(days=days)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date: use YYYY-MM-DD") from None


def main(argv: list[str] | None = None) -> int:
    # MLflow's advice about integer columns and dataset sources is for interactive use.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default=str(PROJECT_ROOT / "specs" / "machine_failure.yaml"))
    p.add_argument("--days", type=int, default=60)
    p.add_argument(
        "--start",
        type=_date,
        default=None,
        help="first day, YYYY-MM-DD (default: the day that makes the last day yesterday, UTC)",
    )
    p.add_argument("--build-days", type=int, default=30, help="days built before the replay")
    p.add_argument("--drift-from", type=int, default=36, help="first drifted day (1-based)")
    p.add_argument("--drift", default="covariate,concept")
    p.add_argument("--machines", type=int, default=50)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bad-rows", type=float, default=0.01)
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        help="Optuna trials of every training (default: the spec's)",
    )
    p.add_argument("--redeliver", type=int, default=45, help="day that re-delivers the day before")
    p.add_argument(
        "--runs",
        choices=RUN_MODES,
        default=EXECUTOR if settings().executor == "celery" else IN_PROCESS,
        help="execute runs in this process, or send their steps to the code location's "
        "executor (celery workers when MLOPS_EXECUTOR=celery, the default then)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    spec = load_spec(args.spec)
    args.start = first_day(args.days, args.start)
    src, last = spec.source, args.start + dt.timedelta(days=args.days - 1)
    if args.start < src.start_date or (src.end_date is not None and last > src.end_date):
        p.error(
            f"{spec.path}: days {args.start}..{last} fall outside its partitions (source."
            f"start_date {src.start_date}, end_date {src.end_date or 'none'}): give --start "
            "within them, or move the spec's dates"
        )
    if spec.labels.kind != "event_feed" or not isinstance(spec.source, FileSource):
        p.error(
            f"{spec.path}: the demo generates the embedded IoT example (landing files and a "
            f"failure feed); for your own data run `mlops backtest --spec {spec.path}`"
        )
    if args.runs == EXECUTOR and spec.path.parent.resolve() != specs_dir().resolve():
        p.error(
            f"--runs executor reloads the code location, which loads the specs in "
            f"{specs_dir()}: set MLOPS_SPECS_DIR={spec.path.parent} for this demo and the workers"
        )
    timeline = run_demo(spec, args)
    if timeline is None:
        return 1
    out = write_timeline(spec, timeline, drift_from=args.drift_from)
    s = settings()
    dagster_ui = (
        f"http://{s.dagster_ui_host}:{s.dagster_ui_port}"
        if s.dagster_ui_port
        else "`make ui`, http://127.0.0.1:3000"
    )
    mlflow_ui = (
        s.mlflow_ui_url
        if "mlflow_ui_url" in s.model_fields_set
        else f"`make mlflow`, {s.mlflow_ui_url}"
    )
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
    """The demo regenerates everything: landing files, lake, registry, online store, the
    dated copy of the spec, and the spec's runs and materializations in the Dagster instance
    (the regenerated files have the same content, so their run keys would otherwise count as
    already run)."""
    _forget_runs(spec, defs, instance)
    dated_copy_path(spec).unlink(missing_ok=True)
    events = [spec.resolve(spec.labels.events.path)] if spec.labels.events else []
    for folder in (spec.landing_dir, *events, staging):
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
    """Generate the example into a staging folder, then the backtest engine lands it day by
    day into the live landing folders (the demo owns the embedded example's state)."""
    from orchestration.backtest import Options, feeds_of, run

    staging = spec.root / ".mlops" / "staging" / spec.name
    defs = build_definitions(spec.path.parent)
    instance = _instance()
    fresh_start(spec, staging, defs, instance)
    staged = staged_spec(spec, staging)
    report = generate(
        staged,
        days=args.days,
        start=args.start,
        machines=args.machines,
        seed=args.seed,
        drift_from=args.drift_from,
        drift=args.drift,
        bad_rows=args.bad_rows,
        progress=True,
    )
    days = [args.start + dt.timedelta(days=i) for i in range(args.days)]
    print(
        f"generated {args.days} days ({days[0]}..{days[-1]}): {report.rows} readings, "
        f"{report.events} failure events, {len(report.bad_rows)} bad rows (drift {args.drift} from day {args.drift_from})"
    )
    live = dated(spec, days[0], args.runs)
    feeds = feeds_of(staged, live)  # from the staging folders into the live landing ones
    opts = Options(
        build_days=args.build_days,
        runs=args.runs,
        trials=args.trials,
        redeliver=args.redeliver,
        marker=args.drift_from,
    )
    try:
        out = run(live, feeds, days, opts, reports=spec.root / ".mlops" / "reports" / spec.name)
    except BacktestError as e:
        print(f"error: {e}; see `make ui`", file=sys.stderr)
        return None
    if out is None:
        return None
    write_json(spec, out)
    return out.timeline


def dated(spec: Spec, first: dt.date, runs: str) -> Spec:
    """The spec the loop runs on, and the code location loads afterwards: the dated copy
    whose partitions begin on `first` (orchestration/backtest.py `dated_spec`). Not with
    `--runs executor`: the workers and the UI of the production profile loaded the spec
    before the demo began, and a copy written now would reach only some of them."""
    if runs == EXECUTOR:
        print(
            f"daily partitions from source.start_date {spec.source.start_date} ({spec.path}): "
            "with --runs executor the demo runs on the spec the workers loaded"
        )
        return spec
    live = dated_spec(spec, first)
    print(
        f"daily partitions from {live.source.start_date}: {live.path}, a dated copy of {spec.path}"
    )
    return live


def write_json(spec: Spec, out) -> Path:
    path = spec.root / ".mlops" / "reports" / spec.name / "backtest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    put_file(path, json.dumps(out.summary(), indent=2, default=str))
    return path


def write_timeline(spec: Spec, timeline: list[dict], drift_from: int | None = None) -> Path:
    """timeline.json and timeline.png under .mlops/reports/<spec>/."""
    out = spec.root / ".mlops" / "reports" / spec.name / "timeline"
    out.parent.mkdir(parents=True, exist_ok=True)
    put_file(out.with_suffix(".json"), json.dumps(timeline, indent=2))
    write_plot(spec, timeline, out.with_suffix(".png"), marker=drift_from)
    return out


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


if __name__ == "__main__":
    sys.exit(main())
