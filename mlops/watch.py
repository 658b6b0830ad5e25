"""Watching a landing folder: which daily partitions are new or corrected since last time.

One `os.scandir` per feed and tick gives names, sizes and mtimes; a partition's files are
hashed only when that signature changed, so a tick over 10,000 unchanged files reads no file
content. A re-delivered identical file changes the signature but not the content hash:
nothing to do. The state is a plain dict, kept in the sensor's cursor (compressed), so it
survives restarts.

What counts as a landing file (the conventions for whoever writes them):
- Write complete files under a temporary name and rename them into place: dotfiles,
  `~` lock files, `*.tmp`, `*.temp`, `*.part`, `*.partial`, `*.filepart`, `*.crdownload` and
  `_SUCCESS`-style markers (a leading `_`) are never read (mlops.ingest.is_writer_temp).
- A file written in place is read once it has not changed for the feed's `settle_seconds`
  (mtime older than that): until then its day waits for a later tick, and the tick says so.
- A symlink is read only when it resolves inside the landing folder; one that leads out of
  it is refused (its rows would carry the link's name and hide where they came from).
- A file dated before `source.start_date`, or after the last partition that exists (today's
  file waits until the day is complete, or the simulated clock's day in a replay; nothing
  after `source.end_date` when the spec has one), is skipped with a warning; every other
  day goes on. Names that match no pattern are listed.
All of these show on the tick (its log and skip reason) and in `mlops status`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mlops import ingest
from mlops.labels import events_window
from mlops.spec import FileFeed, Spec

NEW = "new"
KEEP = 32  # hex digits of a content hash kept in the cursor (128 bits)
CORRECTED = "corrected"


def last_partition(spec: Spec, today: dt.date, now: float | None = None) -> dt.date | None:
    """The newest day a run can be requested for: the spec's last daily partition at `now`
    (unix seconds; the wall clock by default) and never after the clock's day `today` (a
    replay's simulated today). A day's partition exists once the day has ended, at midnight
    UTC, as Dagster's DailyPartitionsDefinition has it; a request beyond it fails the whole
    tick. None: no partition yet. A spec with source.end_date has no partition after it.
    Computed here so `mlops status` answers without Dagster; the sensor passes Dagster's
    clock, and tests/test_sensors.py checks the two agree."""
    wall = dt.datetime.now(dt.UTC) if now is None else dt.datetime.fromtimestamp(now, dt.UTC)
    ended = wall.date() - dt.timedelta(days=1)
    if ended < spec.source.start_date:
        return None
    return min(ended, today, spec.source.end_date or ended)


@dataclass(frozen=True)
class Change:
    partition: str
    content_hash: str
    kind: str  # NEW or CORRECTED
    files: tuple[str, ...]


LIST_NAMES = 10  # names shown per kind of skipped file; the rest are counted


@dataclass
class Landing:
    """One feed's landing folder as a tick sees it."""

    folder: Path
    feed: FileFeed
    files: dict[str, list[tuple[str, int, int]]]  # partition -> [(name, size, mtime_ns)]
    unsettled: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # (name, age)
    early: list[str] = field(default_factory=list)  # dated before the first partition
    future: list[tuple[str, str]] = field(default_factory=list)  # (name, day) after the last
    refused: list[tuple[str, str]] = field(default_factory=list)  # (link, target outside)
    unmatched: list[str] = field(default_factory=list)  # names matching no feed's pattern

    def notes(self, first: dt.date | None = None, last: dt.date | None = None) -> list[str]:
        """One warning line per kind of file the tick skipped (names bounded)."""
        where, out = self.folder, []
        if self.unsettled:
            names = [
                f"{n} ({age:.0f} s ago)" if age >= 0 else f"{n} (mtime {-age:.0f} s ahead)"
                for v in self.unsettled.values()
                for n, age in v
            ]
            out.append(
                f"{where}: {_names(names)} still changing (settle_seconds "
                f"{self.feed.settle_seconds:g}): day(s) {', '.join(sorted(self.unsettled))} "
                "wait for a later tick"
            )
        if self.early:
            out.append(
                f"{where}: {_names(self.early)} dated before source.start_date {first}: "
                "skipped (remove them, or set an earlier start_date)"
            )
        if self.future:
            after = f"the last partition {last}" if last else "the first partition"
            out.append(
                f"{where}: {_names([n for n, _ in self.future])} dated after {after}: "
                "skipped until their day's partition exists (the day after it ends)"
            )
        if self.refused:
            out.append(
                f"{where}: {_names([f'{n} -> {t}' for n, t in self.refused])}: symlink(s) "
                "leading out of the landing folder, not read (copy the file in instead)"
            )
        if self.unmatched:
            out.append(
                f"{where}: {_names(self.unmatched)} match no file pattern "
                f"({self.feed.file_pattern}, dates as {self.feed.date_format}): not read"
            )
        return out

    def summary(self) -> dict:
        """What `mlops status` shows: the skipped files, names bounded, with counts."""
        waiting = [n for v in self.unsettled.values() for n, _ in v]
        return {
            "folder": str(self.folder),
            "days": len(self.files),
            **{
                k: {"count": len(v), "names": sorted(v)[:LIST_NAMES]}
                for k, v in (
                    ("still_changing", waiting),
                    ("before_start", self.early),
                    ("after_last_partition", [n for n, _ in self.future]),
                    ("symlinks_refused", [f"{n} -> {t}" for n, t in self.refused]),
                    ("unmatched", self.unmatched),
                )
            },
        }


def _names(names: list[str]) -> str:
    shown = sorted(names)[:LIST_NAMES]
    more = f" (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""
    return ", ".join(shown) + more


def scan(
    feed: FileFeed,
    folder: Path,
    now: float,
    first: dt.date | None = None,
    last: dt.date | None = None,
    others: tuple[FileFeed, ...] = (),
) -> Landing:
    """The feed's files in `folder` by partition, settled days within [first, last] only.

    `now`: the time (epoch seconds) settle ages are counted from; `first` / `last`: the
    partitions that exist (None: no bound); `others`: feeds reading the same folder, whose
    files are not "unmatched". One `os.scandir`; only matching files are stat'ed.
    """
    out = Landing(folder, feed, {})
    files: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for e in ingest.scan(folder):
        if e.escapes_to:
            out.refused.append((e.name, e.escapes_to))
            continue
        day = ingest.file_day(feed, e.name)
        if day is None:
            if not any(
                ingest.file_day(f, e.name) or ingest.is_writer_temp(f, e.name)
                for f in (feed, *others)
            ):
                out.unmatched.append(e.name)
            continue
        if first is not None and day < first:
            out.early.append(e.name)
            continue
        if (last is not None and day > last) or (first is not None and last is None):
            out.future.append((e.name, day.isoformat()))
            continue
        st = e.dirent.stat()
        age = now - st.st_mtime_ns / 1e9
        if age < feed.settle_seconds:
            out.unsettled.setdefault(day.isoformat(), []).append((e.name, age))
        files[day.isoformat()].append((e.name, st.st_size, st.st_mtime_ns))
    # A day with a file still being written waits whole: its other files come with it later.
    out.files = {d: v for d, v in files.items() if d not in out.unsettled}
    return out


def _signature(entries: list[tuple[str, int, int]]) -> str:
    return hashlib.sha1(repr(sorted(entries)).encode()).hexdigest()[:16]


def diff(
    state: dict[str, list[str]],
    folder: Path,
    files: dict[str, list[tuple[str, int, int]]],
) -> tuple[dict[str, list[str]], list[Change]]:
    """New state (partition -> [signature, content hash]) and what changed, oldest first."""
    new_state = dict(state)
    changes: list[Change] = []
    for part in sorted(files):
        entries = files[part]
        sig = _signature(entries)
        prev = state.get(part)
        if prev is not None and prev[0] == sig:
            continue
        names = tuple(sorted(e[0] for e in entries))
        digest = ingest.content_hash([folder / n for n in names])
        new_state[part] = [sig, digest[:KEEP]]
        if prev is None:
            changes.append(Change(part, digest, NEW, names))
        elif prev[1] != digest[:KEEP]:
            changes.append(Change(part, digest, CORRECTED, names))
    return new_state, changes


def diff_fingerprints(
    state: dict[str, list[str]], fingerprints: dict[str, str | None]
) -> tuple[dict[str, list[str]], list[Change]]:
    """The same as `diff` for sources without files (SQL): partition -> content hash of its
    rows, None when the partition has none yet."""
    new_state = dict(state)
    changes: list[Change] = []
    for part, digest in sorted(fingerprints.items()):
        if digest is None:
            continue
        prev = state.get(part)
        if prev is not None and prev[1] == digest[:KEEP]:
            continue
        new_state[part] = [digest[:16], digest[:KEEP]]
        changes.append(Change(part, digest, NEW if prev is None else CORRECTED, ()))
    return new_state, changes


def sql_days(start: dt.date, today: dt.date, known: list[str], rescan_days: int) -> list[dt.date]:
    """Days a SQL source is polled for: every day on the first tick (at most a year), then the
    last `rescan_days` days (late and corrected rows) and any day after the newest known."""
    first = max(start, today - dt.timedelta(days=366))
    if known:
        first = max(
            first, min(dt.date.fromisoformat(max(known)), today) - dt.timedelta(days=rescan_days)
        )
    return [first + dt.timedelta(days=i) for i in range((today - first).days + 1)]


def label_readiness(
    spec: Spec, readings: dict[str, list[str]], events: dict[str, list[str]]
) -> dict[str, str]:
    """Partition -> digest of the event files its labels read, for days whose feed has fully
    arrived (labels mature); days still waiting for the feed are left out."""
    out = {}
    for part in readings:
        first, last = events_window(spec, dt.date.fromisoformat(part))
        days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
        got = [events.get(d.isoformat()) for d in days]
        if all(got):
            h = hashlib.sha256("".join(g[1] for g in got).encode()).hexdigest()  # type: ignore[index]
            out[part] = h
    return out


def encode(state: dict) -> str:
    """Compact cursor text: zlib-compressed JSON (10,000 partitions fit in ~300 kB)."""
    raw = json.dumps(state, separators=(",", ":"), sort_keys=True).encode()
    return base64.b64encode(zlib.compress(raw, 6)).decode()


def decode(cursor: str | None) -> dict:
    if not cursor:
        return {}
    try:
        return json.loads(zlib.decompress(base64.b64decode(cursor)))
    except (ValueError, zlib.error) as e:
        raise ValueError(
            f"unreadable new-data sensor cursor ({e}); reset the sensor's cursor in the UI to "
            "re-scan the landing folder (run keys keep identical files from running twice)"
        ) from None


def short(digest: str) -> str:
    return digest[:16]
