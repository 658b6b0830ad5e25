"""A registered version's evaluation on its own test split, the champion scored beside it
(the model_evaluation asset's logic): metrics, slices, plots, the Evidently report and the
model card, saved in the lake as the document the promotion gates judge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops import evaluation, modeling, registry
from mlops.lake import Lake, put_file, read_json, write_json
from mlops.model_loader import LoadedModel, load_model
from mlops.spec import Spec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import polars as pl

EVALUATION_ASSET = "model_evaluation"
# The Dagster run that evaluated the version, on its MLflow run (training's is DAGSTER_RUN_URL).
EVALUATION_RUN_URL_TAG = f"{registry.TAG}evaluation_dagster_run_url"
ARTIFACT_DIR = "evaluation"  # where a version's evaluation files go in its MLflow run
# What the training run logs as params besides the estimator's hyperparameters.
NOT_HYPERPARAMETERS = {"estimator", "best_trial", "training_rows"}


class EvaluationError(ValueError):
    """The version cannot be evaluated here (no training set recorded, a slice column that is
    not a feature): the message says which."""


def splits(
    spec: Spec, lake: Lake, training_set_hash: str
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(train, valid, test) rows of the exact training set a version was trained on."""
    key = training_set_hash[:16]
    if not lake.exists(spec.name, "training_set", key):
        raise EvaluationError(
            f"training set {key} of this version is not in the lake ({lake.url(spec.name, 'training_set', key)})"
        )
    ts = lake.read(spec.name, "training_set", key)
    train, valid, test = (ts.filter(pl.col("split") == s) for s in ("train", "valid", "test"))
    return train, valid, test


def _y(spec: Spec, df: pl.DataFrame) -> np.ndarray:
    y = df[spec.labels.name].cast(pl.Float64).to_numpy()
    return y.astype("int64") if spec.model.task == "binary_classification" else y


def _score_block(spec: Spec, model: LoadedModel, test: pl.DataFrame) -> dict[str, Any]:
    task, y = spec.model.task, _y(spec, test)
    pred = model.score(test)
    frame = test.select(spec.gates.slice_columns).to_pandas()
    frame["y"], frame["pred"] = y, pred
    scores = evaluation.metrics(task, y, pred, model.threshold)
    if task == "binary_classification":
        scores["ece"] = evaluation.expected_calibration_error(y, pred)
    return {
        "version": model.version,
        "run_id": model.run_id,
        "estimator": model.estimator,
        "threshold": model.threshold,
        "metrics": scores,
        "slices": evaluation.slice_metrics(
            task, frame, "y", "pred", spec.gates.slice_columns, model.threshold
        ),
        "pred": pred,
    }


def evaluate_version(
    spec: Spec, lake: Lake, tracking_uri: str, version: int, out_dir: Path | None = None
) -> dict[str, Any]:
    """Score `version` and the current champion on the version's test split.

    Returns a JSON-able document (metrics, slices, champion side by side); with out_dir,
    also writes the plots, the Evidently report and the model card there.
    """
    name = spec.registered_model_name
    tags = registry.version_tags(tracking_uri, name, version)
    lineage = registry.lineage_from_tags(tags)
    if "training_set_hash" not in lineage:
        raise EvaluationError(f"{name} v{version} has no training_set_hash tag: not trainable here")
    missing = [
        c
        for c in spec.gates.slice_columns
        if c not in spec.features.categorical and c not in spec.features.passthrough
    ]
    if missing:
        raise EvaluationError(f"gates.slice_columns {missing} are not features of the training set")
    train, valid, test = splits(spec, lake, lineage["training_set_hash"])
    challenger = load_model(tracking_uri, name, version=version)
    chal = _score_block(spec, challenger, test)
    champ_version = registry.alias_version(tracking_uri, name, registry.CHAMPION)
    champ = None
    if champ_version is not None and champ_version != version:
        champ = _score_block(spec, load_model(tracking_uri, name, version=champ_version), test)
    doc: dict[str, Any] = {
        "model_name": name,
        "version": version,
        "task": spec.model.task,
        "primary_metric": modeling.primary_metric(spec),
        "test_rows": test.height,
        "rows": {"train": train.height, "valid": valid.height, "test": test.height},
        "training_set_hash": lineage["training_set_hash"],
        "window": lineage.get("training_partitions", []),
        "challenger": {k: v for k, v in chal.items() if k != "pred"},
        "champion": {k: v for k, v in champ.items() if k != "pred"} if champ else None,
    }
    if out_dir is not None:
        params = hyperparameters(tracking_uri, challenger.run_id)
        doc["artifacts"] = _artifacts(
            spec, challenger, chal, champ, doc["rows"], valid, test, lineage, params, out_dir
        )
    return json_safe(doc)


def hyperparameters(tracking_uri: str, run_id: str | None) -> dict[str, Any]:
    """The hyperparameters the version's training run logged (its refit's), as numbers where
    they are numbers; {} for a version without a run."""
    if not run_id:
        return {}
    logged = registry.client(tracking_uri).get_run(run_id).data.params
    return {k: _number(v) for k, v in sorted(logged.items()) if k not in NOT_HYPERPARAMETERS}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def metric_deltas(doc: dict[str, Any]) -> dict[str, float]:
    """Challenger minus champion, per metric both have (none without a champion)."""
    champ = (doc.get("champion") or {}).get("metrics") or {}
    out = {}
    for k, a in sorted(doc["challenger"]["metrics"].items()):
        b = champ.get(k)
        if isinstance(a, int | float) and isinstance(b, int | float):
            out[k] = float(a) - float(b)
    return out


def _artifacts(
    spec, model, chal, champ, rows: dict[str, int], valid, test, lineage, params, out_dir: Path
) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    task, y = spec.model.task, _y(spec, test)
    importance = modeling.feature_importance(model.model, model.layout.columns)
    files = evaluation.plots(
        task, y, chal["pred"], out_dir, threshold=model.threshold, feature_importance=importance
    )
    ref = valid.select(model.layout.numeric).to_pandas()
    cur = test.select(model.layout.numeric).to_pandas()
    ref["target"], ref["prediction"] = _y(spec, valid), model.score(valid)
    cur["target"], cur["prediction"] = y, chal["pred"]
    files["evidently_report"] = evaluation.evidently_report(
        task,
        ref,
        cur,
        "target",
        "prediction",
        out_dir / "evidently_report.html",
        threshold=model.threshold,
    )
    tr = lineage.get("training_partitions", [])
    card = evaluation.model_card(
        spec_name=spec.name,
        model_name=model.name,
        version=model.version,
        task=task,
        estimator=model.estimator,
        params=params,
        data_window=tr,
        training_rows=rows,
        features=model.layout.columns,
        metrics=chal["metrics"],
        champion_metrics=champ["metrics"] if champ else None,
        slices=chal["slices"],
        lineage={k: str(v) for k, v in lineage.items() if k != "data_versions"},
        threshold=model.threshold,
        limits=[
            "Trained on generated or historical data of the window above only; "
            "behaviour outside its ranges is unknown.",
            f"Labels are mature after {spec.labels.maturity}; recent days are not in the set.",
            "Slices with fewer than 30 test rows are not scored.",
        ],
    )
    put_file(out_dir / "model_card.md", card)
    files["model_card"] = out_dir / "model_card.md"
    return {k: str(v) for k, v in files.items()}


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python: the document must be valid JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_evaluation(lake: Lake, spec: Spec, doc: dict[str, Any]) -> str:
    return write_json(lake, spec.name, EVALUATION_ASSET, f"v{doc['version']}", doc)


def load_evaluation(lake: Lake, spec: Spec, version: int) -> dict[str, Any] | None:
    return read_json(lake, spec.name, EVALUATION_ASSET, f"v{version}")


@dataclass
class RecordedEvaluation:
    doc: dict[str, Any]  # as saved: artifacts named by their runs:/ URI in MLflow
    path: str  # the document in the lake
    plots: dict[str, bytes]  # name -> PNG, for pages that show them inline
    model_card: str  # markdown
    experiment_id: str = ""  # of the version's MLflow run
    artifact_paths: dict[str, str] = field(default_factory=dict)  # name -> path in the run


def record_evaluation(
    spec: Spec, lake: Lake, tracking_uri: str, version: int, dagster_run_url: str = ""
) -> RecordedEvaluation:
    """Evaluate `version` (evaluate_version), log the artifacts and test metrics to the
    version's MLflow run (tagged with the evaluating Dagster run's page, when given), and
    save the document in the lake: the gates and the monitoring read it there."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        doc = evaluate_version(spec, lake, tracking_uri, version, Path(tmp))
        run_id = doc["challenger"]["run_id"]
        registry.client(tracking_uri)
        metrics = {f"test_{k}": v for k, v in doc["challenger"]["metrics"].items() if v is not None}
        with mlflow.start_run(run_id=run_id) as run:
            mlflow.log_artifacts(tmp, ARTIFACT_DIR)
            mlflow.log_metrics(metrics)
            if dagster_run_url:
                mlflow.set_tag(EVALUATION_RUN_URL_TAG, dagster_run_url)
            experiment_id = run.info.experiment_id
        arts = doc["artifacts"]
        plots = {n: Path(a).read_bytes() for n, a in sorted(arts.items()) if a.endswith(".png")}
        card = Path(arts["model_card"]).read_text()
    paths = {n: f"{ARTIFACT_DIR}/{Path(a).name}" for n, a in arts.items()}
    doc["artifacts"] = {n: f"runs:/{run_id}/{p}" for n, p in paths.items()}
    return RecordedEvaluation(
        doc, save_evaluation(lake, spec, doc), plots, card, experiment_id, paths
    )
