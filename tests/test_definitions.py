"""The code location as Dagster loads it, the `dagster` CLI on it, and the demo at small scale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from tests.conftest import make_project, small_data

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_definitions_hold_one_graph_per_spec():
    from orchestration.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert keys == {
        f"machine_failure/{a}"
        for a in (
            "landing_files",
            "label_events",
            "raw_data",
            "validated_data",
            "quarantine",
            "labels",
            "features",
            "online_features",
            "training_set",
            "candidate_model",
            "model_evaluation",
            "champion_model",
            "batch_predictions",
            "inference_log",
            "drift_report",
            "model_performance",
        )
    }
    checks = {k.name for k in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {
        "rows_reconcile_check",
        "quarantine_rate_check",
        "thresholds_gate_check",
        "improvement_gate_check",
        "slices_gate_check",
        "serving_smoke_gate_check",
    }
    for job in (
        "training_job",
        "batch_predictions_job",
        "rollback_job",
        "scoring_job",
        "labels_job",
    ):
        assert defs.resolve_job_def(f"machine_failure_{job}")
    assert defs.resolve_job_def("machine_failure_data_job").partitions_def is not None
    assert defs.resolve_job_def("machine_failure_training_set_job")
    graph = defs.resolve_asset_graph()
    features = graph.get(dg.AssetKey(["machine_failure", "features"]))
    assert dg.AssetKey(["machine_failure", "validated_data"]) in features.parent_keys
    labels = graph.get(dg.AssetKey(["machine_failure", "labels"]))
    assert dg.AssetKey(["machine_failure", "label_events"]) in labels.parent_keys
    repo = defs.get_repository_def()
    assert {s.name for s in repo.sensor_defs} == {
        "machine_failure_new_data_sensor",
        "machine_failure_monitoring_sensor",
        "machine_failure_drift_retrain_sensor",
        "machine_failure_metric_decline_sensor",
        "machine_failure_run_failure_sensor",
    }
    schedules = {s.name: s.cron_schedule for s in repo.schedule_defs}
    # No periodic retraining unless the spec names a cron (the embedded one does not).
    assert schedules == {"machine_failure_scoring_schedule": "0 2 * * *"}


def test_two_specs_two_graphs(tmp_path):
    make_project(tmp_path)
    text = (REPO / "specs" / "machine_failure.yaml").read_text()
    (tmp_path / "specs" / "other.yaml").write_text(
        text.replace("name: machine_failure", "name: other_fleet")
    )
    from orchestration.definitions import build_definitions

    defs = build_definitions(tmp_path / "specs", str(tmp_path / "lake"))
    prefixes = {k.path[0] for k in defs.resolve_all_asset_keys()}
    assert prefixes == {"machine_failure", "other_fleet"}
    assert defs.resolve_job_def("other_fleet_data_job")


def test_a_spec_with_an_end_date_has_no_partition_after_it(tmp_path):
    """A finished history (source.end_date): every daily asset and job lists its days, the
    last key is the end date, and the sensor's last partition stops there too. Without an
    end the partitions run on to the last day that has ended."""
    import datetime as dt

    from mlops.watch import last_partition

    text = (REPO / "specs" / "machine_failure.yaml").read_text()
    assert "  start_date: 2026-01-01\n" in text
    make_project(tmp_path, text.replace("  start_date: 2026-01-01\n", _DATES))
    from orchestration.definitions import build_definitions

    defs = build_definitions(tmp_path / "specs", str(tmp_path / "lake"))
    days = [(dt.date(2026, 10, 8) + dt.timedelta(days=i)).isoformat() for i in range(24)]
    graph = defs.resolve_asset_graph()
    daily = [k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def is not None]
    assert dg.AssetKey(["machine_failure", "raw_data"]) in daily
    for key in daily:
        pd = graph.get(key).partitions_def
        assert pd.get_partition_keys() == days, key
        assert pd.get_last_partition_key() == "2026-10-31"
        assert not pd.has_partition_key("2026-11-01")
    job = defs.resolve_job_def("machine_failure_data_job")
    assert job.partitions_def.get_last_partition_key() == "2026-10-31"
    spec = make_project(tmp_path / "open").spec  # the embedded spec: no end
    assert spec.source.end_date is None
    from catalog.partitions import daily_partitions

    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    assert daily_partitions(spec).get_last_partition_key() == yesterday.isoformat()
    landed = make_project(tmp_path / "ended", text.replace("  start_date: 2026-01-01\n", _DATES))
    far = dt.date(2100, 1, 1)
    assert last_partition(landed.spec, far) == dt.date(2026, 10, 31)
    assert last_partition(spec, far) == yesterday


_DATES = "  start_date: 2026-10-08\n  end_date: 2026-10-31\n"  # long before yesterday


def test_the_demos_dated_copy_stands_in_for_the_spec_it_was_made_from(tmp_path):
    """`make demo` writes .mlops/specs/<spec>.yaml, the spec with its partitions beginning on
    the first generated day: the code location loads it instead of specs/<spec>.yaml, with
    the same landing folders and no end, so the new-data sensor builds a day the user drops
    there once it has ended. An edit to the spec, or a copy made from another file, and the
    spec is loaded as written (with a warning)."""
    import datetime as dt
    import shutil

    import pytest

    from demo.generate import generate
    from mlops.spec import load_spec
    from orchestration.backtest import dated_spec
    from orchestration.definitions import build_definitions
    from orchestration.replay import backdate
    from resources.clock import ClockResource
    from resources.lake import LakeResource
    from sensors.new_data import new_data_sensor_name

    p = make_project(tmp_path)
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    first = yesterday - dt.timedelta(days=2)
    copy = dated_spec(p.spec, first)
    assert copy.path == tmp_path.resolve() / ".mlops" / "specs" / "machine_failure.yaml"
    assert copy.source.start_date == first and copy.source.end_date is None
    assert copy.landing_dir == p.spec.landing_dir
    assert copy.labels.events.path == str(p.spec.resolve(p.spec.labels.events.path))
    assert load_spec(p.spec.path).content_hash == p.spec.content_hash  # the spec is untouched

    def first_and_last(defs: dg.Definitions) -> set[tuple[str, str]]:
        graph = defs.resolve_asset_graph()
        daily = [graph.get(k).partitions_def for k in graph.get_all_asset_keys()]
        return {(d.get_first_partition_key(), d.get_last_partition_key()) for d in daily if d}

    defs = build_definitions(tmp_path / "specs", str(tmp_path / "lake"))
    assert first_and_last(defs) == {(first.isoformat(), yesterday.isoformat())}

    # The next day's file, dropped into the landing folder: its day's data run.
    generate(copy, days=1, start=yesterday, machines=2, seed=1)
    backdate(p.spec.landing_dir.iterdir(), p.spec.source.settle_seconds)
    ctx = dg.build_sensor_context(
        instance=p.instance,
        resources={"lake": LakeResource(base_url=str(tmp_path / "lake")), "clock": ClockResource()},
        definitions=defs,
    )
    sensor = defs.get_repository_def().get_sensor_def(new_data_sensor_name(p.spec))
    requests = sensor.evaluate_tick(ctx).run_requests or []
    assert [(r.job_name, r.partition_key) for r in requests] == [
        ("machine_failure_data_job", yesterday.isoformat())
    ]

    # Copied to another project, the copy names a spec file that is not there: not used.
    other = make_project(tmp_path / "other")
    (tmp_path / "other" / ".mlops" / "specs").mkdir(parents=True)
    shutil.copy(copy.path, tmp_path / "other" / ".mlops" / "specs")
    with pytest.warns(UserWarning, match="not `make demo`'s dated copy"):
        moved = build_definitions(tmp_path / "other" / "specs", str(tmp_path / "lake"))
    assert first_and_last(moved) == {("2026-01-01", yesterday.isoformat())}
    assert other.spec.source.start_date == dt.date(2026, 1, 1)

    # The spec edited after the demo: loaded as written, until `make demo` dates it again.
    p.spec.path.write_text(p.spec.path.read_text().replace("trials: 10", "trials: 4"))
    with pytest.warns(UserWarning, match=str(copy.path)):
        edited = build_definitions(tmp_path / "specs", str(tmp_path / "lake"))
    assert first_and_last(edited) == {("2026-01-01", yesterday.isoformat())}


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {
        **os.environ,
        "MLOPS_SPECS_DIR": str(tmp_path / "specs"),
        "MLOPS_LAKE_URL": str(tmp_path / ".mlops" / "lake"),
        "MLOPS_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / '.mlops' / 'mlflow.db'}",
        "MLOPS_MLFLOW_ARTIFACT_ROOT": str(tmp_path / ".mlops" / "mlartifacts"),
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{tmp_path / '.mlops' / 'online.db'}",
        "DAGSTER_HOME": str(home),
    }


def test_dagster_asset_materialize_cli(tmp_path):
    p = make_project(tmp_path)
    small_data(p, days=1, machines=3)
    out = subprocess.run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "orchestration.definitions",
            "--select",
            "machine_failure/raw_data",
            "--partition",
            "2026-01-01",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(tmp_path),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert p.lake.read("machine_failure", "raw_data", "2026-01-01").height == 3 * 24


def test_mlops_generate_cli_is_deterministic(tmp_path):
    p = make_project(tmp_path)
    args = [
        str(BIN / "mlops"),
        "generate",
        "--spec",
        str(tmp_path / "specs/machine_failure.yaml"),
        "--days",
        "2",
        "--machines",
        "3",
        "--seed",
        "5",
        "--bad-rows",
        "0.05",
    ]
    first = subprocess.run(args, capture_output=True, text=True, check=True)
    assert "wrote 2 readings file(s)" in first.stdout
    files = sorted(p.spec.landing_dir.glob("*.csv"))
    content = [f.read_bytes() for f in files]
    subprocess.run([*args, "--clean"], capture_output=True, text=True, check=True)
    assert [f.read_bytes() for f in sorted(p.spec.landing_dir.glob("*.csv"))] == content
    bad = subprocess.run([*args, "--drift", "concept"], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
