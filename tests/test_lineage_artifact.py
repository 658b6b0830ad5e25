"""A version's input data versions live in its run's lineage artifact, not in one tag each.

The run and the version carry one digest tag (and a partition count); the mapping
{asset: {partition: content hash}} is the `data_versions` of lineage/lineage.json. These tests
register versions the way training does (registry.lineage_tags and the artifact), plus one the
way versions were registered before (one tag per partition), in a real SQLite registry with a
local artifact store, and read them back through both readers: the direct SQLite one (which
reads the artifact from disk, without MLflow) and MlflowClient.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from mlops import lineage, registry
from mlops.lake import Lake
from mlops.registry_reader import (
    ClientRegistry,
    SqliteRegistry,
    VersionInfo,
    local_folder,
    open_registry,
    sqlite_path,
)
from mlops.spec import Spec, load_spec
from tests.conftest import REPO, fresh_python, mlflow_db

NAME = "machine_failure"
WINDOW = [f"2026-01-{d:02d}" for d in range(1, 15)]  # 14 training days
LOOKBACK = "2025-12-31"  # a features partition the window's first day reads, not in the window
LEGACY_ONLY = "2025-12-30"  # a partition only the legacy version used


def _hash(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def _versions(days: list[str]) -> dict[str, dict[str, str]]:
    return {
        "features": {d: _hash("features", d) for d in [LOOKBACK, *days]},
        "labels": {d: _hash("labels", d) for d in days},
    }


def _lineage(days: list[str]) -> dict:
    return {
        "spec_name": NAME,
        "spec_hash": "s" * 64,
        "dagster_run_id": "run-1",
        "dagster_run_url": "http://dagster/runs/run-1",
        "training_partitions": days,
        "training_set_hash": "t" * 64,
        "data_versions": _versions(days),
        "code_version": "abc123",
        "seed": 7,
        "trials": 3,
        "trigger": "schedule",
        "trigger_reason": "weekly",
        "trigger_day": days[-1],
    }


@dataclass
class World:
    root: Path
    uri: str
    spec: Spec
    lake: Lake
    model: str
    runs: dict[int, str]  # version -> its training run
    lineages: dict[int, dict]


def _register(c, exp_id: str, model: str, lin: dict, legacy: bool) -> tuple[int, str]:
    """A version as training registers it (digest tag + artifact) or as it did before the
    digest (one tag per partition, and the same artifact: older runs logged it too)."""
    if legacy:
        tags = {f"{registry.TAG}{k}": registry._tag_value(lin[k]) for k in registry.LINEAGE_TAGS}
        for asset, parts in lin["data_versions"].items():
            for part, h in parts.items():
                tags[f"{registry.LEGACY_DATA_VERSION_TAG}{asset}.{part}"] = h
    else:
        tags = registry.lineage_tags(lin)
    run = c.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    if not legacy:
        c.log_dict(run_id, lin, registry.LINEAGE_ARTIFACT)
    mv = c.create_model_version(
        model,
        source=f"{run.info.artifact_uri}/model",
        run_id=run_id,
        tags={**tags, f"{registry.TAG}mlflow_run_id": run_id, f"{registry.TAG}estimator": "lr"},
    )
    return int(mv.version), run_id


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("lineage_artifact")
    (root / "specs").mkdir()
    shutil.copy(REPO / "specs" / f"{NAME}.yaml", root / "specs" / f"{NAME}.yaml")
    spec = load_spec(root / "specs" / f"{NAME}.yaml")
    uri = mlflow_db(root)
    c = registry.client(uri)
    exp_id = c.create_experiment(NAME, artifact_location=(root / "mlartifacts").as_uri())
    model = spec.registered_model_name
    c.create_registered_model(model)
    runs, lineages = {}, {}
    # v1: the old way (tags only), trained on one more day; v2, v3: the new way.
    for days, legacy in (([LEGACY_ONLY, *WINDOW[:-1]], True), (WINDOW, False), (WINDOW, False)):
        lin = _lineage(days)
        v, runs[v] = _register(c, exp_id, model, lin, legacy)
        lineages[v] = lin
    c.set_registered_model_alias(model, "champion", "2")
    return World(root, uri, spec, Lake(str(root / "lake")), model, runs, lineages)


def _readers(world: World):
    yield open_registry(world.uri)
    yield ClientRegistry(world.uri)


def test_a_new_version_carries_a_digest_not_one_tag_per_partition(world) -> None:
    tags = registry.version_tags(world.uri, world.model, 2)
    assert not [k for k in tags if "data_version." in k]
    assert [k for k in tags if "digest" in k] == [registry.DATA_VERSIONS_DIGEST_TAG]
    assert tags[registry.DATA_PARTITIONS_TAG] == str(15 + 14)
    assert len(tags) <= 25, sorted(tags)
    # The digest is the sha256 of the mapping's canonical JSON.
    text = json.dumps(world.lineages[2]["data_versions"], sort_keys=True, separators=(",", ":"))
    assert tags[registry.DATA_VERSIONS_DIGEST_TAG] == hashlib.sha256(text.encode()).hexdigest()
    run = registry.client(world.uri).get_run(world.runs[2])
    assert (
        run.data.tags[registry.DATA_VERSIONS_DIGEST_TAG] == tags[registry.DATA_VERSIONS_DIGEST_TAG]
    )
    assert not [k for k in run.data.tags if "data_version." in k]
    # The legacy version really is the old layout: the test below reads both.
    legacy = registry.version_tags(world.uri, world.model, 1)
    assert len([k for k in legacy if k.startswith(registry.LEGACY_DATA_VERSION_TAG)]) == 29
    assert registry.DATA_VERSIONS_DIGEST_TAG not in legacy


def test_the_digest_follows_the_content_not_the_key_order() -> None:
    a = _versions(WINDOW)
    shuffled = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(a.items()))}
    assert registry.data_versions_digest(a) == registry.data_versions_digest(shuffled)
    b = json.loads(json.dumps(a))
    b["labels"][WINDOW[3]] = "0" * 64
    assert registry.data_versions_digest(a) != registry.data_versions_digest(b)


def test_every_reader_gives_each_version_its_recorded_data_versions(world) -> None:
    for reader in _readers(world):
        with reader as reg:
            got = {v.version: reg.data_versions(v) for v in reg.versions(world.model)}
        assert got == {v: lin["data_versions"] for v, lin in world.lineages.items()}, reader
    for v, lin in world.lineages.items():
        through_mlflow = registry.version_lineage(world.uri, world.model, v)
        assert through_mlflow["data_versions"] == lin["data_versions"]
        assert through_mlflow["data_partitions"] == 15 + 14
        assert through_mlflow["training_partitions"] == lin["training_partitions"]


def test_tags_alone_name_the_digest_and_leave_the_mapping_out() -> None:
    """A caller that reads a new version's tags without its artifact cannot take it for a
    version that used no data: "data_versions" is absent, not empty."""
    tags = registry.lineage_tags(_lineage(WINDOW))
    lin = registry.lineage_from_tags(tags)
    assert "data_versions" not in lin and lin["data_partitions"] == 29
    assert lin["data_versions_digest"] == registry.data_versions_digest(_versions(WINDOW))
    assert registry.lineage_from_tags(tags, _versions(WINDOW))["data_versions"] == _versions(WINDOW)
    assert registry.lineage_from_tags({f"{registry.TAG}seed": "1"})["data_versions"] == {}


@pytest.mark.parametrize("kind", ["sqlite", "client"])
@pytest.mark.parametrize(
    "partition,expected",
    [
        (LOOKBACK, {1: ["features"], 2: ["features"], 3: ["features"]}),
        (WINDOW[-1], {2: ["features", "labels"], 3: ["features", "labels"]}),
        (LEGACY_ONLY, {1: ["features", "labels"]}),
        ("2027-01-01", {}),
    ],
)
def test_impact_finds_versions_by_a_partition_in_their_artifact_or_legacy_tags(
    world, kind, partition, expected
) -> None:
    reg = open_registry(world.uri) if kind == "sqlite" else ClientRegistry(world.uri)
    assert isinstance(reg, SqliteRegistry if kind == "sqlite" else ClientRegistry)
    if partition == LOOKBACK:  # only the artifact names it for v2 and v3: no tag holds it
        for v in (2, 3):
            tags = registry.version_tags(world.uri, world.model, v)
            assert not [k for k, val in tags.items() if LOOKBACK in k or LOOKBACK in val]
    with reg:
        found = lineage.impact(world.spec, world.lake, reg, partition)
    assert {v["version"]: v["assets"] for v in found["model_versions"]} == expected
    aliases = {v["version"]: v["aliases"] for v in found["model_versions"]}
    assert all(aliases[v] == (["champion"] if v == 2 else []) for v in expected)


def test_lineage_cli_prints_the_artifacts_data_versions(world, monkeypatch) -> None:
    monkeypatch.setenv("MLOPS_SPECS_DIR", str(world.root / "specs"))
    monkeypatch.setenv("MLOPS_LAKE_URL", str(world.lake.base_url))
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", world.uri)
    runner = CliRunner()
    for v in (1, 2):
        out = runner.invoke(main, ["lineage", "--spec", NAME, "--version", str(v), "--json"])
        assert out.exit_code == 0, out.output
        d = json.loads(out.output)
        assert d["data_versions"] == world.lineages[v]["data_versions"]
        # Nothing in the (empty) lake: every recorded partition is missing now.
        assert len(d["data_changed_since"]) == 29
        assert (d["data_versions_digest"] is None) == (v == 1)
    text = runner.invoke(main, ["lineage", "--spec", NAME, "--version", "2"]).output
    assert f"features/{LOOKBACK}  {_hash('features', LOOKBACK)[:16]}" in text


def test_mlops_impact_reads_the_artifacts_without_mlflow(world) -> None:
    """`mlops impact` in a fresh interpreter: the SQLite registry and the local artifacts read
    directly, mlflow never imported, the same answer as through MlflowClient."""
    probe = (
        "import json, sys\n"
        "from cli.main import main\n"
        "try:\n"
        f"    main(['impact', '--spec', '{NAME}', '--partition', '{LOOKBACK}', '--json'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('mlflow', 'sqlalchemy', 'alembic', 'dagster'))))\n"
    )
    env = {
        "MLOPS_SPECS_DIR": str(world.root / "specs"),
        "MLOPS_LAKE_URL": str(world.lake.base_url),
        "MLOPS_MLFLOW_TRACKING_URI": world.uri,
    }
    *body, loaded = fresh_python(probe, env).strip().splitlines()
    assert json.loads(loaded) == []
    got = json.loads("\n".join(body))
    with ClientRegistry(world.uri) as reg:
        expected = lineage.impact(world.spec, world.lake, reg, LOOKBACK)
    assert got == json.loads(json.dumps(expected)) and len(got["model_versions"]) == 3


def _copy(world: World, tmp_path: Path) -> str:
    """The registry file copied (its artifacts stay where the runs say)."""
    path = sqlite_path(world.uri)
    assert path is not None
    shutil.copy(path, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _artifact(world: World, v: int) -> Path:
    run = registry.client(world.uri).get_run(world.runs[v])
    folder = local_folder(run.info.artifact_uri)
    assert folder is not None
    return folder / registry.LINEAGE_ARTIFACT


@pytest.mark.parametrize("kind", ["sqlite", "client"])
def test_an_artifact_changed_or_lost_after_registration_is_an_error(
    world, kind, monkeypatch
) -> None:
    path = _artifact(world, 3)
    original = path.read_text()
    doc = json.loads(original)
    doc["data_versions"]["labels"][WINDOW[0]] = "0" * 64
    try:
        path.write_text(json.dumps(doc))
        reg = open_registry(world.uri) if kind == "sqlite" else ClientRegistry(world.uri)
        with reg, pytest.raises(registry.RegistryError, match="changed after"):
            lineage.impact(world.spec, world.lake, reg, WINDOW[0])
        if kind == "sqlite":  # the CLI says so, without a traceback
            monkeypatch.setenv("MLOPS_SPECS_DIR", str(world.root / "specs"))
            monkeypatch.setenv("MLOPS_LAKE_URL", str(world.lake.base_url))
            monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", world.uri)
            args = ["impact", "--spec", NAME, "--partition", WINDOW[0]]
            out = CliRunner().invoke(main, args)
            assert out.exit_code == 1 and out.exc_info[0] is SystemExit
            assert "impact: " in out.output and "changed after" in out.output
        path.unlink()
        reg = open_registry(world.uri) if kind == "sqlite" else ClientRegistry(world.uri)
        with reg, pytest.raises(registry.RegistryError, match="lineage"):
            lineage.impact(world.spec, world.lake, reg, WINDOW[0])
    finally:
        path.write_text(original)


def test_an_artifact_store_elsewhere_is_read_through_mlflow(world, tmp_path, monkeypatch) -> None:
    """The fast reader reads from disk only what is on disk: a run whose artifacts are on the
    server (mlflow-artifacts:/) or S3 is asked of MLflow, with the run and the digest."""
    uri = _copy(world, tmp_path)
    conn = sqlite3.connect(sqlite_path(uri))
    with conn:
        conn.execute(
            "UPDATE runs SET artifact_uri = 's3://bucket/x/' || run_uuid WHERE run_uuid = ?",
            (world.runs[2],),
        )
    conn.close()
    asked = []

    def from_mlflow(tracking_uri: str, run_id: str | None, digest: str) -> dict:
        asked.append((tracking_uri, run_id, digest))
        return world.lineages[2]["data_versions"]

    monkeypatch.setattr(registry, "load_data_versions", from_mlflow)
    with open_registry(uri) as reg:
        assert isinstance(reg, SqliteRegistry)
        got = {v.version: reg.data_versions(v) for v in reg.versions(world.model)}
    assert got == {v: lin["data_versions"] for v, lin in world.lineages.items()}
    digest = registry.version_tags(world.uri, world.model, 2)[registry.DATA_VERSIONS_DIGEST_TAG]
    assert asked == [(uri, world.runs[2], digest)]


def test_local_folder_knows_paths_and_file_uris_only() -> None:
    assert local_folder("file:///srv/a%20b/artifacts") == Path("/srv/a b/artifacts")
    assert local_folder("file://localhost/srv/x") == Path("/srv/x")
    assert local_folder("/srv/x") == Path("/srv/x") and local_folder("rel/x") == Path("rel/x")
    for remote in ("s3://b/x", "mlflow-artifacts:/1/x", "file://host/x", "gs://b/x"):
        assert local_folder(remote) is None


def test_a_version_without_data_versions_reads_as_none_recorded() -> None:
    v = VersionInfo(5, "r", 0, {f"{registry.TAG}seed": "1"})
    with ClientRegistry("sqlite:///unused.db") as reg:  # answered from the tags: no I/O
        assert reg.data_versions(v) == {}
