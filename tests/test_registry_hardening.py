"""The registry as untrusted input, against a real MLflow registry (SQLite) and lake.

A module fixture trains two real versions the way the platform does (v1 scikit-learn in
skops, v2 xgboost in JSON) and registers crafted ones next to them: a copy of v1 whose
MLmodel says cloudpickle and whose model.pkl touches a marker file when unpickled, and a
copy of v2 with its model file cut short. Nothing may unpickle the first; rollback and
forced promotion may reach neither. Then: registry outages are not "no champion", the
deployment history loses no concurrent entry, and `mlops history` shows an alias moved in
MLflow directly.
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import pickle
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from cli.main import main
from mlops import model_evaluation, modeling, promotion, registry, training
from mlops.lake import Lake
from mlops.model_loader import (
    ArtifactsUnavailable,
    ModelRefused,
    UnsafeModelFormat,
    load_model,
    verify_servable,
)
from mlops.spec import Spec, load_spec
from tests.conftest import QUIET, REPO, mlflow_db

NAME = "machine_failure"
TS_HASH = "ab" * 32
DAY = "2026-01-05"


class TouchOnUnpickle:
    """Unpickling this calls Path.touch(marker): the stand-in for "runs a command"."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@dataclass
class Registry:
    root: Path
    spec: Spec
    lake: Lake
    uri: str
    frame: pl.DataFrame
    marker: Path
    v: dict[str, int]  # lr, xgb, pickle, truncated, xgb_copy


def _training_set(spec: Spec, n: int = 400) -> pl.DataFrame:
    lay = modeling.layout(spec)
    rng = np.random.default_rng(0)
    cols: dict[str, object] = {c: rng.normal(size=n) for c in lay.numeric}
    for c, cats in lay.categorical.items():
        cols[c] = rng.choice(cats, n)
    df = pl.DataFrame(cols)
    risk = df[lay.numeric[0]].to_numpy() + rng.normal(scale=0.5, size=n)
    return df.with_columns(
        pl.Series(spec.labels.name, (risk > 0.5).astype("int64")),
        pl.Series("split", rng.choice(["train", "valid", "test"], n, p=[0.6, 0.2, 0.2])),
        pl.Series("machine_id", rng.choice(["m1", "m2", "m3"], n)),
        pl.Series(
            spec.source.timestamp_column,
            pl.datetime_range(
                pl.datetime(2026, 1, 5), pl.datetime(2026, 1, 5, 23, 59), "1m", eager=True
            )[:n],
        ),
    )


def _register_dir(uri: str, folder: Path, like: int) -> int:
    """Register `folder` as a new version of NAME through a run's artifacts, with the tags of
    version `like` (so only what the test changed in the files differs)."""
    import mlflow

    c = registry.client(uri)
    with mlflow.start_run(run_name="crafted") as run:
        mlflow.log_artifacts(str(folder), "model")
    mv = c.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
    tags = registry.version_tags(uri, NAME, like)
    registry.tag_version(uri, NAME, int(mv.version), tags)
    return int(mv.version)


def _copy_of(uri: str, version: int, dst: Path) -> Path:
    import mlflow

    registry.client(uri)
    src = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}"))
    shutil.copytree(src, dst)
    (dst / "registered_model_meta").unlink(missing_ok=True)
    return dst


def _edit_mlmodel(folder: Path, edit) -> None:
    path = folder / "MLmodel"
    conf = yaml.safe_load(path.read_text())
    edit(conf)
    path.write_text(yaml.safe_dump(conf, sort_keys=False))


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> Registry:
    root = tmp_path_factory.mktemp("reg")
    data = yaml.safe_load((REPO / "specs" / f"{NAME}.yaml").read_text())
    data["gates"]["thresholds"] = {"roc_auc": 0.5}
    candidates = data["model"]["candidates"]
    for folder, estimators in (
        ("specs", None),
        ("specs_lr", "logistic_regression"),
        ("specs_xgb", "xgboost"),
    ):
        if estimators:
            data["model"]["candidates"] = [c for c in candidates if c["estimator"] == estimators]
        (root / folder).mkdir()
        (root / folder / f"{NAME}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(root / "specs" / f"{NAME}.yaml")
    uri, lake = mlflow_db(root), Lake(str(root / "lake"))
    frame = _training_set(spec)
    lake.write(NAME, "training_set", frame, TS_HASH[:16])
    lake.write(NAME, "features", frame.drop("split", spec.labels.name), DAY)
    arts = str(root / "mlartifacts")
    v: dict[str, int] = {}
    for key in ("lr", "xgb"):
        variant = load_spec(root / f"specs_{key}" / f"{NAME}.yaml")
        lineage = {"training_set_hash": TS_HASH, "training_partitions": [DAY]}
        v[key] = training.train_candidate(variant, frame, lineage, uri, arts, trials=1).version

    # v3: v1's files and metadata, but sklearn serialization_format cloudpickle and a pickle.
    marker = root / "pwned"
    evil = _copy_of(uri, v["lr"], root / "evil")
    (evil / "model.skops").unlink()
    (evil / "model.pkl").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))

    def to_cloudpickle(conf: dict) -> None:
        conf["flavors"]["sklearn"]["serialization_format"] = "cloudpickle"
        conf["flavors"]["sklearn"]["pickled_model"] = "model.pkl"
        conf["flavors"]["python_function"]["model_path"] = "model.pkl"

    _edit_mlmodel(evil, to_cloudpickle)
    v["pickle"] = _register_dir(uri, evil, like=v["lr"])
    # v4: v2 with its model.json cut in half (a partial upload): loads nowhere.
    cut = _copy_of(uri, v["xgb"], root / "cut")
    text = (cut / "model.json").read_bytes()
    (cut / "model.json").write_bytes(text[: len(text) // 2])
    v["truncated"] = _register_dir(uri, cut, like=v["xgb"])
    # v5: an intact copy of v2 that was never champion.
    v["xgb_copy"] = _register_dir(uri, _copy_of(uri, v["xgb"], root / "copy"), like=v["xgb"])
    return Registry(root, spec, lake, uri, frame, marker, v)


@pytest.fixture
def cli(reg, monkeypatch):
    monkeypatch.setenv("MLOPS_SPECS_DIR", str(reg.root / "specs"))
    monkeypatch.setenv("MLOPS_LAKE_URL", str(reg.lake.base_url))
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", reg.uri)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [*args, "--spec", NAME])


def _move(reg: Registry, action: str, to: int) -> None:
    current = registry.alias_version(reg.uri, NAME, registry.CHAMPION)
    registry.move_champion(
        reg.uri, reg.lake, NAME, NAME, registry.Deployment(action, current, to, "test")
    )


def _champion(reg: Registry) -> int | None:
    return registry.alias_version(reg.uri, NAME, registry.CHAMPION)


# 1. Only the formats the platform writes load ------------------------------------------------


def test_the_platform_formats_load_and_score(reg):
    for key in ("lr", "xgb"):
        m = verify_servable(reg.uri, NAME, reg.v[key])
        assert m.version == reg.v[key] and m.input_example is not None
        assert np.isfinite(m.score(reg.frame.head(20))).all()


def test_a_pickle_version_is_refused_before_anything_unpickles_it(reg):
    version = reg.v["pickle"]
    with pytest.raises(UnsafeModelFormat) as e:
        load_model(reg.uri, NAME, version=version)
    assert f"models:/{NAME}/{version}" in str(e.value)
    assert "model.pkl" in str(e.value) or "cloudpickle" in str(e.value)
    assert not reg.marker.exists()
    # Without the stray file, the declared format alone is refused, naming it.
    folder = _copy_of(reg.uri, version, reg.root / "evil_no_file")
    (folder / "model.pkl").rename(folder / "model.skops")
    _edit_mlmodel(folder, lambda c: c["flavors"]["sklearn"].update(pickled_model="model.skops"))
    declared = _register_dir(reg.uri, folder, like=reg.v["lr"])
    with pytest.raises(UnsafeModelFormat, match=rf"models:/{NAME}/{declared}.*cloudpickle"):
        load_model(reg.uri, NAME, version=declared)
    # Declared skops, but the file is the pickle; or a real skops file with a pickle beside it.
    _edit_mlmodel(folder, lambda c: c["flavors"]["sklearn"].update(serialization_format="skops"))
    disguised = _register_dir(reg.uri, folder, like=reg.v["lr"])
    with pytest.raises(UnsafeModelFormat, match=r"declared skops.*it is a pickle"):
        load_model(reg.uri, NAME, version=disguised)
    stray = _copy_of(reg.uri, reg.v["lr"], reg.root / "stray")
    (stray / "extra").mkdir()
    (stray / "extra" / "helper.joblib").write_bytes(pickle.dumps(TouchOnUnpickle(reg.marker)))
    beside = _register_dir(reg.uri, stray, like=reg.v["lr"])
    with pytest.raises(UnsafeModelFormat, match=r"skops\) also holds extra/helper.joblib"):
        load_model(reg.uri, NAME, version=beside)
    assert not reg.marker.exists()


def test_a_skops_file_holding_an_untrusted_type_is_refused(reg, tmp_path):
    """skops trusts what the MLmodel lists; a crafted MLmodel can list anything, so types
    outside scikit-learn/numpy/scipy/xgboost are refused whatever it lists."""
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    folder = _copy_of(reg.uri, reg.v["lr"], tmp_path / "m")
    skops.io.dump(FunctionTransformer(func=os.system), folder / "model.skops")
    untrusted = skops.io.get_untrusted_types(file=folder / "model.skops")
    assert any(t.startswith(("os.", "posix.")) for t in untrusted), untrusted
    _edit_mlmodel(folder, lambda c: c["flavors"]["sklearn"].update(skops_trusted_types=untrusted))
    version = _register_dir(reg.uri, folder, like=reg.v["lr"])
    with pytest.raises(UnsafeModelFormat, match="outside scikit-learn"):
        load_model(reg.uri, NAME, version=version)


def test_the_promotion_gate_and_batch_scoring_refuse_the_pickle_version(reg):
    import dagster as dg

    from orchestration.definitions import build_definitions

    version = reg.v["pickle"]
    gate = promotion.serving_smoke_gate(reg.spec, reg.uri, version)
    assert not gate.passed and "UnsafeModelFormat" not in gate.reason
    assert f"models:/{NAME}/{version}" in gate.reason and "pickle" in gate.reason
    with pytest.raises(UnsafeModelFormat):
        model_evaluation.evaluate_version(reg.spec, reg.lake, reg.uri, version)
    before = _champion(reg)
    registry.set_alias(reg.uri, NAME, registry.CHAMPION, version)  # someone, in MLflow
    try:
        defs = build_definitions(
            reg.root / "specs", str(reg.lake.base_url), reg.uri, str(reg.root / "mlartifacts")
        )
        result = defs.resolve_job_def(f"{NAME}_batch_predictions_job").execute_in_process(
            partition_key=DAY,
            instance=dg.DagsterInstance.ephemeral(),
            run_config=QUIET,
            raise_on_error=False,
        )
    finally:
        if before is None:
            registry.delete_alias(reg.uri, NAME, registry.CHAMPION)
        else:
            registry.set_alias(reg.uri, NAME, registry.CHAMPION, before)
    assert not result.success
    assert not reg.lake.exists(NAME, "batch_predictions", DAY)
    assert not reg.marker.exists()


def test_verify_servable_refuses_a_truncated_model_and_a_missing_example(reg, tmp_path):
    with pytest.raises(ModelRefused, match=rf"models:/{NAME}/{reg.v['truncated']} does not load"):
        verify_servable(reg.uri, NAME, reg.v["truncated"])
    folder = _copy_of(reg.uri, reg.v["xgb"], tmp_path / "m")
    _edit_mlmodel(folder, lambda c: c.pop("saved_input_example_info"))
    version = _register_dir(reg.uri, folder, like=reg.v["xgb"])
    assert load_model(reg.uri, NAME, version=version).input_example is None
    with pytest.raises(ModelRefused, match="no input example"):
        verify_servable(reg.uri, NAME, version)


def test_missing_artifacts_name_the_location_and_the_path(reg, tmp_path):
    folder = _copy_of(reg.uri, reg.v["xgb"], tmp_path / "m")
    version = _register_dir(reg.uri, folder, like=reg.v["xgb"])
    source = registry.client(reg.uri).get_model_version(NAME, str(version)).source
    run_id = source.removeprefix("runs:/").split("/")[0]
    stored = Path(
        registry.client(reg.uri).get_run(run_id).info.artifact_uri.removeprefix("file://")
    )
    (stored / "model" / "model.json").unlink()
    with pytest.raises(ArtifactsUnavailable) as e:
        load_model(reg.uri, NAME, version=version)
    assert source in str(e.value) and "model.json" in str(e.value)
    shutil.rmtree(stored / "model")
    with pytest.raises(ArtifactsUnavailable) as e:
        load_model(reg.uri, NAME, version=version)
    message = str(e.value)
    assert source in message and "No such artifact: ''" not in message, message
    assert "MLmodel" in message and str(stored / "model") in message, message


# 2. Rollback and forced promotion reach only servable former champions -------------------------


def test_rollback_goes_only_to_a_former_champion_that_serves(reg, cli):
    _move(reg, "promote", reg.v["lr"])
    _move(reg, "promote", reg.v["xgb"])
    champion = reg.v["xgb"]
    for args, says in [
        (("--to", str(reg.v["truncated"])), "was never champion"),
        (("--to", str(reg.v["pickle"])), "was never champion"),
        (("--to", str(reg.v["truncated"]), "--force"), "--reason"),
        (("--to", str(reg.v["truncated"]), "--force", "--reason", "incident"), "does not load"),
        (("--to", str(reg.v["pickle"]), "--force", "--reason", "incident"), "cloudpickle"),
    ]:
        out = cli("rollback", *args)
        assert out.exit_code == 1, (args, out.output)
        assert says in out.output and "the champion is unchanged" in out.output, out.output
        assert _champion(reg) == champion
    assert not reg.marker.exists()
    # A former champion that serves: allowed. A never-champion that serves: only forced.
    assert cli("rollback", "--to", str(reg.v["lr"])).exit_code == 0
    assert _champion(reg) == reg.v["lr"]
    out = cli("rollback", "--to", str(reg.v["xgb_copy"]), "--force", "--reason", "incident 7")
    assert out.exit_code == 0, out.output
    assert _champion(reg) == reg.v["xgb_copy"]
    h = registry.deployment_history(reg.lake, NAME)
    assert h.select("action", "from_version", "to_version").rows()[-2:] == [
        ("rollback", reg.v["xgb"], reg.v["lr"]),
        ("force_rollback", reg.v["lr"], reg.v["xgb_copy"]),
    ]
    assert "incident 7" in h["reason"][-1] and "never champion" in h["reason"][-1]
    _move(reg, "promote", reg.v["xgb"])


def test_forced_promotion_still_requires_a_servable_version(reg, cli):
    champion = _champion(reg)
    for key, says in (("pickle", "cloudpickle"), ("truncated", "does not load")):
        out = cli("promote", "--version", str(reg.v[key]), "--force", "--reason", "hurry")
        assert out.exit_code == 1 and says in out.output, out.output
        assert "not even with --force" in out.output
        assert _champion(reg) == champion
    out = cli("promote", "--version", str(reg.v["pickle"]))
    assert out.exit_code == 1 and "cloudpickle" in out.output, out.output
    assert _champion(reg) == champion and not reg.marker.exists()


# 16. An outage is not "no champion" -----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_registry_raises_instead_of_reading_as_no_alias(reg, monkeypatch):
    # Missing model and missing alias are "none", on the real registry.
    assert registry.alias_version(reg.uri, "no_such_model", registry.CHAMPION) is None
    assert registry.alias_version(reg.uri, NAME, "no_such_alias") is None
    assert registry.aliases(reg.uri, "no_such_model") == {}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = f"http://127.0.0.1:{_closed_port()}"
    try:
        with pytest.raises(registry.RegistryError, match="cannot read alias") as e:
            registry.alias_version(down, NAME, registry.CHAMPION)
        assert down in str(e.value)
        with pytest.raises(registry.RegistryError, match="cannot read the aliases"):
            registry.aliases(down, NAME)
        with pytest.raises(ArtifactsUnavailable):
            load_model(down, NAME, alias=registry.CHAMPION)
    finally:
        registry.client(reg.uri)  # client() sets the process-wide tracking URI


# 18. Concurrent appends to the deployment history ---------------------------------------------


@pytest.mark.parametrize("base", ["local", "memory"])
def test_concurrent_history_appends_lose_no_entry(tmp_path, base):
    import uuid

    url = str(tmp_path / "lake") if base == "local" else f"memory://hist-{uuid.uuid4().hex}"
    lake = Lake(url)
    # An existing single-file history (written by earlier versions) still shows, first.
    old = pl.DataFrame(
        [
            {
                "time": dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
                "action": "promote",
                "to_version": 1,
                "reason": "old",
            }
        ],
        schema=registry.history_schema(),
    )
    lake.write("s", registry.HISTORY_ASSET, old)
    n, start = 24, threading.Barrier(24)

    def append(i: int) -> None:
        start.wait()
        registry.record_deployment(lake, "s", registry.Deployment("refused", 1, 100 + i, f"r{i}"))

    threads = [threading.Thread(target=append, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h = registry.deployment_history(lake, "s")
    assert h.height == n + 1
    assert h.row(0, named=True)["reason"] == "old"
    assert sorted(h["to_version"].to_list()[1:]) == [100 + i for i in range(n)]
    assert h["time"].is_sorted()


# 19. Alias moves made directly in MLflow -------------------------------------------------------


def test_history_shows_an_alias_moved_outside_the_platform(reg, cli):
    _move(reg, "promote", reg.v["xgb"])
    out = cli("history")
    assert out.exit_code == 0 and "moved outside" not in out.output, out.output
    registry.client(reg.uri).set_registered_model_alias(
        NAME, registry.CHAMPION, str(reg.v["xgb_copy"])
    )
    out = cli("history")
    assert out.exit_code == 0, out.output
    last = out.output.strip().splitlines()[-1]
    assert "moved outside the platform" in last
    assert f"v{reg.v['xgb']} -> v{reg.v['xgb_copy']}" in last
    registry.client(reg.uri).delete_registered_model_alias(NAME, registry.CHAMPION)
    last = cli("history").output.strip().splitlines()[-1]
    assert "moved outside the platform" in last and "(alias removed)" in last
    _move(reg, "promote", reg.v["xgb"])
