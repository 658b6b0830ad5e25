"""`mlops backtest`: the continuous-training loop over a spec's own history.

It never generates data: it replays the files already in the spec's landing folders (or the
rows of its SQL source), through the real sensors, schedules, jobs and gates, with a
simulated clock (orchestration/replay.py):

1. the first `--build-days` days land at once; the new-data sensor builds them, the
   monitoring sensor refreshes labels that matured, and the first champion is trained and
   gated;
2. every later day lands on its own: the new-data sensor builds it, the monitoring sensor
   scores it, writes its drift report and, once its labels are mature, its realized
   performance; the drift and metric-decline sensors (and the retraining schedule, when
   the spec names one) retrain through the promotion gate.

It prints one line per day and writes a JSON summary and a timeline PNG. A backtest runs in
its own state folder (`--state`, default `.mlops/backtest/<spec>`): its own Dagster
instance, lake, MLflow registry and online store, and a copy of the spec whose landing
folders are in the state folder. The live registry, instance, lake and store are never
touched. `make demo` is the same engine over the generated example (demo/run.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlops import ingest, modeling, monitoring, sources
from mlops.config import PROJECT_ROOT, spec_path
from mlops.lake import put_file
from mlops.monitoring import DRIFT_REPORT, MODEL_PERFORMANCE
from mlops.settings import settings
from mlops.spec import FileSource, Spec, SpecError, _Loader, load_spec

IN_PROCESS, EXECUTOR = "in-process", "executor"
RUN_MODES = (IN_PROCESS, EXECUTOR)
SOURCE_DIR, EVENTS_DIR = "source", "events"


class BacktestError(RuntimeError):
    pass


@dataclass
class Options:
    build_days: int = 14
    start: dt.date | None = None
    end: dt.date | None = None
    runs: str = IN_PROCESS
    trials: int | None = None  # every training's Optuna trials (None: the spec's)
    redeliver: int | None = None  # replay day (1-based) that re-delivers the day before
    marker: int | None = None  # a day to mark on the plot (the demo's drift onset)
    echo: Any = print


@dataclass
class Outcome:
    """What a backtest saw: the JSON summary (a contract: see `summary`) and the rows it
    printed."""

    spec: str
    days: list[dict] = field(default_factory=list)
    retrainings: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    alerts: int = 0

    def summary(self) -> dict:
        return {"spec": self.spec, "days": self.days, "retrainings": self.retrainings}


# --- the isolated state -------------------------------------------------------------------


def isolated_env(state: Path) -> dict[str, str]:
    """Settings that put every piece of a backtest under `state`."""
    return {
        "MLOPS_SPECS_DIR": str(state / "specs"),
        "MLOPS_LAKE_URL": str(state / "lake"),
        "MLOPS_MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "MLOPS_MLFLOW_ARTIFACT_ROOT": str(state / "mlartifacts"),
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{state / 'online.db'}",
        "DAGSTER_HOME": str(state / "dagster"),
    }


def staged_spec(
    spec: Spec, state: Path, start: dt.date | None = None, end: dt.date | None = None
) -> Spec:
    """A copy of the spec in `state/specs/` whose landing folders are under `state/landing`
    (the backtest lands the user's files there one day at a time). `start` and `end` (the
    history's first and last days) bound its daily partitions, so the backtest's UI lists
    the replayed days and no empty ones (a SQL source is polled from `start`)."""
    landing = state / "landing"
    folders = {"source": landing / SOURCE_DIR, "labels.events": landing / EVENTS_DIR}
    header = f"# backtest copy of {spec.path}: landing folders moved under {landing}"
    return _spec_copy(spec, state / "specs" / spec.path.name, header, folders, start, end)


def dated_spec(spec: Spec, start: dt.date) -> Spec:
    """`make demo`'s dated copy of `spec`: its daily partitions begin on `start`, the first
    day of the generated data, so the Dagster UI lists no empty day before it. Written to
    <project root>/.mlops/specs/, where the code location loads it instead of `spec` for as
    long as `spec` is unchanged (orchestration/definitions.py `load_specs`). It keeps the
    spec's landing folders (as absolute paths: the copy's root is .mlops/) and its end, none
    for the embedded spec: a file the user drops there for a later day is the new-data
    sensor's as soon as that day has ended."""
    from orchestration.definitions import dated_copy_path, dated_header

    folders = {where: spec.resolve(feed.path) for where, feed in spec.feeds()}
    header = (
        f"{dated_header(spec)}, written by `make demo`:\n# source.start_date is the first "
        "day of its data; the code location loads this file while that spec is unchanged."
    )
    return _spec_copy(spec, dated_copy_path(spec), header, folders, start, None)


def _spec_copy(
    spec: Spec,
    out: Path,
    header: str,
    folders: dict[str, Path],
    start: dt.date | None,
    end: dt.date | None,
) -> Spec:
    """The spec's text at `out` with its landing folders moved to `folders` (by field path:
    source, labels.events) and its partitions narrowed to [start, end]; loaded back."""
    data = yaml.load(spec.path.read_text(), Loader=_Loader)
    root = out.resolve().parent.parent
    for where, _ in spec.feeds():
        node = data["source"] if where == "source" else data["labels"]["events"]
        node["path"] = str(folders[where])
        if not folders[where].resolve().is_relative_to(root):
            node["allow_outside_project"] = True  # the spec's own folder, outside the copy's root
    if start is not None and start > spec.source.start_date:
        data["source"]["start_date"] = start.isoformat()
    if end is not None and (spec.source.end_date is None or end < spec.source.end_date):
        data["source"]["end_date"] = end.isoformat()
    out.parent.mkdir(parents=True, exist_ok=True)
    put_file(out, f"{header}\n{yaml.safe_dump(data, sort_keys=False)}")
    return load_spec(out)


def feeds_of(spec: Spec, landed: Spec):
    """(feed, where its files are, where they land) for the source and the label feed."""
    from orchestration.replay import Feed

    out = []
    if isinstance(spec.source, FileSource):
        out.append(Feed(landed.source, spec.landing_dir, landed.landing_dir))  # type: ignore[arg-type]
    if spec.labels.events is not None and landed.labels.events is not None:
        out.append(
            Feed(
                landed.labels.events,
                spec.resolve(spec.labels.events.path),
                landed.resolve(landed.labels.events.path),
            )
        )
    return out


def history_days(spec: Spec, start: dt.date | None, end: dt.date | None) -> list[dt.date]:
    """The days the spec's source holds data for, within [start, end]."""
    if isinstance(spec.source, FileSource):
        days = ingest.landed_days(spec.source, spec.landing_dir)
    else:
        first = max(spec.source.start_date, start or spec.source.start_date)
        last = end or spec.source.end_date or dt.datetime.now(dt.UTC).date()
        if (last - first).days > 3660:
            raise BacktestError(
                f"{(last - first).days} days from {first} to {last}: give --from/--to "
                "(at most ten years of a SQL source are probed, one query per day)"
            )
        span = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
        days = [d for d in span if sources.partition_fingerprint(spec, d) is not None]
    src = spec.source
    days = [d for d in days if d >= src.start_date and (src.end_date is None or d <= src.end_date)]
    return [d for d in days if (start is None or d >= start) and (end is None or d <= end)]


# --- the loop -----------------------------------------------------------------------------


def run(
    spec: Spec, feeds: list, days: list[dt.date], opts: Options, reports: Path
) -> Outcome | None:
    """Build, train the first champion, replay the rest: against the instance in
    $DAGSTER_HOME and the lake, registry and store the environment names. `spec` is the
    landed spec (its landing folders are where `feeds` copy to); the run-failure alerts
    go to `reports`/alerts.log."""
    import dagster as dg

    from catalog.jobs import data_job_name, labels_job_name, training_job_name
    from mlops.config import lake_url, mlflow_tracking_uri
    from mlops.lake import Lake
    from orchestration.definitions import build_definitions
    from orchestration.pools import initialize_pools
    from orchestration.replay import Replay

    echo = opts.echo
    if len(days) <= opts.build_days:
        raise BacktestError(
            f"{spec.name}: {len(days)} day(s) of data; --build-days {opts.build_days} leaves "
            "none to replay. Land more days or lower --build-days."
        )
    defs = build_definitions(spec.path.parent)
    instance = dg.DagsterInstance.get()
    initialize_pools(instance, [spec])  # before runs race to create them (orchestration/pools.py)
    lake = Lake(lake_url())
    alerts = _alerts_to_file(spec, reports / "alerts.log")
    training_config = (
        {"ops": {f"{spec.name}__candidate_model": {"config": {"trials": opts.trials}}}}
        if opts.trials
        else None
    )
    replay = Replay(
        spec,
        defs,
        instance,
        lake,
        mlflow_tracking_uri(),
        feeds,
        runs=opts.runs,
        training_config=training_config,
    )
    build, rest = days[: opts.build_days], days[opts.build_days :]

    # 1. The first days land at once: the sensor turns them into one run per day.
    for day in build:
        replay.land(day)
    replay.today = build[-1]
    runs = replay.ingest_round()
    runs += replay.monitoring_round()  # column labels that matured in the meantime
    failed = [r for r in runs if not r.success]
    if failed:
        raise BacktestError(
            f"{len(failed)} of {len(runs)} build run(s) failed, e.g. {failed[0].job} "
            f"{failed[0].partition}: {failed[0].error}"
        )
    data = [r for r in runs if r.job == data_job_name(spec)]
    rows = sum(r.metadata["validated_data"]["rows_in"] for r in data)
    quar = sum(r.metadata["validated_data"]["rows_quarantined"] for r in data)
    n_labels = sum(r.job == labels_job_name(spec) for r in runs)
    echo(
        f"days 1-{len(build)} ({build[0]}..{build[-1]}): {len(data)} data runs and {n_labels} "
        f"label runs from the sensors; {rows} rows, {quar} quarantined"
    )

    # 2. The first champion.
    if not _first_champion(replay, spec, opts.trials, build[-1].isoformat(), echo):
        return None

    # 3. The replay: one day at a time through the sensors and schedules.
    out = Outcome(spec.name)
    echo(f"\n{'day':<12}{'rows':>6}{'quar.':>6}{'drift':>7}{'champ':>6}{'realized':>16}  event")
    training = training_job_name(spec)
    t0 = time.perf_counter()
    for n, day in enumerate(rest, start=len(build) + 1):
        replay.land(day)
        events = []
        if opts.redeliver is not None and n == opts.redeliver:
            again = replay.land(day - dt.timedelta(days=1))
            events.append(f"re-delivered {', '.join(again)}")
        result = replay.day(day, training)
        row = timeline_row(replay, spec, n, day, result, events)
        row["elapsed_s"] = round(time.perf_counter() - t0, 1)
        out.timeline.append(row)
        out.retrainings += row["retrainings"]  # also kept on the day: the plot labels them
        echo(_fmt_row(row))
    out.days = [_day_summary(replay, r) for r in out.timeline]
    out.alerts = sum(1 for _ in alerts.open()) if alerts.exists() else 0
    promoted = sum(r["outcome"] == "promoted" for r in out.retrainings)
    echo(
        f"\n{len(out.retrainings)} retraining(s), {promoted} promoted; {out.alerts} "
        f"run-failure alert(s): {alerts}"
    )
    return out


def _first_champion(replay, spec: Spec, trials: int | None, partition: str, echo) -> bool:
    """Candidate -> evaluation -> gate -> champion, printed as the gate decided it."""
    from catalog.jobs import training_job_name

    cfg = {"ops": {f"{spec.name}__candidate_model": {"config": {"trials": trials}}}}
    first = monitoring.RetrainDecision(
        "initial", True, partition, None, "first champion", {"latest_partition": partition}
    )
    run = replay.run_job(training_job_name(spec), run_config=cfg, tags=first.tags(spec))
    cand = run.metadata.get("candidate_model")
    if cand is None or "model_evaluation" not in run.metadata:
        echo(f"training the first champion failed: {run.error}")
        return False
    ev = run.metadata["model_evaluation"]
    valid = ", ".join(
        f"{k.removeprefix('valid_')} {v:.4f}" for k, v in cand.items() if k.startswith("valid_")
    )
    echo(
        f"\ncandidate v{cand['model_version']}: {cand['estimator']} after {cand['trials']} "
        f"trials (valid {valid})"
    )
    for name, passed, reason in run.checks:
        echo(f"  {'PASS' if passed else 'FAIL'} {name}: {reason}")
    champ = replay.champion()
    echo(f"champion: v{champ}" if champ else "no champion: the gate kept it out")
    echo(ev["metrics"])
    echo(f"  lineage: mlops lineage --spec {spec.name} --version {cand['model_version']}")
    if champ is None:
        echo(
            "The first model did not pass the gates (above): lower gates.thresholds, widen "
            "model.training_window_days or raise --build-days, then run the backtest again."
        )
    return champ is not None


def _training_outcome(spec: Spec, r) -> dict:
    """One retraining as the JSON contract lists it."""
    champ = r.metadata.get("champion_model")
    cand = r.metadata.get("candidate_model", {})
    if champ is not None and champ.get("promoted"):
        outcome, reason = "promoted", champ.get("reason", "")
    elif champ is not None:
        outcome, reason = "refused", champ.get("reason", "")
    else:  # a refusal is champion_model's outcome; without it, a step raised
        outcome, reason = "failed", r.error or "the run ended before champion_model"
    return {
        "trigger": r.tags.get(monitoring.TAG_TRIGGER, "manual"),
        "version": cand.get("model_version"),
        "outcome": outcome,
        "reason": reason,
        "attempt": int(r.tags.get(monitoring.TAG_ATTEMPT) or 1),
        "change_point": r.tags.get(monitoring.TAG_CHANGE_POINT),
        "window": (r.metadata.get("training_set") or {}).get("window_policy"),
        "run_id": r.run_id,
    }


def timeline_row(replay, spec: Spec, n: int, day: dt.date, result, events: list[str]) -> dict:
    """What a day did, as printed and plotted (realized: the newest day evaluated today)."""
    from catalog.jobs import data_job_name, training_job_name

    key = day.isoformat()
    data = next(
        (r for r in result.runs if r.job == data_job_name(spec) and r.partition == key), None
    )
    v = (data.metadata.get("validated_data") if data else None) or {}
    if events and not any(r.job == data_job_name(spec) and r.partition != key for r in result.runs):
        events[-1] += ": no run (same content)"
    drift = replay.summary(DRIFT_REPORT, key) or {}
    perf = [r for r in result.runs if MODEL_PERFORMANCE in r.metadata]
    realized, realized_day, baseline = None, None, None
    if perf:
        realized_day = max(r.partition for r in perf)
        performance = replay.summary(MODEL_PERFORMANCE, realized_day) or {}
        realized, baseline = performance.get("realized"), performance.get("baseline")
    retrainings = []
    for r in result.runs:
        if not r.success and r.job != training_job_name(spec):
            events.append(f"{r.job} {r.partition} failed: {r.error[:80]}")
        if r.job != training_job_name(spec):
            continue
        t = {"day": key, **_training_outcome(spec, r)}
        retrainings.append(t)
        retry = f", retry {t['attempt'] - 1}" if t["attempt"] > 1 else ""
        what = f"retrain ({t['trigger']}{retry}) -> v{t['version']} {t['outcome']}"
        events.append(what if t["outcome"] == "promoted" else f"{what} ({t['reason'][:100]})")
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
        "baseline": baseline,  # the champion's evaluation: the decline threshold's base
        "metric": modeling.primary_metric(spec),
        "events": events,
        "retrainings": retrainings,
    }


def _day_summary(replay, row: dict) -> dict:
    """A day of the JSON contract: its own realized metrics (read after the whole replay,
    since labels mature after the day), its drift share, the champion that served it."""
    perf = replay.summary(MODEL_PERFORMANCE, row["day"]) or {}
    return {
        "day": row["day"],
        "champion_version": row["champion"],
        "realized": perf.get("metrics") or None,
        "rows_labelled": perf.get("rows_labelled"),
        "scored_by": perf.get("champion_version"),
        "drift_share": row["drift_share"],
        "rows": row["rows"],
        "quarantined": row["quarantined"],
        "events": row["events"],
    }


def _fmt_row(r: dict) -> str:
    drift = f"{r['drift_share']:.2f}" if r["drift_share"] is not None else "-"
    drift += "*" if r["drifted"] else " "
    real = f"{r['realized']:.3f} ({r['realized_day'][5:]})" if r["realized"] is not None else "-"
    return (
        f"{r['n']:>3} {r['day']:<8}{r['rows'] or 0:>6}{r['quarantined'] or 0:>6}{drift:>7}"
        f"{'v' + str(r['champion']):>6}{real:>16}  {'; '.join(r['events'])}"
    )


def _alerts_to_file(spec: Spec, path: Path) -> Path:
    """The run-failure sensor's alerts go to a file during a replay, not over the timeline."""
    import logging

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


def write_plot(spec: Spec, timeline: list[dict], path: Path, marker: int | None = None) -> Path:
    """The timeline PNG: drift share, realized metric by labelled day against the decline
    threshold, champion version, each retraining labelled with its trigger
    (mlops/timeline.py)."""
    from mlops.timeline import write_timeline

    return write_timeline(spec, timeline, path, marker)


def _lag(r: dict) -> int:
    return (dt.date.fromisoformat(r["day"]) - dt.date.fromisoformat(r["realized_day"])).days


# --- the command --------------------------------------------------------------------------


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a date: use YYYY-MM-DD") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlops backtest",
        description="Replay a spec's own history (its landing files or SQL rows) through the "
        "real sensors, jobs and gates with a simulated clock, in an isolated state folder.",
    )
    p.add_argument("--spec", required=True, help="spec name (specs/<name>.yaml) or path")
    p.add_argument("--from", dest="start", type=_date, help="first day (default: the first)")
    p.add_argument("--to", dest="end", type=_date, help="last day (default: the last)")
    p.add_argument(
        "--build-days", type=int, default=14, help="days built before the first champion"
    )
    p.add_argument("--runs", choices=RUN_MODES, default=IN_PROCESS)
    p.add_argument("--trials", type=int, default=None, help="Optuna trials of every training")
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        help="state folder (default: .mlops/backtest/<spec>; emptied first)",
    )
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="summary JSON")
    p.add_argument("--plot", type=Path, default=None, help="timeline PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    # MLflow's advice about integer columns and dataset sources is for interactive use.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        spec = load_spec(spec_path(args.spec))
    except SpecError as e:
        print(f"error: {e}\nRun `mlops spec check <path>` for the details.", file=sys.stderr)
        return 2
    if args.build_days < 3:
        print("error: --build-days must be at least 3 (a time-ordered split)", file=sys.stderr)
        return 2
    state = (args.state or spec.root / ".mlops" / "backtest" / spec.name).resolve()
    live = (PROJECT_ROOT / ".mlops").resolve()
    if state == live or state in live.parents:
        print(f"error: --state {state} holds the live state: pick another folder", file=sys.stderr)
        return 2
    try:
        days = history_days(spec, args.start, args.end)
        if not days:
            where = spec.landing_dir if isinstance(spec.source, FileSource) else "the SQL source"
            raise BacktestError(
                f"no data for {spec.name} in {where}"
                + (
                    f" between {args.start or '-'} and {args.end or '-'}"
                    if args.start or args.end
                    else ""
                )
                + ": land files matching source.file_pattern first"
            )
        shutil.rmtree(state, ignore_errors=True)
        # Written, not read: this process and the runs it starts see the isolated state (the
        # settings model reads it at each call).
        os.environ.update(isolated_env(state))
        os.environ.pop("MLOPS_OPTUNA_STORAGE", None)  # trials stay in this process
        from orchestration.instance import write_default_instance

        home = Path(os.environ["DAGSTER_HOME"])  # Dagster's own variable, just set
        write_default_instance(home)
        landed = staged_spec(spec, state, days[0], days[-1])
        print(
            f"backtest of {spec.name}: {len(days)} day(s) {days[0]}..{days[-1]}, the first "
            f"{args.build_days} built at once; state in {state}"
        )
        opts = Options(build_days=args.build_days, runs=args.runs, trials=args.trials, echo=print)
        out = run(landed, feeds_of(spec, landed), days, opts, reports=state)
    except (BacktestError, ingest.LandingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out is None:
        return 1
    json_path = args.json_path or state / "backtest.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    put_file(json_path, json.dumps(out.summary(), indent=2, default=str))
    plot = write_plot(landed, out.timeline, args.plot or state / "timeline.png")
    print(
        f"\ndone in {time.perf_counter() - t0:.0f} s. Summary: {json_path}; timeline: {plot}\n"
        f"Look around: DAGSTER_HOME={home} dagster dev -w workspace.yaml (with "
        f"MLOPS_SPECS_DIR={state / 'specs'} MLOPS_LAKE_URL={state / 'lake'}); "
        f"mlflow ui --backend-store-uri {settings().mlflow_tracking_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
