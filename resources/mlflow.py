"""MLflow as a Dagster resource: where tracking, registry and artifacts live, and where
people open the two UIs (the links between them)."""

import dagster as dg

from mlops import links


class MlflowResource(dg.ConfigurableResource):
    """Tracking/registry URI (sqlite:///... by default, http://... in production) and the
    artifact root for experiments this platform creates. `ui_url` (the MLflow UI) turns run
    ids, model versions and artifacts into links in asset metadata; `dagster_ui_url` is where
    the Dagster run link tagged on MLflow runs and versions points. Unset: plain text, no tag."""

    tracking_uri: str
    artifact_root: str
    ui_url: str = ""
    dagster_ui_url: str = ""

    def run_link(self, run_id: str, experiment_id: str | None = None) -> dg.MetadataValue:
        if not self.ui_url:
            return dg.MetadataValue.text(f"runs:/{run_id}")
        return dg.MetadataValue.url(links.mlflow_run_url(self.ui_url, run_id, experiment_id))

    def artifact_link(self, experiment_id: str, run_id: str, path: str) -> dg.MetadataValue:
        if not self.ui_url:
            return dg.MetadataValue.text(f"runs:/{run_id}/{path}")
        return dg.MetadataValue.url(
            links.mlflow_artifact_url(self.ui_url, experiment_id, run_id, path)
        )

    def model_version_link(self, model_name: str, version: int) -> dg.MetadataValue:
        if not self.ui_url:
            return dg.MetadataValue.text(f"models:/{model_name}/{version}")
        return dg.MetadataValue.url(
            links.mlflow_model_version_url(self.ui_url, model_name, version)
        )

    def dagster_run_url(self, run_id: str) -> str:
        """The Dagster UI's page of `run_id`, for MLflow tags ("" when no UI is configured)."""
        return links.dagster_run_url(self.dagster_ui_url, run_id)
