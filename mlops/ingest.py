"""Landing files -> raw rows, keeping every value exactly as it arrived.

Raw rows are all strings: a wrong type must reach validation as the value that came in, so
it can be quarantined with that value, not silently turned into a null by a reader.
`load_partition` and `partition_fingerprint` serve either source kind (files, or a SQL
query: mlops.sql_source), so assets and sensors need not know which one a spec uses.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from mlops.spec import FileFeed, FileSource, Spec

SOURCE_FILE = "_source_file"
ROW_NUMBER = "_row_number"  # 1-based data row in the source file (header excluded)
FILE_COLUMNS = "_file_columns"  # the columns the row's source file had, comma-joined
META_COLUMNS = (SOURCE_FILE, ROW_NUMBER, FILE_COLUMNS)


class LandingError(ValueError):
    """A landing file that cannot be read at all."""


@dataclass
class RawBatch:
    day: dt.date
    files: list[Path]
    frame: pl.DataFrame
    content_hash: str  # sha256 over the files' names and bytes: the raw data version
    file_rows: dict[str, int] = field(default_factory=dict)  # source (file name) -> rows


def _pattern_regex(feed: FileFeed) -> re.Pattern[str]:
    parts = feed.file_pattern.split("{date}")
    glob_to_re = [re.escape(p).replace(r"\*", ".*").replace(r"\?", ".") for p in parts]
    return re.compile("^" + "(?P<date>.+?)".join(glob_to_re) + "$")


def file_day(feed: FileFeed, name: str) -> dt.date | None:
    """The daily partition a landing file belongs to, from its name; None if it does not match."""
    m = _pattern_regex(feed).match(name)
    if not m:
        return None
    try:
        return dt.datetime.strptime(m.group("date"), feed.date_format).date()
    except ValueError:
        return None


def files_for_day(feed: FileFeed, folder: Path, day: dt.date) -> list[Path]:
    pattern = feed.file_pattern.replace("{date}", day.strftime(feed.date_format))
    return sorted(p for p in folder.glob(pattern) if p.is_file() and file_day(feed, p.name) == day)


def landed_days(feed: FileFeed, folder: Path) -> list[dt.date]:
    """Every day that has at least one landing file."""
    if not folder.exists():
        return []
    glob = feed.file_pattern.replace("{date}", "*")
    days = {file_day(feed, p.name) for p in folder.glob(glob) if p.is_file()}
    return sorted(d for d in days if d is not None)


def content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def read_file(path: Path, fmt: str) -> pl.DataFrame:
    """One landing file as all-string columns plus its name and 1-based row numbers."""
    try:
        if fmt == "csv":
            df = pl.read_csv(path, infer_schema=False, missing_utf8_is_empty_string=False)
        elif fmt == "parquet":
            df = pl.read_parquet(path)
            df = df.select(pl.all().cast(pl.String))
        elif fmt == "jsonl":
            df = _read_jsonl(path)
        else:  # pragma: no cover - the spec model restricts formats
            raise LandingError(f"unknown format {fmt}")
    except LandingError:
        raise
    except Exception as e:
        raise LandingError(
            f"cannot read landing file {path} as {fmt}: {e}. Fix or remove the file, then re-run."
        ) from e
    return df.with_columns(
        pl.lit(path.name).alias(SOURCE_FILE),
        pl.int_range(1, df.height + 1, dtype=pl.Int64).alias(ROW_NUMBER),
        pl.lit(",".join(df.columns)).alias(FILE_COLUMNS),
    )


def _read_jsonl(path: Path) -> pl.DataFrame:
    # Parsed line by line so one line with a wrongly typed value cannot break type inference.
    records: list[dict[str, str | None]] = []
    columns: dict[str, None] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LandingError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise LandingError(f"{path}:{n}: expected a JSON object per line")
        rec = {
            k: None if v is None else (v if isinstance(v, str) else json.dumps(v))
            for k, v in obj.items()
        }
        columns.update(dict.fromkeys(rec))
        records.append(rec)
    return pl.DataFrame(
        {c: [r.get(c) for r in records] for c in columns}, schema={c: pl.String for c in columns}
    )


def load_day(feed: FileFeed, folder: Path, day: dt.date) -> RawBatch:
    """All of one day's landing files, stacked (columns unioned by name)."""
    files = files_for_day(feed, folder, day)
    frames = [read_file(p, feed.format) for p in files]
    frame = (
        pl.concat(frames, how="diagonal")
        if frames
        else pl.DataFrame(schema={c: pl.String for c in META_COLUMNS})
    )
    frame = frame.with_columns(pl.col(ROW_NUMBER).cast(pl.Int64))
    return RawBatch(
        day=day,
        files=files,
        frame=frame,
        content_hash=content_hash(files),
        file_rows={p.name: f.height for p, f in zip(files, frames, strict=True)},
    )


def load_partition(spec: Spec, day: dt.date) -> RawBatch:
    """One daily partition's raw rows from the spec's source, whatever its kind."""
    if isinstance(spec.source, FileSource):
        return load_day(spec.source, spec.landing_dir, day)
    from mlops import sql_source

    return sql_source.load_day(spec.source, day)


def partition_fingerprint(spec: Spec, day: dt.date) -> str | None:
    """The day's raw data version (what raw_data records), or None when it has no rows.

    For files: the content hash of the day's files (None: no file). For SQL: the content
    hash of the rows the query returns for the day (None: no row); this runs the query.
    """
    if isinstance(spec.source, FileSource):
        files = files_for_day(spec.source, spec.landing_dir, day)
        return content_hash(files) if files else None
    from mlops import sql_source

    return sql_source.fingerprint(spec.source, day)
