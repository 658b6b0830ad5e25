"""`make demo`: generate 30 days of IoT data and build the data half of the graph for them.

Runs the real jobs of orchestration.definitions against the persistent Dagster instance in
$DAGSTER_HOME (default .mlops/dagster), so `make ui` shows every run, materialization and
check afterwards.
"""

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import dagster as dg

from mlops.config import PROJECT_ROOT, lake_url
from mlops.generate import generate
from mlops.lake import Lake
from mlops.spec import load_spec
from orchestration.definitions import build_definitions
from orchestration.jobs import data_job_name, training_set_job_name

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _instance() -> dg.DagsterInstance:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".mlops" / "dagster")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.get()


def _meta(result: dg.ExecuteInProcessResult, asset: str, spec_name: str) -> dict:
    key = dg.AssetKey([spec_name, asset])
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        if mat.asset_key == key:
            return {k: v.value for k, v in mat.metadata.items()}
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default=str(PROJECT_ROOT / "specs" / "machine_failure.yaml"))
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--machines", type=int, default=50)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bad-rows", type=float, default=0.01)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    spec = load_spec(args.spec)
    # A fresh start: the demo's landing files and lake partitions are regenerated whole.
    for folder in (spec.landing_dir, spec.resolve(spec.labels.events.path)):
        for f in folder.glob("*") if folder.exists() else []:
            f.unlink()
    lake = Lake(lake_url())
    spec_folder = f"{lake.root}/{spec.name}"
    if lake.fs.exists(spec_folder):
        lake.fs.rm(spec_folder, recursive=True)
    report = generate(
        spec,
        days=args.days,
        machines=args.machines,
        seed=args.seed,
        bad_rows=args.bad_rows,
        progress=True,
    )
    print(
        f"generated {report.rows} readings, {report.events} failure events, "
        f"{len(report.bad_rows)} bad rows into {spec.landing_dir}"
    )

    defs = build_definitions(Path(args.spec).resolve().parent)
    instance = _instance()
    data_job = defs.resolve_job_def(data_job_name(spec))
    header = f"{'day':<12}{'rows in':>9}{'valid':>9}{'quarant.':>10}{'features':>10}{'labels':>9}"
    print(f"\n{header}  (labels: mature rows; events arrive up to 48 h late)")
    days = [spec.source.start_date + dt.timedelta(days=i) for i in range(args.days)]
    totals = [0, 0, 0, 0]
    for day in days:
        result = data_job.execute_in_process(
            partition_key=day.isoformat(),
            instance=instance,
            run_config=QUIET,
            raise_on_error=False,
        )
        if not result.success:
            print(f"{day}: run {result.run_id} failed; open `make ui` to see why", file=sys.stderr)
            return 1
        v = _meta(result, "validated_data", spec.name)
        f = _meta(result, "features", spec.name)
        lab = _meta(result, "labels", spec.name)
        row = [v["rows_in"], v["rows_valid"], v["rows_quarantined"], f["rows"]]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        print(f"{day!s:<12}{row[0]:>9}{row[1]:>9}{row[2]:>10}{row[3]:>10}{lab['rows_mature']:>9}")
    print(f"{'total':<12}{totals[0]:>9}{totals[1]:>9}{totals[2]:>10}{totals[3]:>10}")

    ts = defs.resolve_job_def(training_set_job_name(spec)).execute_in_process(
        instance=instance, run_config=QUIET, raise_on_error=False
    )
    if not ts.success:
        errors = [
            e.event_specific_data.error.message.removeprefix(
                "dagster._core.definitions.events.Failure: "
            )
            for e in ts.all_events
            if e.is_step_failure
        ]
        print(f"\ntraining set not built: {' '.join(errors).strip()}", file=sys.stderr)
        return 1
    m = _meta(ts, "training_set", spec.name)
    splits = ", ".join(
        f"{k} {v['rows']} ({v['label_mean']:.1%} positive)" for k, v in m["splits"].items()
    )
    print(
        f"\ntraining set: {m['rows']} rows over {len(m['window'])} days "
        f"{m['window'][0]}..{m['window'][-1]}: {splits}"
    )
    print(f"  hash {m['training_set_hash'][:16]}, lake {lake_url()}")
    print(
        f"\ndone in {time.perf_counter() - t0:.0f} s. See it all: `make ui`, then open "
        "http://127.0.0.1:3000 (Assets > machine_failure)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
