"""Runs that die, and writes that fail half-way (hardening issue, items 17 and 20).

17. A step orphaned by a killed run worker registers nothing and moves no alias: the step is
    sent SIGTERM when its launcher dies (training.ParentWatch.arm), and the registry writes
    check that the run is still alive first (assets/model.py run_alive). The real thing:
    `dagster job execute` of the training job on the multiprocess executor, `kill -9` of the
    run worker while the candidate step pauses before registration (the test-only pause,
    MLOPS_FAULT_PAUSE_BEFORE_REGISTER).
20. Every file the platform writes goes through the lake's atomic put: a write that fails
    half-way (a writer that writes half its bytes, then raises as a full disk would) leaves no
    partial file at the final path, and the previous file whole.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import polars as pl
import pytest

from mlops import training
from mlops.lake import Lake
from orchestration.definitions import build_definitions
from tests.conftest import QUIET, REPO, Project, make_project, mlflow_db, small_data

NAME = "machine_failure"
BIN = Path(sys.executable).parent
CANDIDATE = f"{NAME}__candidate_model"
PAUSE = 10  # seconds the candidate step waits before registering, when a test asks


# --- 20. atomic writes --------------------------------------------------------------------


class _HalfWriter:
    """A file whose write puts half the bytes on disk, then fails as a full disk does."""

    def __init__(self, f, name: str):
        self._f = f
        self._name = name

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device (injected)", self._name)

    def __getattr__(self, attr: str):
        return getattr(self._f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


@pytest.fixture
def failing_writes(monkeypatch):
    """`fail(fragment)`: from now on every file opened for writing whose name contains
    `fragment` (its temporary name included) fails half-way through its first write,
    however it is opened (open, Path.write_text, fsspec, matplotlib)."""
    real_open = builtins.open

    def fail(fragment: str) -> None:
        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            named = isinstance(file, str | bytes | os.PathLike)
            if named and any(c in mode for c in "wax+") and fragment in os.fsdecode(file):
                return _HalfWriter(f, os.fsdecode(file))
            return f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return fail


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_lake_put_is_all_or_nothing(tmp_path, failing_writes):
    lake = Lake(str(tmp_path / "lake"))
    path = lake.put_text("s/drift_report/2026-01-01.html", "<html>previous</html>")
    assert Path(path).read_text() == "<html>previous</html>"
    failing_writes("2026-01-01.html")
    with pytest.raises(OSError, match="injected"):
        lake.put_text("s/drift_report/2026-01-01.html", "<html>" + "x" * 10_000 + "</html>")
    assert Path(path).read_text() == "<html>previous</html>"
    assert _leftovers(Path(path).parent) == []
    with pytest.raises(ValueError, match=r"no '\.\.'"):
        lake.put_bytes("s/../../etc/passwd", b"")


def test_put_file_is_all_or_nothing_outside_the_lake(tmp_path, failing_writes):
    from mlops.lake import put_file

    target = tmp_path / "reports" / "summary.json"
    put_file(target, '{"previous": true}')
    failing_writes("summary.json")
    with pytest.raises(OSError, match="injected"):
        put_file(target, '{"next": true}' * 1000)
    assert target.read_text() == '{"previous": true}'
    assert _leftovers(target.parent) == []


def test_a_plot_whose_write_fails_leaves_the_previous_plot_whole(tmp_path, failing_writes):
    from mlops.evaluation import BINARY, plots

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.6 + rng.random(200) * 0.4, 0, 1)
    first = plots(BINARY, y, p, tmp_path)
    before = first["roc"].read_bytes()
    assert before.startswith(b"\x89PNG")
    failing_writes("roc.png")
    with pytest.raises(OSError, match="injected"):
        plots(BINARY, y, 1 - p, tmp_path)
    assert first["roc"].read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_an_evaluation_report_whose_write_fails_leaves_the_previous_one_whole(
    tmp_path, failing_writes
):
    from mlops.evaluation import BINARY, evidently_report

    out = tmp_path / "evidently.html"
    out.write_text("<html>previous report</html>")
    one_class = pd.DataFrame({"y": [0] * 20, "p": np.linspace(0, 1, 20)})
    failing_writes("evidently.html")
    with pytest.raises(OSError, match="injected"):
        evidently_report(BINARY, one_class, one_class, "y", "p", out)
    assert out.read_text() == "<html>previous report</html>"
    assert _leftovers(tmp_path) == []


class _FakeModel:
    version = 1

    def score(self, frame: pl.DataFrame) -> np.ndarray:
        return np.linspace(0.0, 1.0, frame.height)


def test_a_drift_report_whose_html_write_fails_leaves_the_previous_report_whole(
    tmp_path, monkeypatch, failing_writes
):
    """drift_report through Dagster on a real day's features; the registry and the model are
    stand-ins (what they hold does not matter to how the report is written)."""
    from mlops import model_loader, registry

    p = make_project(tmp_path)
    small_data(p, days=1, machines=4)
    day = "2026-01-01"
    p.run_day(day)
    feats = p.lake.read(NAME, "features", day)
    ref_hash = "f" * 64
    p.lake.write(NAME, "training_set", feats, ref_hash[:16])
    keys = ["machine_id", p.spec.source.timestamp_column]
    preds = feats.select(keys).with_columns(
        pl.lit(0.5).alias("score"), pl.lit(1.0).alias("decision"), pl.lit(1).alias("model_version")
    )
    p.lake.write(NAME, "batch_predictions", preds, day)
    monkeypatch.setattr(
        registry, "version_tags", lambda *a: {f"{registry.TAG}training_set_hash": ref_hash}
    )
    monkeypatch.setattr(model_loader, "load_model", lambda *a, **k: _FakeModel())
    html = Path(p.lake.root) / NAME / "drift_report" / f"{day}.html"
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text("<html>previous report</html>")

    failing_writes(f"{day}.html")
    key = dg.AssetKey([NAME, "drift_report"])
    result = dg.materialize(
        p.defs.assets,
        selection=[key],
        partition_key=day,
        resources=p.defs.resources,
        instance=p.instance,
        raise_on_error=False,
        run_config=QUIET,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "injected" in str(failure.step_failure_data.error.message) or "injected" in str(
        failure.step_failure_data.error.cause
    )
    assert html.read_text() == "<html>previous report</html>"
    assert _leftovers(html.parent) == []


# --- 17. a training whose run dies ----------------------------------------------------------

_WATCHED = """
import multiprocessing, os, signal, sys, time
from pathlib import Path

def child(out, arm):
    from mlops.training import ParentWatch
    signal.signal(signal.SIGTERM, lambda *_: (Path(out).write_text("SIGTERM"), os._exit(0)))
    watch = ParentWatch()
    how = watch.arm() if arm else ""
    run_worker = ParentWatch(step_process=False)  # a run worker is not watched
    Path(out + ".ready").write_text(f"{how}|{run_worker.launcher is None}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and watch.gone() is None:
        time.sleep(0.05)
    Path(out).write_text(watch.gone() or "still alive")

if __name__ == "__main__":
    out, method, arm = sys.argv[1], sys.argv[2], sys.argv[3] == "arm"
    multiprocessing.get_context(method).Process(target=child, args=(out, arm)).start()
    time.sleep(120)
"""


def _wait_for(what: str, until, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = until()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _launch_watched(tmp_path: Path, method: str, arm: bool) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "watched.py"
    script.write_text(_WATCHED)
    out = tmp_path / "out.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), method, "arm" if arm else "watch"],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    return proc, out


@contextlib.contextmanager
def _group(proc: subprocess.Popen):
    """Whatever of the process group is left is killed when the block ends."""
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_step_process_sees_its_launcher_die(tmp_path, method):
    proc, out = _launch_watched(tmp_path, method, arm=False)
    with _group(proc):
        ready = Path(f"{out}.ready")
        _wait_for("the child to start", lambda: ready.exists() and ready.read_text(), 60)
        assert ready.read_text() == "|True"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        said = _wait_for("the child to notice", lambda: out.exists() and out.read_text(), 20)
    assert f"(pid {proc.pid}) has died" in said


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_an_armed_step_process_is_terminated_when_its_launcher_dies(tmp_path, method):
    proc, out = _launch_watched(tmp_path, method, arm=True)
    with _group(proc):
        ready = Path(f"{out}.ready")
        started = _wait_for("the child to start", lambda: ready.exists() and ready.read_text(), 60)
        how = started.split("|")[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        said = _wait_for("the child to be told", lambda: out.exists() and out.read_text(), 20)
    assert said == "SIGTERM"
    if sys.platform.startswith("linux"):
        assert ("prctl" in how) == (method == "spawn"), how


def test_an_unwatched_process_is_never_gone():
    for watch in (training.ParentWatch(), training.ParentWatch(step_process=False)):
        assert watch.launcher is None and watch.gone() is None  # pytest: no launcher
        assert watch.arm().startswith("not watched")


@dataclass
class Trainable:
    project: Project
    ts_hash: str


@pytest.fixture(scope="module")
def trainable(tmp_path_factory) -> Trainable:
    """Seven days of a small machine_failure and its training set (4 mature days)."""
    root = tmp_path_factory.mktemp("trainable")
    p = make_project(root)
    small_data(p, days=7, machines=6)
    for d in range(1, 8):
        p.run_day(f"2026-01-{d:02d}")
    ts = p.run_training_set()
    mat = ts.asset_materializations_for_node(f"{NAME}__training_set")[0]
    return Trainable(p, str(mat.metadata["training_set_hash"].value))


def _registry(tmp_path: Path) -> tuple[str, str]:
    """A fresh MLflow registry holding v1 of the model, aliased challenger."""
    from mlflow import MlflowClient

    uri = mlflow_db(tmp_path)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model(NAME)
    v1 = c.create_model_version(NAME, source=str(tmp_path / "v1"), run_id=None)
    c.set_registered_model_alias(NAME, "challenger", v1.version)
    return uri, str(tmp_path / "mlartifacts")


def _registry_state(uri: str) -> tuple[list[int], dict[str, int]]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{NAME}'"))
    aliases = {a: int(v) for a, v in c.get_registered_model(NAME).aliases.items()}
    return versions, aliases


def _defs(t: Trainable, uri: str, artifacts: str) -> dg.Definitions:
    root = t.project.root
    return build_definitions(
        root / "specs",
        t.project.lake.base_url,
        uri,
        artifacts,
        f"sqlite:///{root / '.mlops' / 'online.db'}",
    )


def test_a_run_cancelled_during_training_registers_nothing(trainable, tmp_path, monkeypatch):
    """The run is CANCELING when the candidate is ready (a terminate from the UI): the step
    stops before registering, and the registry is as it was."""
    uri, artifacts = _registry(tmp_path)
    instance = trainable.project.instance
    marker = tmp_path / "paused"
    monkeypatch.setenv(training.FAULT_PAUSE_ENV, "3")
    monkeypatch.setenv(training.FAULT_MARKER_ENV, str(marker))

    def cancel_when_paused() -> None:
        _wait_for("the pause before registration", marker.exists, 120)
        run = instance.get_runs(dg.RunsFilter(job_name=f"{NAME}_training_job"), limit=1)[0]
        instance.report_run_canceling(run, "cancelled by the test")

    canceller = threading.Thread(target=cancel_when_paused, daemon=True)
    canceller.start()
    job = _defs(trainable, uri, artifacts).resolve_job_def(f"{NAME}_training_job")
    result = job.execute_in_process(
        instance=instance,
        run_config={**QUIET, "ops": {CANDIDATE: {"config": {"trials": 1}}}},
        asset_selection=[dg.AssetKey([NAME, "candidate_model"])],
        raise_on_error=False,
    )
    canceller.join(timeout=5)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert "did not register a new version of machine_failure" in message
    assert "is CANCELING" in message
    assert _registry_state(uri) == ([1], {"challenger": 1})


def test_a_run_gone_after_registration_leaves_the_version_without_its_alias(trainable, tmp_path):
    uri, artifacts = _registry(tmp_path)
    frame = trainable.project.lake.read(NAME, "training_set", trainable.ts_hash[:16])
    asked: list[str] = []

    def alive(action: str) -> None:
        asked.append(action)
        if action.startswith("move alias"):
            raise training.RunGone(f"did not {action}: the run died (test)")

    lineage = {"dagster_run_id": "test", "training_set_hash": trainable.ts_hash}
    with pytest.raises(training.RunGone, match="did not move alias challenger"):
        training.train_candidate(
            trainable.project.spec, frame, lineage, uri, artifacts, trials=1, alive=alive
        )
    assert asked == [f"register a new version of {NAME}", f"move alias challenger of {NAME} to v2"]
    assert _registry_state(uri) == ([1, 2], {"challenger": 1})
    from mlops import registry

    assert "the run died" in registry.version_tags(uri, NAME, 2)[f"{registry.TAG}orphaned"]


_RUN_WORKER = """
import sys
import dagster as dg
from orchestration.executors import recon_job
with dg.DagsterInstance.get() as instance:
    dg.execute_job(
        recon_job(sys.argv[1]),
        instance,
        run_config={"ops": {sys.argv[2]: {"config": {"trials": 1}}}},
        asset_selection=[dg.AssetKey(["machine_failure", "candidate_model"])],
    )
"""


def test_killing_the_run_worker_mid_training_registers_nothing(trainable, tmp_path):
    """A run of the training job (its candidate step; the training set is already in the
    instance) on the default profile's multiprocess executor, against a DAGSTER_HOME: the
    run worker is `kill -9`ed while the candidate step is about to register. The orphaned
    step stops at once and the registry is untouched."""
    from orchestration.instance import write_default_instance

    uri, artifacts = _registry(tmp_path)
    home = tmp_path / "dagster_home"
    write_default_instance(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        ts_job = _defs(trainable, uri, artifacts).resolve_job_def(f"{NAME}_training_set_job")
        assert ts_job.execute_in_process(instance=instance, run_config=QUIET).success
    marker = tmp_path / "paused"
    root = trainable.project.root
    env = {
        **os.environ,
        "MLOPS_SPECS_DIR": str(root / "specs"),
        "MLOPS_LAKE_URL": trainable.project.lake.base_url,
        "MLOPS_MLFLOW_TRACKING_URI": uri,
        "MLOPS_MLFLOW_ARTIFACT_ROOT": artifacts,
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{root / '.mlops' / 'online.db'}",
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        training.FAULT_PAUSE_ENV: str(PAUSE),
        training.FAULT_MARKER_ENV: str(marker),
    }
    env["MLOPS_EXECUTOR"] = "multiprocess"  # one process per step: the steps that outlived
    env.pop("MLOPS_MULTIPROCESS_START_METHOD", None)  # their run worker
    env.pop("MLOPS_ALERT_WEBHOOK_URL", None)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_WORKER, f"{NAME}_training_job", CANDIDATE],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: what is left of it is killed after
        )
    with _group(proc):
        try:
            _wait_for("the candidate step to pause", marker.exists, 240, interval=0.2)
        except AssertionError:
            raise AssertionError(f"no pause; run log:\n{log.read_text()[-4000:]}") from None
        step = int(marker.read_text())
        assert step != proc.pid, "the step ran in the run worker: not the multiprocess executor"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # Past the end of the pause: an orphan that kept going would have registered by now.
        _wait_for(f"the orphaned step (pid {step}) to end", lambda: not _running(step), 3 * PAUSE)
        assert _registry_state(uri) == ([1], {"challenger": 1}), log.read_text()[-4000:]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
