"""Train a candidate: seeded search, refit, log to MLflow, register as the challenger.

The MLflow parent run holds one nested run per trial; the refit best model is logged in its
own flavor (xgboost's JSON format, not a pickle) with signature, input example and the
input layout, registered as a new version of the spec's model name, aliased `challenger`,
and tagged with the lineage contract (DESIGN §5).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mlops import modeling, registry
from mlops.spec import Spec


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


def train_candidate(
    spec: Spec,
    training_set: pl.DataFrame,
    lineage: dict[str, Any],
    tracking_uri: str,
    artifact_root: str,
    trials: int | None = None,
    training_set_path: str = "",
) -> Candidate:
    import mlflow
    from mlflow.models import infer_signature

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
    with mlflow.start_run(run_name=f"{spec.name}-candidate", tags=tags) as parent:

        def log_trial(t: modeling.Trial) -> None:
            with mlflow.start_run(
                run_name=f"trial-{t.number:03d}",
                nested=True,
                tags={f"{registry.TAG}spec_name": spec.name},
            ):
                mlflow.log_params({"estimator": t.estimator, **t.params})
                mlflow.log_metrics({f"valid_{metric}": t.value, "fit_seconds": t.seconds})

        metric = modeling.primary_metric(spec)
        study = None
        if modeling.optuna_storage():  # shared trials: the study is named after this run
            study = f"{spec.name}-{parent.info.run_id}"
            mlflow.set_tag("optuna.study_name", study)
        fit = fit_best(spec, training_set, trials, on_trial=log_trial, study_name=study)
        X_tr, _, _ = fit.frames["train"]
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
            "registered_model_name": name,
            "metadata": meta,
            # Given, MLflow does not infer them: inference imports the model in a subprocess
            # (about 6 s a model, whatever the data size).
            "pip_requirements": _pip_requirements(fit.best.estimator),
        }
        if fit.best.estimator == modeling.XGBOOST:
            info = mlflow.xgboost.log_model(fit.model, model_format="json", **common)
        else:
            import skops.io

            # skops, not pickle: the types the file holds are listed and trusted explicitly.
            trusted = skops.io.get_untrusted_types(data=skops.io.dumps(fit.model))
            info = mlflow.sklearn.log_model(
                fit.model,
                pyfunc_predict_fn=_pyfunc_fn(spec),
                serialization_format="skops",
                skops_trusted_types=trusted,
                **common,
            )
        mlflow.log_text(spec_text(spec), "spec/spec.yaml")
        mlflow.log_dict(lineage, "lineage/lineage.json")
        version = int(info.registered_model_version)
        run_id = parent.info.run_id

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
