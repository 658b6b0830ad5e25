"""Links between the two UIs: MLflow pages for Dagster's metadata, Dagster runs for MLflow's
tags. Plain strings, built from the UIs' base URLs (MLOPS_MLFLOW_UI_URL, MLOPS_DAGSTER_UI_URL);
the routes are the ones the MLflow 3 UI and the Dagster UI serve."""

from __future__ import annotations

from urllib.parse import quote

# The tag on MLflow runs and model versions that links back to the Dagster run.
DAGSTER_RUN_URL_TAG = "mlops.dagster_run_url"


def dagster_run_url(dagster_ui: str, run_id: str) -> str:
    """The Dagster UI's page of a run; "" without a base URL or a run."""
    if not dagster_ui or not run_id:
        return ""
    return f"{dagster_ui.rstrip('/')}/runs/{run_id}"


def mlflow_run_url(mlflow_ui: str, run_id: str, experiment_id: str | None = None) -> str:
    """The MLflow UI's page of a run (the UI finds the experiment when none is given)."""
    base = mlflow_ui.rstrip("/")
    if experiment_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/#/runs/{run_id}"


def mlflow_artifact_url(mlflow_ui: str, experiment_id: str, run_id: str, path: str) -> str:
    """The MLflow UI's artifact view of one file of a run (HTML renders inline there)."""
    return f"{mlflow_run_url(mlflow_ui, run_id, experiment_id)}/artifacts/{path.strip('/')}"


def mlflow_model_version_url(mlflow_ui: str, model_name: str, version: int | str) -> str:
    """The MLflow UI's page of a registered model version."""
    return f"{mlflow_ui.rstrip('/')}/#/models/{quote(model_name, safe='')}/versions/{version}"
