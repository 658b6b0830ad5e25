"""MLflow as a Dagster resource: where tracking, registry and artifacts live."""

import dagster as dg


class MlflowResource(dg.ConfigurableResource):
    """Tracking/registry URI (sqlite:///... by default, http://... in production) and the
    artifact root for experiments this platform creates. `ui_url`, when set, turns run ids
    into links in asset metadata."""

    tracking_uri: str
    artifact_root: str
    ui_url: str = ""

    def run_link(self, experiment_id: str, run_id: str) -> str:
        if not self.ui_url:
            return f"runs:/{run_id}"
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
