"""One daily partition of a spec's source, whatever its kind: landing files or a SQL query.

raw_data, the new-data sensor and the backtest ask for "the day's rows" and "the day's data
version" without knowing which kind a spec uses; mlops.ingest reads files, mlops.sql_source
runs the query.
"""

from __future__ import annotations

import datetime as dt

from mlops import ingest, sql_source
from mlops.dates import day_bounds
from mlops.ingest import RawBatch
from mlops.spec import FileSource, Spec


class NoRowsForDay(ValueError):
    """The source has nothing for the day: the message says where it looked and what to do."""


def load_partition(spec: Spec, day: dt.date) -> RawBatch:
    """The day's raw rows. Raises NoRowsForDay when there are none, and SqlSourceError when
    the query fails."""
    src = spec.source
    if isinstance(src, FileSource):
        batch = ingest.load_day(src, spec.landing_dir, day)
        if not batch.files:
            raise NoRowsForDay(
                f"no landing file for {day} in {spec.landing_dir} matching "
                f"'{src.file_pattern}'. Land the day's file(s), or pick a day that has "
                "them (`mlops generate` writes the demo's)."
            )
        return batch
    batch = sql_source.load_day(src, day)
    if batch.frame.height == 0:
        start, end = day_bounds(day)
        raise NoRowsForDay(
            f"source.query returned no rows for {day} ([{start}, {end})) from "
            f"{sql_source.describe(src)}. Load the day's rows, or pick a day that has them."
        )
    return batch


def partition_fingerprint(spec: Spec, day: dt.date) -> str | None:
    """The day's raw data version (what raw_data records), or None when it has no rows.

    For files: the content hash of the day's files (None: no file). For SQL: the content
    hash of the rows the query returns for the day (None: no row); this runs the query.
    """
    if isinstance(spec.source, FileSource):
        files = ingest.files_for_day(spec.source, spec.landing_dir, day)
        return ingest.content_hash(files) if files else None
    return sql_source.fingerprint(spec.source, day)
