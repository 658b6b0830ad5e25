"""What the benchmarks share: a throwaway project and the data half without Dagster."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import polars as pl

from mlops import features, ingest, validation
from mlops.dates import day_bounds
from mlops.lake import Lake
from mlops.spec import Spec

REPO = Path(__file__).resolve().parent.parent


def project(root: Path) -> Path:
    """A project root holding a copy of the embedded spec; returns the spec's path."""
    (root / "specs").mkdir(parents=True)
    shutil.copy(REPO / "specs" / "machine_failure.yaml", root / "specs")
    return root / "specs" / "machine_failure.yaml"


def validated_day(
    spec: Spec, lake: Lake, day: dt.date, with_raw: bool = False
) -> validation.ValidationResult:
    """One day's landing files validated into the lake, as the data assets do it (with_raw:
    through the raw_data partition too, the same I/O as a Dagster run)."""
    key = day.isoformat()
    frame = ingest.load_day(spec.source, spec.landing_dir, day).frame
    if with_raw:
        lake.write(spec.name, "raw_data", frame, key)
        frame = lake.read(spec.name, "raw_data", key)
    result = validation.validate(spec, frame, day)
    lake.write(spec.name, "validated_data", result.valid, key)
    lake.write(spec.name, "quarantine", result.quarantine, key)
    return result


def features_day(spec: Spec, lake: Lake, day: dt.date) -> pl.DataFrame:
    """One day's features from its lookback of validated rows, written to the lake."""
    parts = [d.isoformat() for d in features.lookback_days(spec, day)]
    rows = lake.read_many(spec.name, "validated_data", parts)
    out = features.compute_features(spec, rows, *day_bounds(day))
    lake.write(spec.name, "features", out, day.isoformat())
    return out
