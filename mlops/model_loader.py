"""Load a registered model version for scoring: the one loader for gates, batch and serving.

The model's input layout, task and decision threshold travel in its MLmodel metadata, so a
scorer needs only the registry, not the spec or the training code's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from mlops.modeling import MatrixLayout, model_matrix, predict
from mlops.registry import RegistryError, client


class ModelRefused(RegistryError):
    """The version's content cannot be served: an unsafe or foreign format, missing metadata,
    a model that does not load or does not score its input example. Retrying will not help."""


class UnsafeModelFormat(ModelRefused):
    """The MLmodel or its files name a format this platform does not write (a pickle): refused
    before any deserializer runs."""


class ArtifactsUnavailable(RegistryError):
    """The version's artifacts could not be fetched (storage or registry unreachable, files
    missing): a transient cause, so a caller may retry with backoff."""


@dataclass
class LoadedModel:
    name: str
    version: int
    run_id: str
    task: str
    estimator: str
    threshold: float | None
    layout: MatrixLayout
    model: Any
    input_example: pd.DataFrame | None

    def matrix(self, features: pl.DataFrame | pd.DataFrame) -> pd.DataFrame:
        return model_matrix(self.layout, features)

    def score_matrix(self, X: pd.DataFrame) -> np.ndarray:
        return predict(self.task, self.model, X)

    def score(self, features: pl.DataFrame | pd.DataFrame) -> np.ndarray:
        """Class-1 probability (classification) or the predicted value (regression)."""
        return self.score_matrix(self.matrix(features))

    def decide(self, scores: np.ndarray) -> np.ndarray:
        if self.task != "binary_classification":
            return scores
        return (scores >= (self.threshold if self.threshold is not None else 0.5)).astype("int8")


def load_model(
    tracking_uri: str, name: str, version: int | None = None, alias: str | None = None
) -> LoadedModel:
    """Load `models:/<name>/<version>` or `models:/<name>@<alias>` in its native flavor."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    c = client(tracking_uri)
    try:
        mv = (
            c.get_model_version_by_alias(name, alias)
            if alias
            else c.get_model_version(name, str(version))
        )
    except MlflowException as e:
        what = f"alias '{alias}'" if alias else f"version {version}"
        raise RegistryError(f"model {name} has no {what}: {e.message}") from None
    uri = f"models:/{name}/{mv.version}"
    try:
        local = mlflow.artifacts.download_artifacts(uri)
        conf = Model.load(local)
    except (MlflowException, OSError) as e:
        raise RegistryError(f"cannot fetch {uri}: {e}") from None
    meta = conf.metadata or {}
    if "layout" not in meta:
        raise RegistryError(f"{uri} was not logged by this platform (no input layout metadata)")
    if "xgboost" in conf.flavors:
        model = mlflow.xgboost.load_model(local)
    elif "sklearn" in conf.flavors:
        model = mlflow.sklearn.load_model(local)
    else:
        raise RegistryError(
            f"{uri} has flavors {sorted(conf.flavors)}: expected xgboost or sklearn"
        )
    example = conf.load_input_example(local) if conf.saved_input_example_info else None
    threshold = meta.get("threshold")
    return LoadedModel(
        name=name,
        version=int(mv.version),
        run_id=mv.run_id,
        task=meta["task"],
        estimator=meta.get("estimator", ""),
        threshold=float(threshold) if threshold is not None else None,
        layout=MatrixLayout.from_dict(meta["layout"]),
        model=model,
        input_example=pd.DataFrame(example) if example is not None else None,
    )
