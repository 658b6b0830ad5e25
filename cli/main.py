"""`mlops`: the verbs Dagster has no command for (spec checks, demo data, ...).

Expected mistakes (a bad spec, a bad argument) print what was wrong and exit 1, without a
traceback.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click

from mlops.spec import SpecError, load_spec, summary


def _load(path: str):
    try:
        return load_spec(path)
    except SpecError as e:
        click.echo(f"spec check failed: {e}", err=True)
        sys.exit(1)


@click.group()
def main() -> None:
    """Continuous training on Dagster assets: see README.md."""


@main.group()
def spec() -> None:
    """Work with spec files (specs/*.yaml)."""


@spec.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def spec_check(path: str) -> None:
    """Validate a spec: every problem with its field path, or a one-screen summary."""
    s = _load(path)
    click.echo(summary(s))
    click.echo("spec ok")


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def backtest(args: tuple[str, ...]) -> None:
    """Replay a spec's own history through the sensors, jobs and gates (--help for options)."""
    from orchestration.backtest import main as run_backtest

    sys.exit(run_backtest(list(args)))


@main.command()
@click.option(
    "--spec",
    "spec_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="spec file whose landing directories receive the files",
)
@click.option("--days", type=click.IntRange(min=1), required=True)
@click.option("--machines", type=click.IntRange(min=1), required=True)
@click.option("--seed", type=int, required=True)
@click.option(
    "--start",
    type=click.DateTime(["%Y-%m-%d"]),
    default=None,
    help="first day (default: the spec's source.start_date)",
)
@click.option(
    "--drift-from",
    type=click.IntRange(min=1),
    default=None,
    help="1-based day index from which drift applies",
)
@click.option(
    "--drift",
    default=None,
    help="covariate, concept, new-category, or a comma-separated combination",
)
@click.option(
    "--bad-rows",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="fraction of rows per day to corrupt, one problem per row",
)
@click.option(
    "--clean/--no-clean", default=False, help="remove the landing directories' existing files first"
)
def generate(
    spec_path: str,
    days: int,
    machines: int,
    seed: int,
    start: dt.datetime | None,
    drift_from: int | None,
    drift: str | None,
    bad_rows: float,
    clean: bool,
) -> None:
    """Write generated IoT readings and a late failure-event feed, one file per day."""
    from demo import generate as gen

    s = _load(spec_path)
    if clean:
        for folder in _landing_dirs(s):
            for p in folder.glob("*") if folder.exists() else []:
                if p.is_file():
                    p.unlink()
    try:
        report = gen.generate(
            s,
            days=days,
            machines=machines,
            seed=seed,
            start=start.date() if start else None,
            drift_from=drift_from,
            drift=drift,
            bad_rows=bad_rows,
            progress=True,
        )
    except ValueError as e:
        click.echo(f"generate: {e}", err=True)
        sys.exit(1)
    click.echo(
        f"wrote {len(report.readings_files)} readings file(s) ({report.rows} rows) to "
        f"{s.landing_dir} and {len(report.event_files)} event file(s) ({report.events} events)"
    )
    if report.bad_rows:
        counts = ", ".join(f"{k} {v}" for k, v in report.bad_row_counts().items())
        click.echo(f"injected {len(report.bad_rows)} bad rows: {counts}")


# Model lifecycle -------------------------------------------------------------------------


def _context(spec_arg: str):
    from mlops import config
    from mlops.lake import Lake

    s = _load(str(config.spec_path(spec_arg)))
    return s, Lake(config.lake_url()), config.mlflow_tracking_uri()


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(1)


SPEC_OPTION = click.option(
    "--spec", "spec_arg", required=True, help="spec name (specs/<name>.yaml) or path to a spec file"
)


def _print(data: dict, as_json: bool, text: str) -> None:
    import json

    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


@main.command()
@SPEC_OPTION
@click.option("--version", "version", type=int, required=True, help="model version to promote")
@click.option("--force", is_flag=True, help="promote even if a gate fails (needs --reason)")
@click.option("--reason", default="", help="why; recorded in the deployment history")
def promote(spec_arg: str, version: int, force: bool, reason: str) -> None:
    """Run the promotion gate for a version and make it champion if it passes."""
    from mlops import promotion, registry

    s, lake, uri = _context(spec_arg)
    try:
        d = promotion.promote(s, lake, uri, version, force=force, reason=reason)
    except (promotion.PromotionError, registry.RegistryError) as e:
        _fail(f"promote: {e}")
    for g in d.gates:
        click.echo(f"  {'PASS' if g.passed else 'FAIL'} {g.name}: {g.reason}")
    if d.promoted:
        click.echo(f"champion: v{d.from_version or '-'} -> v{d.to_version} ({d.reason})")
    else:
        _fail(f"not promoted: {d.reason}; champion stays v{d.from_version or '-'}")


@main.command()
@SPEC_OPTION
@click.option("--to", "to", type=int, default=None, help="version to restore (default: previous)")
@click.option(
    "--force",
    is_flag=True,
    help="allow a version that was never champion (needs --reason; recorded); it must still "
    "load and score",
)
@click.option("--reason", default="", help="why; recorded in the deployment history")
def rollback(spec_arg: str, to: int | None, force: bool, reason: str) -> None:
    """Point the champion alias back at the previous champion (or --to N, a former champion)."""
    from mlops import promotion, registry

    s, lake, uri = _context(spec_arg)
    try:
        d = promotion.rollback(s, lake, uri, to, force=force, reason=reason)
    except (promotion.PromotionError, registry.RegistryError) as e:
        _fail(f"rollback refused, the champion is unchanged: {e}")
    click.echo(f"champion: v{d.from_version} -> v{d.to_version} ({d.reason})")


@main.command()
@SPEC_OPTION
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(spec_arg: str, as_json: bool) -> None:
    """Champion and challenger, last drift and realized metric, last retraining and why,
    what the retraining triggers would do now, recent failures."""
    import os

    from mlops.config import PROJECT_ROOT

    # The loop's state is in the Dagster instance the demo and `make ui` use. DAGSTER_HOME is
    # Dagster's own variable, not a platform setting (mlops/settings.py).
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".mlops" / "dagster"))
    from orchestration import status as st

    s, lake, uri = _context(spec_arg)
    home = os.environ["DAGSTER_HOME"]
    if not os.path.isdir(home):
        _fail(f"no Dagster instance at DAGSTER_HOME={home}: run `make demo` or `make ui` first")
    data = st.read_status(s, lake, home, uri)
    _print(data, as_json, st.render(data))


@main.command()
@SPEC_OPTION
def history(spec_arg: str) -> None:
    """The deployment history: every alias move and every refused challenger, newest last,
    and a champion alias moved in MLflow directly, outside the platform."""
    from mlops import registry
    from mlops.registry_reader import open_registry

    s, lake, uri = _context(spec_arg)
    h = registry.deployment_history(lake, s.name)
    if h.height == 0:
        click.echo("no deployments yet")
    for r in h.iter_rows(named=True):
        if r["action"] == registry.REFUSED:  # nothing moved: say who kept serving
            what = f"v{r['to_version']} (v{r['from_version'] or '-'} kept serving)"
        else:
            what = f"v{r['from_version'] or '-'} -> v{r['to_version']}"
        click.echo(
            f"{r['time']:%Y-%m-%d %H:%M:%S}  {r['action']:<13} {what}  {r['actor']}  {r['reason']}"
        )
    try:
        with open_registry(uri) as reg:
            current = reg.alias_version(s.registered_model_name, registry.CHAMPION)
    except registry.RegistryError as e:
        _fail(f"history: cannot compare with the registry's aliases: {e}")
    moved = registry.moved_outside(current, h)
    if moved is not None:  # MLflow records no time or actor for an alias change
        now = f"v{moved['version']}" if moved["version"] is not None else "(alias removed)"
        click.echo(
            f"{'-':<19}  {'moved outside the platform':<13} "
            f"v{moved['recorded'] or '-'} -> {now}  {moved['alias']} alias set in MLflow "
            "directly, not by mlops promote/rollback or champion_model"
        )


@main.command()
@SPEC_OPTION
@click.option("--version", "version", type=int, required=True)
@click.option("--json", "as_json", is_flag=True)
def lineage(spec_arg: str, version: int, as_json: bool) -> None:
    """What made a model version: partitions, data versions, runs, code, spec, metrics."""
    from mlops import lineage as lin
    from mlops import registry
    from mlops.registry_reader import open_registry

    s, lake, uri = _context(spec_arg)
    try:
        with open_registry(uri) as reg:
            d = lin.lineage(s, lake, reg, version)
    except registry.RegistryError as e:
        _fail(f"lineage: {e}")
    _print(d, as_json, lin.format_lineage(d))


@main.command()
@SPEC_OPTION
@click.option("--partition", required=True, help="daily partition, YYYY-MM-DD")
@click.option("--json", "as_json", is_flag=True)
def impact(spec_arg: str, partition: str, as_json: bool) -> None:
    """Model versions and prediction partitions that used one data partition."""
    from mlops import lineage as lin
    from mlops import registry
    from mlops.registry_reader import open_registry

    s, lake, uri = _context(spec_arg)
    try:
        with open_registry(uri) as reg:
            d = lin.impact(s, lake, reg, partition)
    except registry.RegistryError as e:  # a version's lineage artifact unreadable or altered
        _fail(f"impact: {e}")
    _print(d, as_json, lin.format_impact(d))


@main.command()
@SPEC_OPTION
@click.option("--version", "version", type=int, required=True)
@click.option("--json", "as_json", is_flag=True)
def reproduce(spec_arg: str, version: int, as_json: bool) -> None:
    """Retrain a version from its recorded partitions, spec and seed; exit 0 only if exact."""
    from mlops import lineage as lin
    from mlops import registry

    s, lake, uri = _context(spec_arg)
    try:
        r = lin.reproduce(s, lake, uri, version)
    except (registry.RegistryError, FileNotFoundError) as e:
        _fail(f"reproduce: {e}")
    text = "\n".join(
        [
            f"{r['model']} v{r['version']} ({r['estimator']}) retrained from its recorded inputs:",
            f"  spec hash matches        {r['spec_hash_matches']}",
            f"  input partitions same    {r['inputs_unchanged']} {r['changed_inputs'] or ''}".rstrip(),
            f"  training set hash same   {r['training_set_hash_matches']}",
            f"  test predictions equal   {r['predictions_equal']} ({r['test_rows']} rows, "
            f"max |diff| {r['max_abs_difference']:.3g})",
            f"  exact                    {r['exact']}",
        ]
    )
    _print(r, as_json, text)
    if not r["exact"]:
        sys.exit(1)


# Labels from the field ---------------------------------------------------------------------


@main.group()
def labels() -> None:
    """Active learning with a CSV: export readings worth labelling, import the labels."""


@labels.command("export")
@SPEC_OPTION
@click.option("--day", required=True, help="the readings' day (YYYY-MM-DD), scored already")
@click.option(
    "--strategy",
    type=click.Choice(["uncertainty", "random"]),
    default="uncertainty",
    show_default=True,
    help="uncertainty: the scores nearest the decision threshold; random: a seeded sample",
)
@click.option("--n", "n", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="for --strategy random")
@click.option("--out", "out_path", required=True, help="the CSV to write")
def labels_export(spec_arg: str, day: str, strategy: str, n: int, seed: int, out_path: str) -> None:
    """Write the day's readings most worth labelling (not labelled yet), with their features
    and score and an empty `label` column to fill in."""
    from mlops import feedback

    s, lake, _ = _context(spec_arg)
    try:
        dt.date.fromisoformat(day)
        frame, source = feedback.export_day(s, lake, day, strategy, n, seed)
    except ValueError as e:
        _fail(f"labels export: {e}")
    frame.write_csv(out_path)
    click.echo(
        f"wrote {frame.height} reading(s) of {day} ({strategy}, scores from {source}) to "
        f"{out_path}: fill in the label column, then `mlops labels import {out_path}`"
    )


@labels.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--spec", "spec_arg", default=None, help="spec name or path (default: the CSV's spec column)"
)
def labels_import(path: str, spec_arg: str | None) -> None:
    """Land a filled-in export as field feedback (rows with an empty label are skipped); the
    feedback sensor then relabels the days it names."""
    import polars as pl

    from mlops import feedback

    try:
        frame = pl.read_csv(path, infer_schema=False)  # every column as text: checked below
    except (pl.exceptions.PolarsError, OSError) as e:
        _fail(f"labels import: {path} is not a readable CSV: {e}")
    names = frame["spec"].unique().to_list() if "spec" in frame.columns else []
    if spec_arg is None:
        if len(names) != 1:
            _fail(f"labels import: {path} names no single spec (spec column: {names}); pass --spec")
        spec_arg = names[0]
    s, _, _ = _context(spec_arg)
    if names and names != [s.name]:
        _fail(f"labels import: {path} holds readings of {names}, not of spec {s.name}")
    try:
        items, skipped = feedback.import_rows(s, frame, path)
    except feedback.FeedbackError as e:
        lines = [f"  row {p['record']}: {p['field']}: {p['reason']}" for p in e.problems[:20]]
        _fail("\n".join([f"labels import: {e}", *lines]))
    writer = feedback.FeedbackWriter(feedback.feedback_dir(s.name))
    try:
        writer.append(items, "import")
    finally:
        writer.close()
    click.echo(
        f"recorded {len(items)} label(s) for {s.name} in {feedback.feedback_dir(s.name)} "
        f"({skipped} row(s) without a label skipped)"
    )


# Feature store ---------------------------------------------------------------------------


@main.group()
def features() -> None:
    """Point-in-time feature retrieval and the online store."""


@features.command("historical")
@SPEC_OPTION
@click.option(
    "--entities",
    "entities_path",
    required=True,
    type=click.Path(exists=True),
    help="CSV or Parquet of (entity, timestamp) rows, named as in the spec",
)
@click.option("--out", "out_path", default=None, help="write Parquet (or .csv) here")
def features_historical(spec_arg: str, entities_path: str, out_path: str | None) -> None:
    """Each row's features as of its timestamp (point in time), from the lake."""
    import polars as pl

    from mlops.features import historical_features

    s, lake, _ = _context(spec_arg)
    src = Path(entities_path)
    points = (
        pl.read_parquet(src) if src.suffix == ".parquet" else pl.read_csv(src, try_parse_dates=True)
    )
    ts = s.source.timestamp_column
    if ts in points.columns and points.schema[ts] == pl.String:
        points = points.with_columns(pl.col(ts).str.to_datetime())
    try:
        out = historical_features(s, lake, points)
    except ValueError as e:
        _fail(f"features historical: {e}")
    found = out.filter(pl.col("feature_time").is_not_null()).height
    if out_path:
        (out.write_csv if out_path.endswith(".csv") else out.write_parquet)(out_path)
        click.echo(f"wrote {out.height} rows ({found} with features) to {out_path}")
    else:
        click.echo(out)


@features.command("online-stats")
@SPEC_OPTION
def features_online_stats(spec_arg: str) -> None:
    """Entities, bytes and the oldest as-of time in the online store."""
    from mlops import config
    from mlops.online_store import StoreUnavailable, make_store

    s, _, _ = _context(spec_arg)
    url = config.online_store_url()
    try:
        store = make_store(url)
        st = store.stats(s.name)
        store.close()
    except (StoreUnavailable, ValueError) as e:
        _fail(f"features online-stats: {e}")
    click.echo(f"online store {url.split('@')[-1]} for {s.name}:")
    click.echo(f"  entities     {st.entities}")
    click.echo(f"  bytes        {st.bytes}")
    click.echo(f"  oldest as-of {st.oldest_as_of}")
    click.echo(f"  newest as-of {st.newest_as_of}")


@main.command()
@SPEC_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="uvicorn workers"
)
@click.option(
    "--mode",
    type=click.Choice(["champion", "shadow", "canary", "bandit"]),
    default="champion",
    show_default=True,
    help="shadow: also score the challenger and log it; canary: route a fraction to it; "
    "bandit: route by Thompson sampling on the feedback reward",
)
@click.option(
    "--canary-fraction",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="share of requests the challenger answers in canary mode",
)
@click.option(
    "--bandit-floor",
    type=click.FloatRange(0, 0.5),
    default=0.05,
    show_default=True,
    help="bandit mode: the least share of requests each arm gets (exploration floor)",
)
@click.option(
    "--bandit-reward",
    default="tp=1,tn=1,fp=0,fn=0",
    show_default=True,
    help="bandit mode, binary classification: the reward in [0, 1] of each labelled decision",
)
@click.option(
    "--bandit-tolerance",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="bandit mode, regression: a prediction within this of the label rewards 1 (required)",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="seconds between checks of the registry aliases (hot swap)",
)
@click.option(
    "--log-dir",
    default=None,
    help="request log base folder; the spec's files go to <log-dir>/<spec>/ "
    "(default: $MLOPS_INFERENCE_LOG_DIR, else .mlops/inference_log)",
)
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1_000_000, show_default=True)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="most readings in one request",
)
@click.option(
    "--max-future",
    type=click.FloatRange(min=0),
    default=86_400.0,
    show_default=True,
    help="seconds a reading may be ahead of the server's clock; further ahead is a 422 "
    "(raise it to replay data dated in the future)",
)
@click.option(
    "--load-retry",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="seconds before retrying a version whose artifacts or registry were unreachable",
)
@click.option(
    "--load-retry-max",
    type=click.FloatRange(min=0.01),
    default=60.0,
    show_default=True,
    help="the retry delay doubles up to this many seconds",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="threads per worker that run the requests' work (the event loop never blocks)",
)
@click.option(
    "--max-inflight",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="/predict requests a worker admits at once (running or waiting for a thread); "
    "one more is answered 503 with Retry-After at once",
)
@click.option(
    "--microbatch-max-size",
    type=click.IntRange(1, 1000),
    default=32,
    show_default=True,
    help="requests waiting for a thread are served together as one vectorized batch of at "
    "most this many (1: one request at a time)",
)
@click.option(
    "--microbatch-max-wait-ms",
    type=click.FloatRange(0, 1000),
    default=2.0,
    show_default=True,
    help="a thread that finds fewer requests than the last batches held waits up to this "
    "long (from the first one's arrival) for more",
)
def serve(
    spec_arg: str,
    host: str,
    port: int,
    workers: int,
    mode: str,
    canary_fraction: float,
    bandit_floor: float,
    bandit_reward: str,
    bandit_tolerance: float | None,
    poll_interval: float,
    log_dir: str | None,
    max_body_bytes: int,
    max_batch: int,
    max_future: float,
    load_retry: float,
    load_retry_max: float,
    threads: int,
    max_inflight: int,
    microbatch_max_size: int,
    microbatch_max_wait_ms: float,
) -> None:
    """Serve models:/<name>@champion over HTTP: POST /predict, /health/*, /model, /metrics."""
    from mlops import config
    from mlops.inference_log import inference_log_dir
    from serving.server import run
    from serving.settings import ServeSettings

    s = _load(str(config.spec_path(spec_arg)))
    folder = Path(log_dir) / s.name if log_dir else inference_log_dir(s.name)
    reward = _reward_table(bandit_reward)
    if mode == "bandit" and s.model.task == "regression" and bandit_tolerance is None:
        _fail("serve: --mode bandit on a regression model needs --bandit-tolerance (how close "
              "a prediction must be to the technician's label to count as right)")  # fmt: skip
    settings = ServeSettings(
        spec_path=str(s.path),
        tracking_uri=config.mlflow_tracking_uri(),
        store_url=config.online_store_url(),
        log_dir=str(folder.resolve()),
        mode=mode,  # type: ignore[arg-type]
        canary_fraction=canary_fraction,
        bandit_floor=bandit_floor,
        **{f"bandit_reward_{k}": v for k, v in reward.items()},
        bandit_tolerance=bandit_tolerance,
        poll_interval_s=poll_interval,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        max_future_s=max_future,
        load_retry_s=load_retry,
        load_retry_max_s=max(load_retry, load_retry_max),
        threads=threads,
        max_inflight=max_inflight,
        microbatch_max_size=microbatch_max_size,
        microbatch_max_wait_ms=microbatch_max_wait_ms,
    )
    click.echo(
        f"serving {s.registered_model_name}@champion ({mode}) on http://{host}:{port} with "
        f"{workers} worker(s); request log in {folder}",
        err=True,
    )
    run(settings, host=host, port=port, workers=workers)


def _reward_table(text: str) -> dict[str, float]:
    """`tp=1,tn=1,fp=0,fn=0` -> {tp: 1.0, ...}; a wrong key or value says which."""
    out = {"tp": 1.0, "tn": 1.0, "fp": 0.0, "fn": 0.0}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if key.strip() not in out or not 0.0 <= v <= 1.0:
            _fail(f"serve: --bandit-reward {part!r}: give tp, tn, fp or fn = a number in [0, 1]")
        out[key.strip()] = v
    return out


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind")
@click.option("--port", type=click.IntRange(0, 65535), default=9108, show_default=True)
@click.option(
    "--spec",
    "spec_args",
    multiple=True,
    help="spec name or path (repeatable; default: every spec in the specs folder)",
)
def exporter(host: str, port: int, spec_args: tuple[str, ...]) -> None:
    """Serve the pipeline's state as Prometheus metrics on /metrics: per spec champion, drift,
    realized metric, freshness, quarantine, retrainings and failed runs."""
    import os

    from mlops import config
    from mlops.spec import find_specs

    os.environ.setdefault("DAGSTER_HOME", str(config.PROJECT_ROOT / ".mlops" / "dagster"))
    from orchestration import exporter as ex

    if spec_args:
        specs = [_load(str(config.spec_path(a))) for a in spec_args]
    else:
        try:
            specs = find_specs(config.specs_dir())
        except SpecError as e:
            _fail(f"spec check failed: {e}")
    if not specs:
        _fail(f"no spec in {config.specs_dir()}: give --spec or set MLOPS_SPECS_DIR")
    collector = ex.PipelineCollector(
        specs, config.lake_url(), config.mlflow_tracking_uri(), os.environ["DAGSTER_HOME"]
    )
    names = ", ".join(s.name for s in specs)
    click.echo(f"exporting {names} on http://{host}:{port}/metrics", err=True)
    ex.serve(collector, host, port)


def _landing_dirs(s) -> list[Path]:
    dirs = [s.landing_dir]
    if s.labels.events is not None:
        dirs.append(s.resolve(s.labels.events.path))
    return dirs


if __name__ == "__main__":
    main()
