"""Watching a landing folder: which daily partitions are new or corrected since last time.

One `os.scandir` per tick gives names, sizes and mtimes; a partition's files are hashed only
when that signature changed, so a tick over 10,000 unchanged files reads no file content. A
re-delivered identical file changes the signature but not the content hash: nothing to do.
The state is a plain dict, kept in the sensor's cursor (compressed), so it survives restarts.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mlops import ingest
from mlops.labels import events_window
from mlops.spec import FileFeed, Spec

NEW = "new"
KEEP = 32  # hex digits of a content hash kept in the cursor (128 bits)
CORRECTED = "corrected"


@dataclass(frozen=True)
class Change:
    partition: str
    content_hash: str
    kind: str  # NEW or CORRECTED
    files: tuple[str, ...]


def listing(feed: FileFeed, folder: Path) -> dict[str, list[tuple[str, int, int]]]:
    """Partition -> [(file name, size, mtime_ns)] for every file matching the feed's pattern."""
    out: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    if not folder.exists():
        return {}
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            day = ingest.file_day(feed, entry.name)
            if day is None:
                continue
            st = entry.stat()
            out[day.isoformat()].append((entry.name, st.st_size, st.st_mtime_ns))
    return dict(out)


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
