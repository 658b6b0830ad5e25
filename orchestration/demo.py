"""`make demo`: generate 30 days of IoT data, build the graph for them, train, gate and
promote the first champion, and score the last days in batch.

Runs the real jobs of orchestration.definitions against the persistent Dagster instance in
$DAGSTER_HOME (default .mlops/dagster), so `make ui` shows every run, materialization and
check afterwards.
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

from mlops.config import (
    PROJECT_ROOT,
    lake_url,
    mlflow_artifact_root,
    mlflow_tracking_uri,
    online_store_url,
)
from mlops.generate import generate
from mlops.lake import Lake
from mlops.online_store import make_store
from mlops.spec import load_spec
from orchestration.definitions import build_definitions
from orchestration.jobs import (
    batch_predictions_job_name,
    data_job_name,
    training_job_name,
    training_set_job_name,
)

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
    # MLflow's advice about integer columns and dataset sources is for interactive use.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", default=str(PROJECT_ROOT / "specs" / "machine_failure.yaml"))
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--machines", type=int, default=50)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--bad-rows", type=float, default=0.01)
    p.add_argument("--trials", type=int, default=None, help="Optuna trials (default: spec)")
    p.add_argument("--score-days", type=int, default=3, help="last days scored in batch")
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
    _fresh_mlflow(spec.registered_model_name)
    store = make_store(online_store_url())
    store.delete_spec(spec.name)
    store.close()
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

    if not _train_and_promote(defs, instance, spec, args.trials):
        return 1
    scored = days[-args.score_days :]
    batch_job = defs.resolve_job_def(batch_predictions_job_name(spec))
    for day in scored:
        result = batch_job.execute_in_process(
            partition_key=day.isoformat(), instance=instance, run_config=QUIET
        )
        b = _meta(result, "batch_predictions", spec.name)
        print(
            f"  batch {day}: {b['rows']} rows scored by v{b['model_version']}, "
            f"mean risk {b['mean_score']:.3f}, {b['decision_rate']:.1%} flagged"
        )
    print(
        f"\ndone in {time.perf_counter() - t0:.0f} s. See it all: `make ui` "
        f"(http://127.0.0.1:3000, Assets > {spec.name}) and `make mlflow` "
        f"(http://127.0.0.1:5000, Models > {spec.registered_model_name})"
    )
    return 0


def _fresh_mlflow(model_name: str) -> None:
    """The demo regenerates everything, so it starts its MLflow store afresh too."""
    uri = mlflow_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).unlink(missing_ok=True)
        shutil.rmtree(mlflow_artifact_root(), ignore_errors=True)


def _train_and_promote(defs, instance, spec, trials: int) -> bool:
    """Candidate -> evaluation -> gate -> champion, printed as the gate decided it."""
    from mlops import registry

    job = defs.resolve_job_def(training_job_name(spec))
    cfg = {"ops": {f"{spec.name}__candidate_model": {"config": {"trials": trials}}}}
    result = job.execute_in_process(
        instance=instance,
        run_config={**QUIET, **cfg},
        raise_on_error=False,
        asset_selection=[
            dg.AssetKey([spec.name, a])
            for a in ("candidate_model", "model_evaluation", "champion_model")
        ],
    )
    failures = [e for e in result.all_events if e.is_step_failure]
    if failures:
        print(f"training failed: {failures[0].event_specific_data.error.message}", file=sys.stderr)
        return False
    cand = _meta(result, "candidate_model", spec.name)
    ev = _meta(result, "model_evaluation", spec.name)
    print(
        f"\ncandidate v{cand['model_version']}: {cand['estimator']} after {cand['trials']} "
        f"trials (valid {_primary(cand)})"
    )
    for e in result.all_events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION":
            c = e.asset_check_evaluation_data
            print(
                f"  {'PASS' if c.passed else 'FAIL'} {c.asset_check_key.name}: "
                f"{c.metadata['reason'].value}"
            )
    champ = registry.alias_version(
        mlflow_tracking_uri(), spec.registered_model_name, registry.CHAMPION
    )
    print(f"champion: v{champ}" if champ else "no champion: the gate kept it out")
    print(ev["metrics"])
    run = cand["mlflow_run_id"]
    exp = registry.client(mlflow_tracking_uri()).get_run(run).info.experiment_id
    print(f"  MLflow run: http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}")
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
