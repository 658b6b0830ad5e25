"""From a notebook to production: the notebook run against a small embedded example, and the
spec edit (mlops/spec_edit.py) that turns its result into a change the next training run
picks up. The notebook may log an experiment and edit the spec; it may not register, promote
or move anything, nor write to the lake."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from mlops import registry, spec_edit, training, training_set
from mlops.lake import Lake
from mlops.spec import CandidateSpec, SpecError, load_spec, spec_from_text
from tests.conftest import REPO, embedded_spec_text, make_project, small_data

NOTEBOOK = REPO / "notebooks" / "from_notebook_to_production.ipynb"
NAME = "machine_failure"
EXPERIMENT = f"{NAME}-notebook"
DAYS = 7  # labels mature after 72 h: the first 4 days train, validate and test
RANDOM_FOREST = {
    "estimator": "random_forest",
    "params": {"n_estimators": 50},
    "search_space": {"max_depth": {"type": "int", "low": 3, "high": 6}},
}


# The notebook ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project with 7 days of 8 machines built by the data job (seed 5: both classes in
    every split of the 4 mature days); tests run the notebook on copies of it."""
    root = tmp_path_factory.mktemp("built")
    p = make_project(root, with_mlflow=True)
    small_data(p, days=DAYS, machines=8, seed=5)
    for day in range(1, DAYS + 1):
        p.run_day(f"2026-01-{day:02d}")
    return root


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(built, root)
    return root


def _uri(root: Path) -> str:
    return f"sqlite:///{root / '.mlops' / 'mlflow.db'}"


def _run_notebook(root: Path) -> str:
    """Execute the committed notebook as a user would after `make demo`, with the platform's
    settings pointing at `root`; returns the text it printed."""
    from nbclient import NotebookClient

    env = {
        **os.environ,
        "MLOPS_SPECS_DIR": str(root / "specs"),
        "MLOPS_LAKE_URL": str(root / ".mlops" / "lake"),
        "MLOPS_MLFLOW_TRACKING_URI": _uri(root),
        "MLOPS_MLFLOW_ARTIFACT_ROOT": str(root / ".mlops" / "mlartifacts"),
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    run_in = root / "cwd"
    run_in.mkdir(exist_ok=True)
    client = NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(run_in)}}
    )
    client.execute(env=env)
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text") or o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _kept_outside_model(old: str, new: str) -> None:
    """Everything before `model:` and from `gates:` on is the same text, comments included."""
    head, tail = old[: old.index("\nmodel:")], old[old.index("\ngates:") :]
    assert "#" in head and "#" in tail
    assert new.startswith(head) and new.endswith(tail)


def _comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if "#" in line]


def _parameters() -> dict:
    """The notebook's parameters cell, evaluated: what a user runs it with."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    values: dict = {}
    exec(cell.source, values)
    return values


def _training_set(root: Path):
    """The platform's own training set of the project (training_set.assemble)."""
    spec, lake = load_spec(root / "specs" / f"{NAME}.yaml"), Lake(str(root / ".mlops" / "lake"))
    days = lake.partitions(NAME, "labels")
    maturity = training_set.label_maturity(spec, lake, days)
    return training_set.assemble(spec, lake, days, lake.partitions(NAME, "features"), maturity)


def test_the_committed_notebook_is_clean_and_never_promotes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    for forbidden in ("promotion", "set_alias", "register_model", "move_champion", "promote("):
        assert forbidden not in source, forbidden
    assert "historical_features(" in source and "spec_edit.write_spec(" in source
    assert _parameters()["SPEC"] == NAME


def test_the_notebook_logs_an_experiment_and_proposes_the_candidate(project: Path):
    from mlflow import MlflowClient

    spec_file = project / "specs" / f"{NAME}.yaml"
    old, repo_spec = spec_file.read_text(), (REPO / "specs" / f"{NAME}.yaml").read_text()
    lake_before = _files(project / ".mlops" / "lake")
    window, frame = _training_set(project)

    out = _run_notebook(project)

    assert str(spec_file) in out  # it found the project through the settings
    assert f"{frame.height} rows x {frame.width} columns (0 left out)" in out
    assert f"label days {window.days[0]} to {window.days[-1]}" in out
    assert f"No champion of {NAME} yet: nothing to compare with, skipped." in out
    client = MlflowClient(tracking_uri=_uri(project), registry_uri=_uri(project))
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlops.source"] == "notebook"
    assert run.data.tags["mlops.spec_change"] == "written"
    assert run.data.params["estimator"] == _parameters()["CANDIDATE"]["estimator"]
    assert 0.5 < run.data.metrics["test_roc_auc"] <= 1.0
    assert "valid_roc_auc" in run.data.metrics
    artifacts = client.list_artifacts(run.info.run_id, "spec")
    assert [a.path for a in artifacts] == ["spec/proposed.diff"]
    (model,) = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert model.source_run_id == run.info.run_id
    # Only the spec changed: no training experiment, no registered model, nothing in the lake.
    assert client.get_experiment_by_name(NAME) is None
    assert client.search_registered_models() == []
    assert _files(project / ".mlops" / "lake") == lake_before
    new = spec_file.read_text()
    spec = load_spec(spec_file)
    candidate = CandidateSpec.model_validate(_parameters()["CANDIDATE"])
    assert spec.model.candidates == [
        *load_spec(REPO / "specs" / f"{NAME}.yaml").model.candidates,
        candidate,
    ]
    _kept_outside_model(old, new)
    assert f"+    - estimator: {candidate.estimator}" in out  # the diff it printed
    assert (REPO / "specs" / f"{NAME}.yaml").read_text() == repo_spec
    assert sorted(p.name for p in spec_file.parent.iterdir()) == [f"{NAME}.yaml"]


def test_against_a_champion_the_notebook_compares_and_moves_nothing(project: Path):
    """A champion the platform trained and promoted (here: trained, and its alias set by the
    test) is scored beside the notebook's model. The spec already holds the notebook's
    candidate (a second run of the notebook): it is left as it is."""
    from mlflow import MlflowClient

    spec_file = project / "specs" / f"{NAME}.yaml"
    spec, uri = load_spec(spec_file), _uri(project)
    window, frame = _training_set(project)
    lr = [c for c in spec.model.candidates if c.estimator == "logistic_regression"]
    lr_spec = spec.model_copy(update={"model": spec.model.model_copy(update={"candidates": lr})})
    lineage = {"training_set_hash": "0" * 64, "training_partitions": window.days}
    arts = str(project / ".mlops" / "mlartifacts")
    v = training.train_candidate(lr_spec, frame, lineage, uri, arts, trials=1).version
    registry.set_alias(uri, NAME, registry.CHAMPION, v)
    text = spec_edit.propose_candidate(spec_file, _parameters()["CANDIDATE"])
    spec_edit.write_spec(spec_file, text)
    before = (
        [(m.version, m.run_id) for m in registry.search_versions(uri, NAME)],
        registry.aliases(uri, NAME),
    )
    lake_before = _files(project / ".mlops" / "lake")

    out = _run_notebook(project)

    assert f"champion v{v}: test roc_auc" in out
    assert f"v{v} on these rows" in out
    assert f"{NAME}.yaml already holds this candidate: nothing to change" in out
    assert spec_file.read_text() == text
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.data.tags["mlops.spec_change"] == "unchanged"
    assert "champion_test_roc_auc" in run.data.metrics
    after = (
        [(m.version, m.run_id) for m in registry.search_versions(uri, NAME)],
        registry.aliases(uri, NAME),
    )
    assert after == before and registry.CHAMPION in before[1][v]
    assert _files(project / ".mlops" / "lake") == lake_before


# The spec edit ---------------------------------------------------------------------------------


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "specs" / f"{NAME}.yaml"
    path.parent.mkdir()
    path.write_text(embedded_spec_text())
    return path


def _ops(old: str, new: str) -> list[tuple[str, list[str], list[str]]]:
    a, b = old.splitlines(), new.splitlines()
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return [(op, a[i1:i2], b[j1:j2]) for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal"]


def test_a_new_candidate_is_appended_and_nothing_else_changes(spec_file: Path):
    old = spec_file.read_text()
    new = spec_edit.propose_candidate(spec_file, RANDOM_FOREST)

    assert spec_file.read_text() == old  # proposing writes nothing
    assert _ops(old, new) == [
        (
            "insert",
            [],
            [
                "    - estimator: random_forest",
                "      params: {n_estimators: 50}",
                "      search_space:",
                "        max_depth: {type: int, low: 3, high: 6}",
            ],
        )
    ]
    spec = spec_from_text(new, spec_file)
    assert spec.model.candidates[-1] == CandidateSpec.model_validate(RANDOM_FOREST)
    _kept_outside_model(old, new)
    assert _comments(new) == _comments(old)  # inside the model block too
    assert spec_edit.propose_candidate(spec_file, RANDOM_FOREST) == new  # same input, same text
    diff = spec_edit.spec_diff(old, new, spec_file)
    assert diff.startswith(f"--- a/{NAME}.yaml\n+++ b/{NAME}.yaml\n")
    assert "+    - estimator: random_forest\n" in diff


def test_a_candidate_of_a_listed_estimator_replaces_it_to_narrow_a_search(spec_file: Path):
    old = spec_file.read_text()
    narrowed = {
        "estimator": "xgboost",
        "params": {"tree_method": "hist", "n_estimators": 400, "early_stopping_rounds": 30},
        "search_space": {
            "max_depth": {"type": "int", "low": 4, "high": 6},
            "learning_rate": {"type": "float", "low": 0.05, "high": 0.2, "log": True},
        },
    }
    new = spec_edit.propose_candidate(spec_file, narrowed)

    spec = spec_from_text(new, spec_file)
    assert [c.estimator for c in spec.model.candidates] == ["xgboost", "logistic_regression"]
    assert spec.model.candidates[0] == CandidateSpec.model_validate(narrowed)
    assert spec.model.candidates[1] == load_spec(spec_file).model.candidates[1]
    ((op, removed, added),) = _ops(old, new)
    assert op == "replace" and all(line.startswith("      ") for line in removed + added)
    _kept_outside_model(old, new)
    assert _comments(new) == _comments(old)
    # Proposed again on the new text, the same candidate changes nothing.
    spec_edit.write_spec(spec_file, new, expected=old)
    assert spec_edit.propose_candidate(spec_file, narrowed) == new


def test_a_flow_style_candidates_list_is_rewritten_and_the_rest_kept(tmp_path: Path):
    block = embedded_spec_text()
    start = block.index("  candidates:\n")
    end = block.index("\ngates:")
    text = (
        block[:start]
        + "  candidates: [{estimator: logistic_regression}]  # baseline\n"
        + block[end:]
    )
    path = tmp_path / "specs" / f"{NAME}.yaml"
    path.parent.mkdir()
    path.write_text(text)

    new = spec_edit.propose_candidate(path, RANDOM_FOREST)

    spec = spec_from_text(new, path)
    assert [c.estimator for c in spec.model.candidates] == ["logistic_regression", "random_forest"]
    _kept_outside_model(text, new)


def _compact(text: str) -> str:
    """The candidates as a sequence at the key's own indent (`candidates:` then `  - ...`)."""
    start, end = text.index("  candidates:\n") + len("  candidates:\n"), text.index("\ngates:")
    return text[:start] + re.sub(r"(?m)^    ", "  ", text[start:end]) + text[end:]


def _model_last(text: str) -> str:
    """The model block moved to the end of the file, with no newline after its last line."""
    start, end = text.index("\nmodel:"), text.index("\ngates:")
    return (text[:start] + text[end:]).rstrip("\n") + text[start:end].rstrip("\n")


@pytest.mark.parametrize(
    "layout",
    [lambda t: t.replace("\n", "\r\n"), _compact, _model_last],
    ids=["crlf", "compact-sequence", "model-last-no-newline"],
)
def test_other_layouts_get_only_the_candidate_lines(tmp_path: Path, layout):
    text = layout(embedded_spec_text())
    path = tmp_path / "specs" / f"{NAME}.yaml"
    path.parent.mkdir()
    path.write_bytes(text.encode())
    assert spec_edit.read_text(path) == text

    new = spec_edit.propose_candidate(path, RANDOM_FOREST)

    ((op, _, added),) = _ops(text, new)
    assert op == "insert" and [line.strip() for line in added] == [
        "- estimator: random_forest",
        "params: {n_estimators: 50}",
        "search_space:",
        "max_depth: {type: int, low: 3, high: 6}",
    ]
    crlf = "\r\n" in text
    assert new.count("\r\n") == (new.count("\n") if crlf else 0)  # line endings kept
    spec_edit.write_spec(path, new, expected=text)
    assert path.read_bytes() == new.encode()
    assert load_spec(path).model.candidates[-1] == CandidateSpec.model_validate(RANDOM_FOREST)


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ({"estimator": "svm"}, "model.candidates[new].estimator: Input should be 'xgboost'"),
        ({"estimator": "ridge"}, "ridge is a regressor: use logistic_regression"),
        (
            {"estimator": "random_forest", "params": {"max_depthh": 3}},
            "model.candidates[random_forest].params: random_forest does not take",
        ),
        (
            {
                "estimator": "random_forest",
                "params": {"max_depth": 3},
                "search_space": {"max_depth": {"type": "int", "low": 2, "high": 4}},
            },
            "search_space.max_depth: 'max_depth' is also fixed in params",
        ),
        (
            {
                "estimator": "logistic_regression",
                "search_space": {"C": {"type": "float", "low": 0, "high": 1, "log": True}},
            },
            "search_space.C: log: true needs low > 0",
        ),
        ({"estimator": "random_forest", "paramz": {}}, "paramz: unknown field"),
    ],
)
def test_a_candidate_the_training_run_could_not_use_is_refused(spec_file, candidate, expected):
    old = spec_file.read_text()
    with pytest.raises(spec_edit.SpecEditError) as e:
        spec_edit.propose_candidate(spec_file, candidate)
    assert str(spec_file) in str(e.value) and "the candidate is refused" in str(e.value)
    assert expected in str(e.value)
    assert spec_file.read_text() == old


def test_an_unknown_parameter_error_names_the_ones_it_takes(spec_file: Path):
    with pytest.raises(spec_edit.SpecEditError, match=r"it takes: .*min_samples_leaf"):
        spec_edit.propose_candidate(
            spec_file, {"estimator": "random_forest", "params": {"depth": 3}}
        )


def test_defaults_of_the_estimator_can_be_overridden(spec_file: Path):
    """n_estimators and min_samples_leaf are the platform's defaults for a random forest: a
    candidate may set them (they used to clash with the defaults when the run built it)."""
    from mlops.modeling import make_estimator

    forest = make_estimator("binary_classification", "random_forest", {"n_estimators": 7}, 1)
    assert forest.steps[-1][1].n_estimators == 7
    lr = make_estimator("binary_classification", "logistic_regression", {"max_iter": 5}, 1)
    assert lr.steps[-1][1].max_iter == 5
    spec_edit.propose_candidate(
        spec_file, {"estimator": "random_forest", "params": {"min_samples_leaf": 2}}
    )


def test_write_spec_replaces_the_file_atomically(spec_file: Path, monkeypatch):
    old = spec_file.read_text()
    new = spec_edit.propose_candidate(spec_file, RANDOM_FOREST)
    spec_file.chmod(0o640)

    # A failure before the rename leaves the old file whole and no temporary file behind.
    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(spec_edit.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        spec_edit.write_spec(spec_file, new, expected=old)
    assert spec_file.read_text() == old
    assert sorted(p.name for p in spec_file.parent.iterdir()) == [f"{NAME}.yaml"]
    monkeypatch.undo()

    spec = spec_edit.write_spec(spec_file, new, expected=old)
    assert spec_file.read_text() == new and spec.content_hash == load_spec(spec_file).content_hash
    assert spec_file.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in spec_file.parent.iterdir()) == [f"{NAME}.yaml"]


def test_write_spec_refuses_an_invalid_text_and_a_file_changed_since(spec_file: Path):
    old = spec_file.read_text()
    with pytest.raises(SpecError, match=r"model\.trials"):
        spec_edit.write_spec(spec_file, old.replace("trials: 10", "trials: 0"))
    assert spec_file.read_text() == old

    new = spec_edit.propose_candidate(spec_file, RANDOM_FOREST)
    spec_file.write_text(old.replace("seed: 42", "seed: 43"))  # someone else's edit
    with pytest.raises(spec_edit.SpecEditError, match="changed since the edit was proposed"):
        spec_edit.write_spec(spec_file, new, expected=old)
    assert "seed: 43" in spec_file.read_text()
