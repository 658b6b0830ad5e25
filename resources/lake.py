"""The lake as a Dagster resource: a base URL, nothing opened at import time."""

from __future__ import annotations

import dagster as dg

from mlops.lake import Lake


class LakeResource(dg.ConfigurableResource):
    """Parquet per asset partition under `base_url` (a local folder or any fsspec URL)."""

    base_url: str

    def get(self) -> Lake:
        return Lake(self.base_url)
