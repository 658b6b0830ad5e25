"""Metadata values the asset pages show."""

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl


def md_table(df: "pl.DataFrame", rows: int = 10, cols: int = 16) -> dg.MetadataValue:
    """The frame's first rows as a Markdown table (long strings cut, 4 decimals)."""
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_cols=cols,
        fmt_str_lengths=40,
        float_precision=4,
    ):
        return dg.MetadataValue.md(str(df.head(rows)))
