"""Jobs per spec: daily data, scoring and label jobs (one partition per run), training."""

from __future__ import annotations

import dagster as dg

from catalog.jobs import (
    TAG_TRAINING,
    batch_predictions_job_name,
    data_job_name,
    labels_job_name,
    scoring_job_name,
    training_job_name,
    training_set_job_name,
)
from catalog.partitions import daily_partitions
from mlops.spec import Spec


def quiet(level: str = "ERROR") -> dict:
    """Run config that keeps Dagster's console logger to `level` and above: runs started from
    a terminal (tests, bench, drivers) print their own lines; step logs stay in the UI."""
    return {"loggers": {"console": {"config": {"log_level": level}}}}


QUIET = quiet()
DAILY_ASSETS = ("raw_data", "validated_data", "quarantine", "labels", "features", "online_features")


def build_jobs(spec: Spec) -> list[dg.UnresolvedAssetJobDefinition]:
    daily = dg.AssetSelection.assets(*[dg.AssetKey([spec.name, a]) for a in DAILY_ASSETS])
    return [
        dg.define_asset_job(
            data_job_name(spec),
            selection=daily,
            partitions_def=daily_partitions(spec),
            description=f"{spec.name}: one day from landing files to features (with checks).",
        ),
        dg.define_asset_job(
            training_set_job_name(spec),
            selection=dg.AssetSelection.assets(dg.AssetKey([spec.name, "training_set"])),
            description=f"{spec.name}: rebuild the point-in-time training set.",
        ),
        dg.define_asset_job(
            training_job_name(spec),
            selection=dg.AssetSelection.assets(
                *[
                    dg.AssetKey([spec.name, a])
                    for a in (
                        "training_set",
                        "candidate_model",
                        "model_evaluation",
                        "champion_model",
                    )
                ]
            ),
            description=f"{spec.name}: training set -> candidate -> evaluation -> gate -> champion.",
            # The production profile runs one training per spec at a time, however started.
            tags={TAG_TRAINING: spec.name},
        ),
        dg.define_asset_job(
            batch_predictions_job_name(spec),
            selection=dg.AssetSelection.assets(dg.AssetKey([spec.name, "batch_predictions"])),
            partitions_def=daily_partitions(spec),
            description=f"{spec.name}: score one day's features with the champion.",
        ),
        dg.define_asset_job(
            scoring_job_name(spec),
            selection=dg.AssetSelection.assets(
                *[dg.AssetKey([spec.name, a]) for a in ("batch_predictions", "drift_report")]
            ),
            partitions_def=daily_partitions(spec),
            description=f"{spec.name}: score a day with the champion, then its drift report.",
        ),
        dg.define_asset_job(
            labels_job_name(spec),
            selection=dg.AssetSelection.assets(
                *[
                    dg.AssetKey([spec.name, a])
                    for a in (
                        *(("label_feedback",) if spec.labels.uses_feedback else ()),
                        "labels",
                        "model_performance",
                    )
                ]
            ),
            partitions_def=daily_partitions(spec),
            description=f"{spec.name}: a day's labels once they mature, then realized performance.",
        ),
    ]
