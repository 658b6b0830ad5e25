"""SQL source: a daily partition is what a parameterized SELECT returns for [start, end).

A spec with `source.kind: sql` names a SQLAlchemy URL and a query that binds `:start` and
`:end`, the partition's bounds as naive (UTC) datetimes:

    source:
      kind: sql
      url: postgresql+psycopg2://etl:${DB_PASSWORD}@db.internal:5432/iot
      query: SELECT * FROM readings WHERE ts >= :start AND ts < :end
      timestamp_column: ts
      entity_column: machine_id
      start_date: 2026-01-01

The bounds are passed as bound parameters (`sqlalchemy.text` + params), never formatted
into the SQL. `${VAR}` in the URL is read from the environment when the query runs, so
credentials stay out of the spec (and out of its hash); passwords are redacted in every
message and in the rows' `_source_file`.

Pulled rows become the same all-string raw frame as landing files: every value is rendered
as text the way a CSV would hold it (NULL and '' -> null, floats in their shortest exact
form, datetimes in the source's timestamp_format or ISO 8601, timezone-aware ones in UTC),
so validation and quarantine treat them exactly like rows from a file. Rows are then sorted
by the timestamp, the entity and every other column, so the partition (its `_row_number`s,
its Parquet bytes and its data version) does not depend on the order the database returns
rows in; the query needs no ORDER BY. The data version is a sha256 over the column names
and the rendered rows in that order.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mlops.dates import day_bounds
from mlops.ingest import FILE_COLUMNS, META_COLUMNS, ROW_NUMBER, SOURCE_FILE, RawBatch
from mlops.spec import ENV_VAR_RE, SqlSource
from mlops.urls import redact_url

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

__all__ = [
    "SqlPull",
    "SqlSourceError",
    "describe",
    "expand_url",
    "fingerprint",
    "load_day",
    "pull",
    "redact_url",
    "render_rows",
    "rows_hash",
]


class SqlSourceError(RuntimeError):
    """The SQL source cannot be read: unset variable, missing driver, no connection, bad query."""


class SqlPull:
    """The rows one query returned, rendered as text and sorted; `frame` has no meta columns."""

    def __init__(self, frame: pl.DataFrame, description: str):
        self.frame = frame
        self.description = description
        self.content_hash = rows_hash(frame)


# URLs and messages ---------------------------------------------------------------------
def expand_url(url: str) -> str:
    """Replace each ${VAR} in the URL with the environment variable's value. Read here, not
    through mlops/settings.py: the names are the user's (a password, a host), not ours."""
    missing = sorted({m for m in ENV_VAR_RE.findall(url) if m not in os.environ})
    if missing:
        names = ", ".join(f"${{{m}}}" for m in missing)
        raise SqlSourceError(
            f"source.url uses {names}, not set in this process's environment: export it "
            "where the code location and its runs start (e.g. in deploy/'s env file)"
        )
    return ENV_VAR_RE.sub(lambda m: os.environ[m.group(1)], url)


def describe(source: SqlSource) -> str:
    """What the rows' `_source_file` says: 'sql:' and the redacted URL."""
    try:
        return f"sql:{redact_url(expand_url(source.url))}"
    except SqlSourceError:
        return f"sql:{redact_url(source.url)}"


def _scrub(message: str, url: str) -> str:
    """A driver's message with the URL's password taken out, should it be repeated there."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        password = make_url(url).password
    except (ArgumentError, ValueError):
        password = None
    if password and len(str(password)) >= 3:
        message = message.replace(str(password), "***")
    return message.replace(url, redact_url(url))


def _driver_message(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    return " ".join(str(orig).split()) or type(orig).__name__


# Pulling -------------------------------------------------------------------------------
def _engine(url: str, shown: str):
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    from sqlalchemy.pool import NullPool

    try:
        # No pool: Dagster steps are short-lived processes; nothing should linger.
        return create_engine(url, poolclass=NullPool)
    except (NoSuchModuleError, ImportError) as e:
        raise SqlSourceError(
            f"no SQLAlchemy driver for source.url {shown}: {_scrub(_driver_message(e), url)}. "
            "Install the driver package into the environment (e.g. pymysql for mysql+pymysql://, "
            "psycopg2-binary for postgresql+psycopg2://)"
        ) from None
    except (ArgumentError, ValueError) as e:
        raise SqlSourceError(
            f"source.url {shown} is not a usable SQLAlchemy URL: {_scrub(_driver_message(e), url)}"
        ) from None


def pull(source: SqlSource, day: dt.date) -> SqlPull:
    """Run the source's query for one day (bound :start, :end); rows rendered and sorted."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    url = expand_url(source.url)
    shown = redact_url(url)
    start, end = day_bounds(day)
    engine = _engine(url, shown)
    try:
        try:
            conn = engine.connect()
        except DBAPIError as e:
            raise SqlSourceError(
                f"cannot connect to the SQL source {shown}: {_scrub(_driver_message(e), url)}. "
                "Check that the database server is running and reachable from this machine, "
                "the host, port and database name in source.url, and the user and password "
                "(give secrets as ${VAR} in source.url and set them in the environment)"
            ) from None
        with conn:
            try:
                result = conn.execute(text(source.query), {"start": start, "end": end})
                columns = list(result.keys())
                rows = result.fetchall()
            except DBAPIError as e:
                raise SqlSourceError(
                    f"source.query failed on {shown} for [{start}, {end}): "
                    f"{_scrub(_driver_message(e), url)}. Check source.query in the spec "
                    "(table and column names, the database's SQL dialect)"
                ) from None
    finally:
        engine.dispose()
    frame = render_rows(columns, rows, source.timestamp_format)
    return SqlPull(_sorted(frame, source), f"sql:{shown}")


def load_day(source: SqlSource, day: dt.date) -> RawBatch:
    """One day's rows as a raw frame: all text, plus _source_file/_row_number/_file_columns."""
    pulled = pull(source, day)
    frame = pulled.frame
    raw = frame.with_columns(
        pl.lit(pulled.description, dtype=pl.String).alias(SOURCE_FILE),
        pl.int_range(1, frame.height + 1, dtype=pl.Int64).alias(ROW_NUMBER),
        pl.lit(",".join(frame.columns), dtype=pl.String).alias(FILE_COLUMNS),
    )
    return RawBatch(
        day=day,
        files=[],
        frame=raw,
        content_hash=pulled.content_hash,
        file_rows={pulled.description: frame.height},
    )


def fingerprint(source: SqlSource, day: dt.date) -> str | None:
    """The content hash of the day's rows (raw_data's data version); None: no rows."""
    pulled = pull(source, day)
    return pulled.content_hash if pulled.frame.height else None


# Rendering -----------------------------------------------------------------------------
def _text_renderer(timestamp_format: str | None) -> Callable[[Any], str | None]:
    def timestamp(v: dt.datetime) -> str:
        if v.tzinfo is not None:
            v = v.astimezone(dt.UTC).replace(tzinfo=None)
        return v.strftime(timestamp_format) if timestamp_format else v.isoformat()

    def render(v: Any) -> str | None:
        # Order matters: bool is an int, datetime is a date.
        if v is None:
            return None
        if isinstance(v, str):
            return v or None  # an empty CSV field reads as null too
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v)  # shortest text that parses back to the same float
        if isinstance(v, decimal.Decimal):
            return format(v, "f")
        if isinstance(v, dt.datetime):
            return timestamp(v)
        if isinstance(v, dt.date):
            return (
                timestamp(dt.datetime.combine(v, dt.time())) if timestamp_format else v.isoformat()
            )
        if isinstance(v, dt.time):
            return v.isoformat()
        if isinstance(v, bytes | bytearray | memoryview):
            raw = bytes(v)
            try:
                return raw.decode("utf-8") or None
            except UnicodeDecodeError:
                return raw.hex()
        if isinstance(v, dict | list):
            return json.dumps(v, sort_keys=True, default=str)
        return str(v)  # UUID, timedelta, enums, driver-specific types

    return render


def render_rows(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], timestamp_format: str | None = None
) -> pl.DataFrame:
    """Database rows -> an all-string frame, values as a CSV would hold them."""
    names = [str(c) for c in columns]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise SqlSourceError(
            f"source.query returns the column(s) {dupes} more than once: alias them (AS ...)"
        )
    clash = sorted(set(names) & set(META_COLUMNS))
    if clash:
        raise SqlSourceError(f"source.query returns {clash}: those names are reserved; alias them")
    render = _text_renderer(timestamp_format)
    values = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    return pl.DataFrame(
        {c: [render(v) for v in col] for c, col in zip(names, values, strict=True)},
        schema={c: pl.String for c in names},
    )


def _sorted(frame: pl.DataFrame, source: SqlSource) -> pl.DataFrame:
    """Time, entity, then every other column: a total order, whatever order the rows came in."""
    first = [c for c in (source.timestamp_column, source.entity_column) if c in frame.columns]
    keys = [*dict.fromkeys([*first, *frame.columns])]
    return frame.sort(keys, nulls_last=True) if keys and frame.height else frame


def rows_hash(frame: pl.DataFrame) -> str:
    """sha256 over the column names and the rendered rows, in order (a stable JSON form)."""
    h = hashlib.sha256()
    h.update(json.dumps(frame.columns, ensure_ascii=False).encode() + b"\n")
    for row in frame.iter_rows():
        h.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
    return h.hexdigest()
