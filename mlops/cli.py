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
    from mlops import generate as gen

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


def _landing_dirs(s) -> list[Path]:
    dirs = [s.landing_dir]
    if s.labels.events is not None:
        dirs.append(s.resolve(s.labels.events.path))
    return dirs


if __name__ == "__main__":
    main()
