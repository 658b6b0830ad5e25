"""Train a candidate: seeded search, refit, log to MLflow, register as the challenger.

The MLflow parent run holds one nested run per trial; the refit best model is logged in its
own flavor (xgboost's JSON format, not a pickle) with signature, input example and the
input layout, registered as a new version of the spec's model name, aliased `challenger`,
and tagged with the lineage contract (DESIGN §5).

A version is registered, and its alias moved, only by a run that is still alive: the caller
passes `alive`, called right before each of the two writes, which raises `RunGone` when the
run that started this training has died or is being cancelled (assets/model.py checks the
Dagster run; `ParentWatch` sees the run worker of a step process die). A step orphaned by a
killed run worker (`kill -9` of `dagster job execute` leaves the multiprocess executor's step
processes running) is also told at once: `ParentWatch.arm` has it sent SIGTERM, which Dagster
turns into an interrupt of the step.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops import modeling, registry
from mlops.spec import Spec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import polars as pl

# Fault injection, for tests only (unset in every profile): seconds to sleep right before a
# candidate is registered (search, refit and model logging done), so a test can kill or cancel
# the run there. When MLOPS_FAULT_PAUSE_MARKER names a file, the pid of the training process
# is written to it as the pause begins. Read here, not through mlops/settings.py: test hooks,
# not settings of the platform.
FAULT_PAUSE_ENV = "MLOPS_FAULT_PAUSE_BEFORE_REGISTER"
FAULT_MARKER_ENV = "MLOPS_FAULT_PAUSE_MARKER"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunGone(RuntimeError):
    """The run that started this training is dead or being cancelled: nothing is registered."""


Alive = Callable[[str], None]  # called with what is about to happen; raises RunGone


class ParentWatch:
    """The process that launched this one, when it is a multiprocessing child (a step of
    Dagster's multiprocess executor: the run worker started it, spawn or forkserver).

    `gone()` says why the launcher is gone, or None: its end of the pipe multiprocessing keeps
    between them has closed (the launcher died, whatever the start method), or this process
    has a new parent (orphans are re-parented). `step_process=False` (the step runs in the
    run worker itself: the in-process executor, a celery worker, a test), or not a
    multiprocessing child: nothing to watch, the step dies with its run worker. A run worker
    is itself a multiprocessing child of the code server that launched it, and outlives it
    legitimately: only a step process is watched.
    """

    def __init__(self, step_process: bool = True) -> None:
        self.launcher = multiprocessing.parent_process() if step_process else None
        self.ppid = os.getppid()

    def gone(self) -> str | None:
        if self.launcher is None:
            return None
        if not self.launcher.is_alive():
            return f"the run worker that started this step (pid {self.launcher.pid}) has died"
        if os.getppid() != self.ppid:
            return (
                f"this step's parent process (pid {self.ppid}) has died: it was re-parented "
                f"to pid {os.getppid()}"
            )
        return None

    def arm(self) -> str:
        """Have this process sent SIGTERM as soon as its launcher dies; says how.

        Linux, launcher is the parent (spawn): prctl(PR_SET_PDEATHSIG), the kernel sends it.
        The kernel sends it when the launcher's thread that started this process ends: Dagster
        (1.13) starts step processes from the thread that runs the executor's loop, which
        lives as long as the run. Otherwise (forkserver: the parent is the fork server; other
        systems): a daemon thread waits on the launcher's pipe. Dagster's step process turns
        SIGTERM into an interrupt of the step's code, so an orphaned training stops where it
        is."""
        if self.launcher is None:
            return "not watched (no launcher process)"
        if sys.platform.startswith("linux") and self.ppid == self.launcher.pid:
            if _parent_death_signal(signal.SIGTERM):
                # The launcher may have died before prctl: then no signal will come.
                if os.getppid() != self.ppid:
                    os.kill(os.getpid(), signal.SIGTERM)
                return "prctl(PR_SET_PDEATHSIG, SIGTERM)"
        sentinel = self.launcher.sentinel
        threading.Thread(
            target=_terminate_when_ready, args=(sentinel,), name="parent-watch", daemon=True
        ).start()
        return "watch thread on the launcher's pipe"


def _parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) through libc; False where it is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _terminate_when_ready(sentinel: int) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])  # readable (EOF) once the launcher's end closes: it died
    os.kill(os.getpid(), signal.SIGTERM)


def _fault_pause() -> None:
    """The test-only pause before registration (FAULT_PAUSE_ENV); nothing when unset."""
    seconds = os.environ.get(FAULT_PAUSE_ENV, "")
    if not seconds:
        return
    marker = os.environ.get(FAULT_MARKER_ENV, "")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(float(seconds))


@dataclass
class Candidate:
    model_name: str
    version: int
    run_id: str
    estimator: str
    params: dict[str, Any]
    metric: str
    valid_score: float
    threshold: float | None
    trials: int
    lineage: dict[str, Any] = field(default_factory=dict)
    experiment_id: str = ""


def code_version() -> str:
    """The git commit of the code, when there is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@dataclass
class FitResult:
    model: Any
    best: modeling.Trial
    search: modeling.SearchResult
    layout: modeling.MatrixLayout
    threshold: float | None
    frames: dict


def fit_best(
    spec: Spec,
    training_set: pl.DataFrame,
    trials: int | None = None,
    on_trial=None,
    study_name: str | None = None,
) -> FitResult:
    """The ML work alone (no MLflow): search, refit the best trial, pick the threshold."""
    from mlops.evaluation import choose_threshold

    lay = modeling.layout(spec)
    frames = modeling.split_frames(spec, training_set, lay)
    (X_tr, y_tr, part_tr), (X_va, y_va, _) = frames["train"], frames["valid"]
    w_tr = modeling.sample_weights(part_tr)
    result = modeling.search(
        spec,
        X_tr,
        y_tr,
        X_va,
        y_va,
        on_trial=on_trial,
        trials=trials,
        study_name=study_name,
        w_train=w_tr,
    )
    best = result.best
    model = modeling.fit(
        spec.model.task, best.estimator, best.params, spec.model.seed, X_tr, y_tr, X_va, y_va, w_tr
    )
    threshold = None
    if spec.model.task == "binary_classification":
        threshold = float(choose_threshold(y_va, modeling.predict(spec.model.task, model, X_va)))
    return FitResult(model, best, result, lay, threshold, frames)


def run_lineage(
    training_set: Mapping[str, Any],
    dagster_run_id: str,
    run_tags: Mapping[str, str],
    dagster_run_url: str = "",
) -> dict[str, Any]:
    """The lineage a candidate records (DESIGN §5): the training set's metadata (hash, window,
    input data versions), the run (and its page in the Dagster UI, when one is configured),
    and what started it (a sensor, a schedule, a person)."""
    from mlops.monitoring import TAG_PARTITION, TAG_REASON, TAG_TRIGGER

    day = {"trigger_day": run_tags[TAG_PARTITION]} if run_tags.get(TAG_PARTITION) else {}
    url = {"dagster_run_url": dagster_run_url} if dagster_run_url else {}
    return {
        **url,
        "dagster_run_id": dagster_run_id,
        "training_partitions": training_set["window"],
        "training_set_hash": training_set["training_set_hash"],
        "data_versions": training_set["input_data_versions"],
        "trigger": run_tags.get(TAG_TRIGGER, "manual"),
        "trigger_reason": run_tags.get(TAG_REASON, "started by hand (UI, CLI or API)"),
        **day,
    }


def train_candidate(
    spec: Spec,
    training_set: pl.DataFrame,
    lineage: dict[str, Any],
    tracking_uri: str,
    artifact_root: str,
    trials: int | None = None,
    training_set_path: str = "",
    alive: Alive | None = None,
) -> Candidate:
    """Search, refit, log to MLflow, then, if `alive` lets it, register the model as a new
    version and move alias challenger to it. `alive(action)` is called right before each of
    those two writes and raises RunGone to stop (a version registered before its run died is
    left without the alias)."""
    import mlflow

    registry.ensure_experiment(tracking_uri, spec.name, artifact_root)
    name = spec.registered_model_name
    lineage = {
        **lineage,
        "spec_name": spec.name,
        "spec_hash": spec.content_hash,
        "code_version": lineage.get("code_version") or code_version(),
        "seed": spec.model.seed,
        "trials": trials or spec.model.trials,
    }
    tags = registry.lineage_tags(lineage)
    with mlflow.start_run(run_name=run_name(lineage), tags=tags) as parent:

        def log_trial(t: modeling.Trial) -> None:
            with mlflow.start_run(
                run_name=f"trial-{t.number:03d}",
                nested=True,
                tags={
                    k: v
                    for k, v in tags.items()
                    if k in (f"{registry.TAG}spec_name", f"{registry.TAG}dagster_run_url")
                },
            ):
                mlflow.log_params({"estimator": t.estimator, **t.params})
                mlflow.log_metrics({f"valid_{metric}": t.value, "fit_seconds": t.seconds})

        metric = modeling.primary_metric(spec)
        study = None
        if modeling.optuna_storage():  # shared trials: the study is named after this run
            study = f"{spec.name}-{parent.info.run_id}"
            mlflow.set_tag("optuna.study_name", study)
        fit = fit_best(spec, training_set, trials, on_trial=log_trial, study_name=study)
        mlflow.log_input(
            _dataset(spec, training_set, training_set_path, lineage), context="training"
        )
        mlflow.log_params(
            {
                "estimator": fit.best.estimator,
                **fit.best.params,
                "best_trial": fit.best.number,
                "training_rows": training_set.height,
            }
        )
        mlflow.log_metrics({f"valid_{metric}": fit.best.value})
        if fit.best.best_iteration is not None:
            mlflow.log_metric("best_iteration", fit.best.best_iteration)
        info = log_model(spec, fit)
        mlflow.log_text(spec_text(spec), "spec/spec.yaml")
        mlflow.log_dict(lineage, "lineage/lineage.json")
        run_id = parent.info.run_id
        _fault_pause()
        # Registered apart from logging, so that a dead run registers nothing.
        if alive is not None:
            alive(f"register a new version of {name}")
        version = int(mlflow.register_model(info.model_uri, name).version)

    registry.describe_version(
        tracking_uri, name, version, registry.candidate_description(lineage, fit.best.estimator)
    )
    registry.tag_version(
        tracking_uri,
        name,
        version,
        {
            **tags,
            f"{registry.TAG}mlflow_run_id": run_id,
            f"{registry.TAG}estimator": fit.best.estimator,
            f"{registry.TAG}decision_threshold": str(fit.threshold),
        },
    )
    if alive is not None:
        try:
            alive(f"move alias {registry.CHALLENGER} of {name} to v{version}")
        except RunGone as e:
            registry.tag_version(tracking_uri, name, version, {f"{registry.TAG}orphaned": str(e)})
            raise
    registry.set_alias(tracking_uri, name, registry.CHALLENGER, version)
    return Candidate(
        name,
        version,
        run_id,
        fit.best.estimator,
        fit.best.params,
        metric,
        fit.best.value,
        fit.threshold,
        len(fit.search.trials),
        lineage,
        parent.info.experiment_id,
    )


def run_name(lineage: Mapping[str, Any]) -> str:
    """The MLflow run's name: what started the training and on which day (the day the trigger
    fired, else the last day trained on), so runs read apart in tables and chart legends
    (`drift 2026-03-04`, `manual 2026-01-20`)."""
    window = lineage.get("training_partitions") or []
    day = lineage.get("trigger_day") or (window[-1] if window else "")
    trigger = str(lineage.get("trigger") or "manual")
    return f"{trigger} {day}".strip()


def log_model(spec: Spec, fit: FitResult) -> Any:
    """Log the fitted model to the active MLflow run as "model", in the only formats the
    loader accepts (xgboost JSON, scikit-learn skops) with its signature, input example and
    input layout: a training run and a notebook's experiment log alike. Registers nothing;
    returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    X_tr, _, _ = fit.frames["train"]
    example = X_tr.head(5)
    signature = infer_signature(example, modeling.predict(spec.model.task, fit.model, example))
    meta = {
        "layout": json.loads(fit.layout.to_json()),
        "task": spec.model.task,
        "estimator": fit.best.estimator,
        "threshold": fit.threshold,
        "spec_name": spec.name,
    }
    common = {
        "name": "model",
        "signature": signature,
        "input_example": example,
        "metadata": meta,
        # Given, MLflow does not infer them: inference imports the model in a subprocess
        # (about 6 s a model, whatever the data size).
        "pip_requirements": _pip_requirements(fit.best.estimator),
    }
    if fit.best.estimator == modeling.XGBOOST:
        return mlflow.xgboost.log_model(fit.model, model_format="json", **common)
    import skops.io

    # skops, not pickle: the types the file holds are listed and trusted explicitly.
    trusted = skops.io.get_untrusted_types(data=skops.io.dumps(fit.model))
    return mlflow.sklearn.log_model(
        fit.model,
        pyfunc_predict_fn=_pyfunc_fn(spec),
        serialization_format="skops",
        skops_trusted_types=trusted,
        **common,
    )


def _dataset(spec: Spec, training_set: pl.DataFrame, path: str, lineage: dict[str, Any]):
    """The training set as an MLflow dataset record: source, digest and a schema inferred
    from a sample. mlflow.data.from_pandas on the whole frame infers the schema value by
    value in Python (about 35 s for 1M rows); the record needs none of the data."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.models import infer_signature

    sample = training_set.head(1000).to_pandas()
    return MetaDataset(
        source=resolve_dataset_source(path or "lake"),
        name=f"{spec.name}/training_set",
        digest=lineage.get("training_set_hash", "")[:16] or None,
        schema=infer_signature(sample).inputs,
    )


def _pip_requirements(estimator: str) -> list[str]:
    from importlib.metadata import version

    packages = ["numpy", "pandas", "scipy", "scikit-learn"]
    packages.append("xgboost" if estimator == modeling.XGBOOST else "skops")
    return [f"{p}=={version(p)}" for p in packages]


def _pyfunc_fn(spec: Spec) -> str:
    return "predict_proba" if spec.model.task == "binary_classification" else "predict"


def spec_text(spec: Spec) -> str:
    return spec.path.read_text() if spec.path.is_file() else ""


def same_predictions(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))
