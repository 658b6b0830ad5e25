"""The one Definitions: one asset graph, job set and resource set per spec in specs/.

Set MLOPS_SPECS_DIR to load another folder of specs and MLOPS_LAKE_URL to move the lake
(any fsspec URL); both default to this project's specs/ and .mlops/lake.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

from assets.data import build_data_assets
from mlops.config import lake_url, specs_dir
from mlops.spec import find_specs
from orchestration.jobs import build_jobs
from resources.lake import LakeResource


def build_definitions(specs_path: Path | None = None, lake_base_url: str | None = None):
    specs = find_specs(specs_path or specs_dir())
    assets, checks, jobs = [], [], []
    for spec in specs:
        with warnings.catch_warnings():
            # Partitioned asset checks are a Dagster preview feature; every process that
            # loads the code location would print this warning otherwise.
            warnings.simplefilter("ignore", dg.PreviewWarning)
            built = build_data_assets(spec)
        for d in built:
            (checks if isinstance(d, dg.AssetChecksDefinition) else assets).append(d)
        jobs.extend(build_jobs(spec))
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        resources={"lake": LakeResource(base_url=lake_base_url or lake_url())},
    )


defs = build_definitions()
