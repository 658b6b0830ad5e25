"""Metadata values the asset pages show, and the attributes every asset of a spec carries."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import dagster as dg

from mlops.spec import Spec

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

# The lifecycle stage of each asset: a tag (`stage`) the catalog filters and groups by.
STAGES = {
    "landing_files": "data",
    "label_events": "data",
    "raw_data": "data",
    "validated_data": "data",
    "quarantine": "data",
    "labels": "data",
    "label_feedback": "data",
    "features": "features",
    "online_features": "features",
    "training_set": "features",
    "candidate_model": "model",
    "model_evaluation": "model",
    "champion_model": "model",
    "batch_predictions": "serving",
    "inference_log": "serving",
    "drift_report": "monitoring",
    "model_performance": "monitoring",
}
DIGITS = 4  # decimals of the floats an asset page shows


def asset_attrs(spec: Spec, asset: str) -> dict[str, Any]:
    """owners (the spec's) and the lifecycle stage tag, for an asset's definition."""
    return {"owners": list(spec.owners), "tags": {"stage": STAGES[asset]}}


def md_table(df: pl.DataFrame, rows: int = 10, cols: int = 16) -> dg.MetadataValue:
    """The frame's first `rows` rows, every one of them, as a Markdown table (long strings cut,
    4 decimals)."""
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_rows=rows,
        tbl_cols=cols,
        fmt_str_lengths=40,
        float_precision=DIGITS,
    ):
        return dg.MetadataValue.md(str(df.head(rows)))


def column_schema(df: pl.DataFrame) -> dict[str, dg.TableSchema]:
    """The `dagster/column_schema` of a lake table: its columns and their types, as written."""
    return {
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(name, str(dtype)) for name, dtype in df.schema.items()]
        )
    }


def rounded(value: float | None, digits: int = DIGITS) -> float | None:
    """A float for an asset page: rounded, still a number (the UI plots numeric metadata);
    None and NaN stay as they are."""
    if value is None:
        return None
    value = float(value)
    return value if math.isnan(value) or math.isinf(value) else round(value, digits)
