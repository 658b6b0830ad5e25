"""Landing files -> raw rows, keeping every value exactly as it arrived.

Raw rows are all strings: a wrong type must reach validation as the value that came in, so
it can be quarantined with that value, not silently turned into a null by a reader.
mlops/sources.py serves either source kind (these files, or a SQL query: mlops.sql_source),
so assets and sensors need not know which one a spec uses.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mlops.spec import FileFeed

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

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


# --- listing: which files in a landing folder are data (see mlops/watch.py for the rules) ---

# Names a writer gives a file it has not finished, and markers that hold no data: never read.
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".filepart", ".crdownload")


@functools.cache
def _regex(file_pattern: str) -> re.Pattern[str]:
    parts = file_pattern.split("{date}")
    glob_to_re = [re.escape(p).replace(r"\*", ".*").replace(r"\?", ".") for p in parts]
    return re.compile("^" + "(?P<date>.+?)".join(glob_to_re) + "$")


def _pattern_regex(feed: FileFeed) -> re.Pattern[str]:
    return _regex(feed.file_pattern)


def is_writer_temp(feed: FileFeed, name: str) -> bool:
    """A name that is never data: a dotfile, `~` lock file, `*.tmp` / `*.temp` / `*.part` /
    `*.partial` / `*.filepart` / `*.crdownload`, or a `_SUCCESS`-style marker (a leading `_`,
    unless the feed's own pattern starts with one)."""
    if name.startswith((".", "~")) or name.lower().endswith(TEMP_SUFFIXES):
        return True
    return name.startswith("_") and not feed.file_pattern.startswith("_")


def file_day(feed: FileFeed, name: str) -> dt.date | None:
    """The daily partition a landing file belongs to, from its name; None if it does not match
    (or is a writer's temporary name)."""
    if is_writer_temp(feed, name):
        return None
    m = _pattern_regex(feed).match(name)
    if not m:
        return None
    try:
        return dt.datetime.strptime(m.group("date"), feed.date_format).date()
    except ValueError:
        return None


@dataclass(frozen=True)
class Entry:
    """A file in a landing folder, from one `os.scandir` (stat on demand, no content read)."""

    dirent: os.DirEntry
    escapes_to: str | None  # a symlink resolving outside the folder: where it points

    @property
    def name(self) -> str:
        return self.dirent.name


def scan(folder: Path) -> list[Entry]:
    """The files in `folder`, one `os.scandir`. A symlink is the file it points to when that
    lies inside the folder; one resolving outside it is listed with `escapes_to` set and is
    never read (its rows would carry the link's name, hiding where they came from)."""
    if not folder.is_dir():
        return []
    real = os.path.realpath(folder)
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_symlink():
                target = os.path.realpath(e.path)
                if os.path.commonpath([real, target]) != real:
                    if not os.path.isdir(target):  # a linked-in folder is not a file either way
                        out.append(Entry(e, target))
                    continue
            if e.is_file():
                out.append(Entry(e, None))
    return out


def files_for_day(feed: FileFeed, folder: Path, day: dt.date) -> list[Path]:
    """The day's landing files: names matching the pattern, never writer temp names nor
    symlinks that leave the folder."""
    return sorted(
        folder / e.name for e in scan(folder) if not e.escapes_to and file_day(feed, e.name) == day
    )


def landed_days(feed: FileFeed, folder: Path) -> list[dt.date]:
    """Every day that has at least one landing file."""
    days = {file_day(feed, e.name) for e in scan(folder) if not e.escapes_to}
    return sorted(d for d in days if d is not None)


CHUNK = 1 << 20  # bytes per read when transcoding or locating a bad byte


def content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:  # a stream: never the whole file in memory
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def _encoding_error(
    path: Path, encoding: str, setting: str, e: UnicodeDecodeError, offset: int, line: int
) -> LandingError:
    bad = e.object[e.start : e.end]
    return LandingError(
        f"landing file {path} is not valid {encoding}: {e.reason} ({bad!r}) at line {line}, "
        f"byte offset {offset}. Landing files are read as {encoding} (the spec's {setting}); "
        f"if the file is in another encoding, name it there (e.g. {setting}: latin-1, or "
        "cp1252), or land the file again saved as UTF-8, then re-run."
    )


def _decode_stream(path: Path, encoding: str, setting: str, out: BinaryIO | None = None) -> None:
    """Decode `path` chunk by chunk (writing it to `out` as UTF-8 when given); a byte that is
    not valid in `encoding` raises a LandingError naming its line and byte offset."""
    decoder = codecs.getincrementaldecoder(encoding)()
    fed = 0  # bytes handed to the decoder so far
    newlines = 0  # in the text decoded so far
    with path.open("rb") as f:
        while True:
            chunk = f.read(CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a sequence split across chunks
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # The decoder saw its pending bytes, then the chunk.
                start = fed - pending if len(e.object) == pending + len(chunk) else fed
                head = e.object[: e.start].decode(encoding, errors="replace")
                line = newlines + head.count("\n") + 1
                raise _encoding_error(path, encoding, setting, e, start + e.start, line) from None
            fed += len(chunk)
            newlines += text.count("\n")
            if out is not None:
                out.write(text.encode("utf-8"))
            if not chunk:
                return


@contextlib.contextmanager
def _as_utf8(path: Path, encoding: str, setting: str) -> Iterator[Path]:
    """`path` itself when it is UTF-8; otherwise a temporary UTF-8 copy, transcoded as a
    stream (never the whole file as one string), removed on exit."""
    if _is_utf8(encoding):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mlops-transcode-") as tmp:
        copy = Path(tmp) / path.name
        with copy.open("wb") as out:
            _decode_stream(path, encoding, setting, out)
        yield copy


def read_file(
    path: Path, fmt: str, encoding: str = "utf-8", setting: str = "source.encoding"
) -> pl.DataFrame:
    """One landing file as all-string columns plus its name and 1-based row numbers.

    csv and jsonl files are read in `encoding` (the spec's `setting`, named in errors);
    parquet carries its own encoding."""
    try:
        if fmt == "parquet":
            df = pl.read_parquet(path)
            df = df.select(pl.all().cast(pl.String))
        elif fmt in ("csv", "jsonl"):
            df = _read_text(path, fmt, encoding, setting)
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


def _read_text(path: Path, fmt: str, encoding: str, setting: str) -> pl.DataFrame:
    """A csv or jsonl file: UTF-8 read directly (csv by polars), any other encoding from a
    UTF-8 copy. A byte that is not UTF-8 is located (line, byte offset) only on failure."""
    try:
        with _as_utf8(path, encoding, setting) as utf8:
            if fmt == "csv":
                return pl.read_csv(utf8, infer_schema=False)
            return _read_jsonl(utf8, path)
    except (pl.exceptions.ComputeError, UnicodeDecodeError) as e:
        if not _is_utf8(encoding) or "utf" not in str(e).lower():
            raise
        _decode_stream(path, encoding, setting)  # raises, naming the first bad byte
        raise  # pragma: no cover - polars and Python disagree on what is UTF-8


def _read_jsonl(utf8: Path, path: Path) -> pl.DataFrame:
    # Parsed line by line so one line with a wrongly typed value cannot break type inference.
    records: list[dict[str, str | None]] = []
    columns: dict[str, None] = {}
    with utf8.open(encoding="utf-8", newline="") as f:  # line by line, not the whole text
        for n, line in enumerate(f, start=1):
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
    frames = [read_file(p, feed.format, feed.encoding) for p in files]
    # No with_columns on the stacked frame: a new one-chunk column makes polars rechunk
    # every column of a many-chunk frame to match, a whole copy of the day.
    frame = (
        pl.concat(frames, how="diagonal")
        if frames
        else pl.DataFrame(
            schema={SOURCE_FILE: pl.String, ROW_NUMBER: pl.Int64, FILE_COLUMNS: pl.String}
        )
    )
    return RawBatch(
        day=day,
        files=files,
        frame=frame,
        content_hash=content_hash(files),
        file_rows={p.name: f.height for p, f in zip(files, frames, strict=True)},
    )
