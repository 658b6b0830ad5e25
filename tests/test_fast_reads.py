"""The CLI's direct reads of the instance and the registry answer what the APIs answer.

`mlops status`, `history`, `lineage` and `impact` read the default profile's SQLite files
without importing Dagster or MLflow (orchestration/run_records.py, mlops/registry_reader.py).
Each reader is compared with the API it stands in for, on a real instance and a real registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from mlops.registry_reader import ClientRegistry, SqliteRegistry, open_registry
from orchestration.instance import write_default_instance
from orchestration.run_records import (
    InstanceRuns,
    RunRecord,
    SqliteRuns,
    default_storage_file,
    open_runs,
)
from tests.conftest import fresh_python

SPEC_TAG = "mlops/spec"


@dg.op
def _ok() -> None:
    pass


@dg.op
def _boom() -> None:
    raise RuntimeError("boom")


demo_training_job = dg.GraphDefinition(name="demo_training_job", node_defs=[_ok]).to_job()
demo_data_job = dg.GraphDefinition(name="demo_data_job", node_defs=[_boom]).to_job()


@pytest.fixture(scope="module")
def instance_home(tmp_path_factory) -> tuple[Path, dg.DagsterInstance]:
    home = tmp_path_factory.mktemp("dagster_home")
    write_default_instance(home)
    instance = dg.DagsterInstance.from_config(str(home))
    for i in range(3):
        demo_training_job.execute_in_process(
            instance=instance,
            tags={
                SPEC_TAG: "demo",
                "mlops/trigger": "drift",
                "mlops/partition": f"2026-01-0{i + 1}",
            },
        )
    demo_data_job.execute_in_process(
        instance=instance,
        tags={SPEC_TAG: "demo", "dagster/partition": "2026-01-04"},
        raise_on_error=False,
    )
    demo_training_job.execute_in_process(instance=instance, tags={SPEC_TAG: "other"})
    instance.create_run_for_job(
        demo_training_job, status=dg.DagsterRunStatus.STARTED, tags={SPEC_TAG: "demo", "k": "v"}
    )
    yield home, instance
    instance.dispose()


FILTERS = [
    {},
    {"job_name": "demo_training_job"},
    {"job_name": "demo_training_job", "tags": {SPEC_TAG: "demo"}},
    {"tags": {SPEC_TAG: "demo", "mlops/trigger": "drift"}},
    {"statuses": ["FAILURE"]},
    {"statuses": ["QUEUED", "STARTED"]},
    {"job_name": "demo_training_job", "limit": 2},
    {"job_name": "no_such_job"},
    {"tags": {SPEC_TAG: "nobody"}},
]


@pytest.mark.parametrize("filters", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_sqlite_runs_answer_as_the_instance_does(instance_home, filters) -> None:
    home, instance = instance_home
    path = default_storage_file(home)
    assert path == home / "history" / "runs.db" and path.exists()
    direct = SqliteRuns(path)
    try:
        got = direct.runs(**filters)
    finally:
        direct.close()
    expected = InstanceRuns(instance).runs(**filters)
    assert got == expected
    if filters == {}:
        assert len(got) == 6 and all(isinstance(r, RunRecord) for r in got)
        assert {r.status for r in got} == {"SUCCESS", "FAILURE", "STARTED"}
        assert got[0].status == "STARTED" and got[0].tags["k"] == "v"  # newest first


def test_open_runs_reads_the_default_file_and_leaves_other_storages_to_dagster(tmp_path) -> None:
    home = tmp_path / "home"
    write_default_instance(home)
    reader, handle = open_runs(home)  # no runs yet: the file does not exist, nothing created
    assert isinstance(reader, SqliteRuns) and reader.runs() == []
    handle.close()
    assert not (home / "history").exists()
    (home / "dagster.yaml").write_text("storage:\n  sqlite:\n    base_dir: /srv/dagster\n")
    assert default_storage_file(home) == Path("/srv/dagster/history/runs.db")
    (home / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url: postgresql://127.0.0.1/x\n"
    )
    assert default_storage_file(home) is None
    (home / "dagster.yaml").write_text("run_storage:\n  module: x\n  class: Y\n")
    assert default_storage_file(home) is None


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory) -> str:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("m")
    for i in range(4):
        c.create_model_version(
            "m", source=f"{root}/artifacts/{i}", tags={"mlops.seed": str(i), "mlops.n": "x" * i}
        )
    c.set_registered_model_alias("m", "champion", "2")
    c.set_registered_model_alias("m", "challenger", "3")
    c.set_registered_model_alias("m", "old", "1")
    c.delete_registered_model_alias("m", "old")
    c.delete_model_version("m", "4")
    c.set_model_version_tag("m", "3", "mlops.promotion", "refused: strict gate")
    c.create_registered_model("other")
    c.create_model_version("other", source=f"{root}/artifacts/o")
    return uri


def test_sqlite_registry_answers_as_mlflow_does(registry_uri) -> None:
    direct = open_registry(registry_uri)
    assert isinstance(direct, SqliteRegistry)
    client = ClientRegistry(registry_uri)
    try:
        for name in ("m", "other", "no_such_model"):
            assert direct.versions(name) == client.versions(name)
            for alias in ("champion", "challenger", "old", "nope"):
                assert direct.alias_version(name, alias) == client.alias_version(name, alias)
        versions = direct.versions("m")
        assert [v.version for v in versions] == [1, 2, 3]  # v4 deleted
        assert versions[2].tags["mlops.promotion"] == "refused: strict gate"
        assert versions[1].aliases == ["champion"] and versions[0].aliases == []
    finally:
        direct.close()


def test_a_missing_registry_file_is_empty_and_is_not_created(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    reg = open_registry(uri)
    assert reg.versions("m") == [] and reg.alias_version("m", "champion") is None
    reg.close()
    assert not (tmp_path / "none.db").exists()


HEAVY = ("dagster", "mlflow", "sqlalchemy", "alembic", "sensors", "assets", "xgboost", "sklearn")


def test_mlops_status_answers_without_dagster_or_mlflow(tmp_path, instance_home) -> None:
    """The verb in a fresh interpreter: the same answer as over the APIs, none of them loaded."""
    from orchestration import status as st
    from tests.conftest import make_project

    p = make_project(tmp_path, with_mlflow=True)
    home, _ = instance_home
    probe = (
        "import json, sys\n"
        "from cli.main import main\n"
        "try:\n"
        "    main(['status', '--spec', 'machine_failure', '--json'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {list(HEAVY)!r})))\n"
    )
    env = {
        "DAGSTER_HOME": str(home),
        "MLOPS_SPECS_DIR": str(tmp_path / "specs"),
        "MLOPS_LAKE_URL": str(p.lake.base_url),
        "MLOPS_MLFLOW_TRACKING_URI": p.tracking_uri,
    }
    out = fresh_python(probe, env)
    *body, loaded = out.strip().splitlines()
    assert json.loads(loaded) == []
    got = json.loads("\n".join(body))
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        expected = st.status(p.spec, InstanceRuns(instance), p.lake, ClientRegistry(p.tracking_uri))
    finally:
        instance.dispose()
    assert got == json.loads(json.dumps(expected, default=str))
