"""Deterministic IoT fleet generator: hourly sensor readings plus a late failure-event feed.

The demo, the tests and the benchmarks need data whose properties are known in advance: a
failure mechanism that is non-linear in the sensors (so model choice matters), labels that
arrive late, drift that starts on a chosen day, and bad rows at known positions. Shipping a
data set would fix one of each; this module simulates a fleet instead.

Same arguments give byte-identical files. The physics, the event lateness and the bad rows
draw from separate random streams, and bad rows are added beside the good ones, so asking
for bad rows never changes the good rows or the events. The first N days do not depend on
how many days follow them.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from mlops.lake import put_file
from mlops.spec import Spec

BAD_ROW_KINDS = (
    "null",
    "out_of_range",
    "wrong_type",
    "unknown_category",
    "duplicate",
    "unparseable_timestamp",
)
DRIFT_KINDS = ("covariate", "concept", "new-category")

SENSORS = ("temperature", "vibration", "pressure", "rpm", "voltage")
CATEGORIES = ("machine_type", "firmware")
MACHINE_TYPES = ("A", "B", "C")
FIRMWARES = ("1.0", "1.1", "2.0")
NEW_MACHINE_TYPE, NEW_FIRMWARE = "D", "3.0"
EVENT_EXTRA_COLUMNS = ("reported_at", "failure_mode")
# Failure modes: the first three before concept drift, the last two after it.
FAILURE_MODES = ("overheat", "bearing", "electrical", "seal_leak", "overload")
_FIRST_DRIFTED_MODE = 3
# After concept drift, voltage swings go on but end without a failure: the sensors look the
# same while what precedes a failure changes.
_HARMLESS_SWINGS = len(FAILURE_MODES)
DECIMALS = 3
ISO_FORMAT = "%Y-%m-%dT%H:%M:%S"  # used where the spec gives no timestamp_format
MAX_LATENESS_S = 48 * 3600
REPAIR_COOLDOWN_H = 24  # no new degradation may start this long after a repair
NEW_CATEGORY_SHARE = 0.3
RUN_IN_DAYS = 28

# Per machine type: nominal rpm, temperature, pressure and vibration scale.
_RPM = np.array([2200.0, 1500.0, 3000.0])
_TEMP = np.array([70.0, 58.0, 78.0])
_PRES = np.array([130.0, 105.0, 150.0])
_VIB = np.array([1.0, 1.5, 0.8])
_VOLT = 230.0
# AR(1) coefficients of the latent noise: load, temperature, vibration, pressure, voltage, rpm.
_PHI = np.array([0.9, 0.85, 0.7, 0.8, 0.9, 0.6])


@dataclass
class BadRow:
    """One added bad row: where it is in the written file and what is wrong with it."""

    file: str
    row_number: int
    kind: str
    column: str


@dataclass
class GenerationReport:
    """What `generate` wrote; `rows` counts the data rows written, bad rows included."""

    readings_files: list[Path] = field(default_factory=list)
    event_files: list[Path] = field(default_factory=list)
    rows: int = 0
    events: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)

    def bad_row_counts(self) -> dict[str, int]:
        """Bad rows per kind, every kind present (0 when none), in BAD_ROW_KINDS order."""
        counts = dict.fromkeys(BAD_ROW_KINDS, 0)
        for row in self.bad_rows:
            counts[row.kind] += 1
        return counts


@dataclass
class _Layout:
    """The spec's names for what the generator writes."""

    timestamp: str
    entity: str
    columns: list[str]
    readings_dir: Path
    readings_pattern: str
    events_dir: Path
    events_pattern: str
    event_columns: list[str]
    date_format: str
    events_date_format: str
    timestamp_format: str
    events_timestamp_format: str
    bounds: dict[str, tuple[float | None, float | None]]


def _layout(spec: Spec) -> _Layout:
    """Check that the spec is the IoT machine-failure schema this generator knows."""
    src = spec.source
    known = {c.name for c in spec.schema_.columns}
    what = (
        "the generator only knows the IoT machine-failure schema (see specs/machine_failure.yaml)"
    )
    if not src.entity_column:
        raise ValueError(f"spec '{spec.name}': {what}; source.entity_column is not set")
    for name in (*CATEGORIES, *SENSORS):
        if name not in known:
            raise ValueError(f"spec '{spec.name}': {what}; schema column '{name}' is missing")
    events = spec.labels.events
    if spec.labels.kind != "event_feed" or events is None:
        raise ValueError(
            f"spec '{spec.name}': {what}; labels must be kind 'event_feed' "
            f"(got '{spec.labels.kind}')"
        )
    for where, feed in (("source", src), ("labels.events", events)):
        if any(ch in feed.file_pattern for ch in "*?["):
            raise ValueError(
                f"spec '{spec.name}': {where}.file_pattern '{feed.file_pattern}' is a glob; "
                "the generator writes files, so give a literal name such as 'readings_{date}.csv'"
            )
        if "," in (feed.timestamp_format or ""):
            raise ValueError(
                f"spec '{spec.name}': {where}.timestamp_format must not contain a comma "
                "(the generator writes unquoted CSV)"
            )
    entity = events.entity_column or src.entity_column
    bounds = {name: (spec.column(name).min, spec.column(name).max) for name in SENSORS}
    return _Layout(
        timestamp=src.timestamp_column,
        entity=src.entity_column,
        columns=[src.timestamp_column, src.entity_column, *CATEGORIES, *SENSORS],
        readings_dir=spec.landing_dir,
        readings_pattern=src.file_pattern,
        events_dir=spec.resolve(events.path),
        events_pattern=events.file_pattern,
        event_columns=[entity, events.timestamp_column, *EVENT_EXTRA_COLUMNS],
        date_format=src.date_format,
        events_date_format=events.date_format,
        timestamp_format=src.timestamp_format or ISO_FORMAT,
        events_timestamp_format=events.timestamp_format or ISO_FORMAT,
        bounds=bounds,
    )


def _parse_drift(drift: str | None, drift_from: int | None, days: int) -> tuple[str, ...]:
    """'covariate,concept' -> ('covariate', 'concept'); both arguments or neither."""
    if drift is None and drift_from is None:
        return ()
    if drift is None or drift_from is None:
        raise ValueError(
            "drift and drift_from go together: name the drift kind(s) "
            f"({', '.join(DRIFT_KINDS)}) and the 1-based day it starts"
        )
    kinds: list[str] = []
    for part in drift.split(","):
        kind = part.strip()
        if kind not in DRIFT_KINDS:
            raise ValueError(
                f"unknown drift kind '{kind}' in '{drift}'; expected one or more of "
                f"{', '.join(DRIFT_KINDS)}, comma-separated"
            )
        if kind not in kinds:
            kinds.append(kind)
    if not 1 <= drift_from <= days:
        raise ValueError(f"drift_from must be a day between 1 and {days} (days), got {drift_from}")
    return tuple(kinds)


@dataclass
class _Fleet:
    """Per-machine constants and the evolving physical state of every machine."""

    ids: np.ndarray
    type_idx: np.ndarray
    firmware_idx: np.ndarray
    minute: np.ndarray
    wear_rate: np.ndarray
    gets_new_category: np.ndarray
    wear: np.ndarray
    ar: np.ndarray
    remaining: np.ndarray  # hours until the episode ends (in a failure, mostly), -1 when none
    duration: np.ndarray  # length of the current degradation, hours
    mode: np.ndarray  # mode of the current episode, an index into FAILURE_MODES or harmless
    cooldown: np.ndarray  # hours left in which no degradation may start


def _new_fleet(machines: int, rng: np.random.Generator) -> _Fleet:
    width = max(4, len(str(machines)))
    ids = np.array([f"M{i + 1:0{width}d}" for i in range(machines)])
    type_idx = rng.choice(3, size=machines, p=[0.4, 0.35, 0.25])
    firmware_idx = rng.choice(3, size=machines, p=[0.3, 0.3, 0.4])
    minute = rng.integers(0, 60, size=machines)
    # Machines wear out at different speeds: median ~14 days to the vibration threshold.
    wear_rate = 0.75 / (24 * 14) * rng.lognormal(0.0, 0.35, size=machines)
    gets_new_category = rng.random(machines) < NEW_CATEGORY_SHARE
    return _Fleet(
        ids=ids,
        type_idx=type_idx,
        firmware_idx=firmware_idx,
        minute=minute,
        wear_rate=wear_rate,
        gets_new_category=gets_new_category,
        wear=rng.uniform(0.0, 0.8, size=machines),
        ar=rng.standard_normal((len(_PHI), machines)),
        remaining=np.full(machines, -1),
        duration=np.ones(machines, dtype=np.int64),
        mode=np.zeros(machines, dtype=np.int64),
        cooldown=np.zeros(machines, dtype=np.int64),
    )


def _sensors(
    f: _Fleet, hour: int, eps: np.ndarray, covariate: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Healthy sensor values from wear, load, machine type and autocorrelated noise."""
    f.ar = _PHI[:, None] * f.ar + np.sqrt(1.0 - _PHI**2)[:, None] * eps
    t = f.type_idx
    cycle = np.sin(2.0 * np.pi * (hour - 9) / 24.0)
    # Covariate drift: a second shift brings a heavier, more variable load.
    mean, amplitude, spread = (1.08, 0.2, 0.08) if covariate else (1.0, 0.12, 0.05)
    load = mean + amplitude * cycle + spread * f.ar[0]
    w = f.wear
    rpm = _RPM[t] * load + 40.0 * f.ar[5]
    temp = _TEMP[t] + 25.0 * (load - 1.0) + 10.0 * w + 2.0 * f.ar[1]
    vib = _VIB[t] * (1.5 + 1.2 * w + 5.0 * np.maximum(0.0, w - 0.75) + 0.25 * f.ar[2])
    pres = _PRES[t] * (0.92 + 0.08 * load) - 15.0 * w + 3.0 * f.ar[3]
    volt = _VOLT + 6.0 * f.ar[4]
    if covariate:  # a hotter plant and a new mounting that shakes more
        temp = temp + 8.0
        vib = vib * 1.3
    return temp, vib, pres, rpm, volt


def _onset_hazard(
    f: _Fleet,
    temp: np.ndarray,
    vib: np.ndarray,
    pres: np.ndarray,
    rpm: np.ndarray,
    volt: np.ndarray,
    concept: bool,
) -> np.ndarray:
    """Per-hour probability that an episode starts, one row per mode.

    Deliberately non-linear: an AND of two sensors, a squared deviation from nominal and a
    threshold, so a linear model on the raw sensors misses much of the signal. Rows map to
    modes 0-2 (overheat, bearing, electrical) before concept drift and to modes 3-5
    (seal_leak, overload, harmless swings) after it.
    """
    t = f.type_idx
    swings = 0.0035 * ((volt - _VOLT) / 6.0) ** 2
    if concept:
        leak = 0.03 * ((pres < _PRES[t] - 12.0) & (rpm > _RPM[t] * 1.03)) + 0.0002
        overload = 0.0012 * ((rpm - _RPM[t]) / (0.05 * _RPM[t])) ** 2
        return np.stack([leak, overload, swings])
    hot_and_shaky = (temp > _TEMP[t] + 8.0) & (vib > _VIB[t] * 2.6)
    overheat = 0.01 * hot_and_shaky
    bearing = 0.008 * (vib > _VIB[t] * 3.4) + 0.0002
    return np.stack([overheat, bearing, swings])


def _apply_symptoms(
    f: _Fleet,
    temp: np.ndarray,
    vib: np.ndarray,
    pres: np.ndarray,
    rpm: np.ndarray,
    volt: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Degrading machines drift towards failure: the signal a good model picks up."""
    s = np.sqrt(np.where(f.remaining >= 0, 1.0 - f.remaining / f.duration, 0.0))
    overheat, bearing, electrical, leak, overload = (s * (f.mode == k) for k in range(5))
    electrical = electrical + s * (f.mode == _HARMLESS_SWINGS)
    t = f.type_idx
    temp = temp + 10.0 * overheat
    vib = vib + _VIB[t] * (0.5 * overheat + 4.0 * bearing)
    volt = volt + (volt - _VOLT) * 4.0 * electrical  # swings both ways: not monotone
    rpm = rpm + 300.0 * bearing * f.ar[5]  # a failing bearing makes the speed hunt
    pres = pres - 30.0 * leak
    rpm = rpm + (rpm - _RPM[t]) * 2.0 * overload
    return temp, vib, pres, rpm, volt


@dataclass
class _Failures:
    """Failures as they happen; written to the events feed once all days are simulated."""

    machine: list[np.ndarray] = field(default_factory=list)
    time_s: list[np.ndarray] = field(default_factory=list)
    lateness_s: list[np.ndarray] = field(default_factory=list)
    mode: list[np.ndarray] = field(default_factory=list)


def _bound(
    bounds: dict[str, tuple[float | None, float | None]], column: str, side: int, default: float
) -> float:
    """The spec's min (side 0) or max (side 1) of a column, or `default` where it has none."""
    value = bounds.get(column, (None, None))[side]
    return default if value is None else value


def _simulate_day(
    f: _Fleet,
    day_s: int,
    phys: np.random.Generator,
    late: np.random.Generator,
    failures: _Failures,
    covariate: bool,
    concept: bool,
    bounds: dict[str, tuple[float | None, float | None]],
) -> np.ndarray:
    """Advance the fleet 24 hours; return the observed sensors, shape (24, 5, machines).

    A fixed number of draws per day keeps the stream aligned whatever happens, so drift or
    a different failure history never shifts the randomness of other days.
    """
    m = len(f.ids)
    eps = phys.standard_normal((24, len(_PHI), m))
    u = phys.random((24, 5, m))  # onset, mode, duration, failure second, wear after repair
    out = np.empty((24, len(SENSORS), m))
    lo = np.array([_bound(bounds, c, 0, -np.inf) for c in SENSORS])
    hi = np.array([_bound(bounds, c, 1, np.inf) for c in SENSORS])
    for h in range(24):
        f.wear = np.minimum(f.wear + f.wear_rate, 2.0)
        values = _sensors(f, h, eps[h], covariate)
        values = _apply_symptoms(f, *values)
        obs = np.clip(np.stack(values), lo[:, None], hi[:, None])
        out[h] = obs

        failing = (f.remaining == 0) & (f.mode != _HARMLESS_SWINGS)
        if failing.any():
            idx = np.flatnonzero(failing)
            reading_s = day_s + h * 3600 + f.minute[idx] * 60
            failures.machine.append(idx)
            failures.time_s.append(reading_s + 1 + (u[h, 3, idx] * 3599).astype(np.int64))
            failures.lateness_s.append(late.integers(0, MAX_LATENESS_S + 1, size=len(idx)))
            failures.mode.append(f.mode[idx].copy())
            f.wear[idx] = 0.1 * u[h, 4, idx]  # repaired
            f.cooldown[idx] = REPAIR_COOLDOWN_H + 1
        f.remaining[f.remaining >= 0] -= 1
        f.cooldown = np.maximum(f.cooldown - 1, 0)

        hazard = _onset_hazard(f, *obs, concept=concept)
        total = hazard.sum(axis=0)
        starts = (f.remaining < 0) & (f.cooldown == 0) & (u[h, 0] < np.minimum(total, 0.5))
        if starts.any():
            share = np.cumsum(hazard[:, starts], axis=0) / total[starts]
            mode = (share < u[h, 1, starts]).sum(axis=0)
            mode = np.minimum(mode, len(hazard) - 1)
            f.mode[starts] = mode + (_FIRST_DRIFTED_MODE if concept else 0)
            f.duration[starts] = 16 + (u[h, 2, starts] * 17).astype(np.int64)  # 16..32 h
            f.remaining[starts] = f.duration[starts]
    return out


def _readings_frame(
    f: _Fleet, layout: _Layout, day_s: int, sensors: np.ndarray, new_category: bool
) -> tuple[pl.DataFrame, np.ndarray]:
    """One day's rows, sorted by timestamp then machine id, and their times in Unix seconds."""
    m = len(f.ids)
    order = np.lexsort((np.arange(m), f.minute))
    seconds = day_s + np.arange(24)[:, None] * 3600 + (f.minute[order] * 60)[None, :]
    seconds = seconds.ravel()
    stamps = _format_times(seconds, layout.timestamp_format)
    types = np.array(MACHINE_TYPES)[f.type_idx]
    firmware = np.array(FIRMWARES)[f.firmware_idx]
    if new_category:
        types = np.where(f.gets_new_category, NEW_MACHINE_TYPE, types)
        firmware = np.where(f.gets_new_category, NEW_FIRMWARE, firmware)
    columns: dict[str, np.ndarray | pl.Series] = {
        layout.timestamp: stamps,
        layout.entity: np.tile(f.ids[order], 24),
        CATEGORIES[0]: np.tile(types[order], 24),
        CATEGORIES[1]: np.tile(firmware[order], 24),
    }
    for k, name in enumerate(SENSORS):
        columns[name] = np.round(sensors[:, k, order].ravel(), DECIMALS)
    return pl.DataFrame(columns), seconds


@dataclass
class _Corruptor:
    """Adds bad rows, kinds taken round-robin across days, from its own random stream.

    Bad rows are added next to the good rows, never in their place: removing the reported
    rows gives back exactly the file written without bad rows. Each bad row is a copy of a
    good row with one problem; all but duplicates are stamped 30 s after their source, so
    the only duplicate keys are the intended ones.
    """

    rng: np.random.Generator
    fraction: float
    layout: _Layout
    kinds: tuple[str, ...]
    next_kind: int = 0
    rows_seen: int = 0
    added: int = 0

    def corrupt(
        self, text: str, seconds: np.ndarray, file: str, day: dt.date
    ) -> tuple[str, list[BadRow]]:
        """Add bad rows to one day's CSV text (rows at `seconds`); return it and its bad rows."""
        lines = text.split("\n")
        header, rows = lines[0], lines[1:-1]
        n = len(rows)
        self.rows_seen += n
        # Count against all rows so far, so small fractions still add up over many days.
        n_bad = min(int(np.floor(self.fraction * self.rows_seen + 0.5)) - self.added, n)
        if n_bad <= 0:
            return text, []
        self.added += n_bad
        kinds = [self.kinds[(self.next_kind + i) % len(self.kinds)] for i in range(n_bad)]
        self.next_kind = (self.next_kind + n_bad) % len(self.kinds)

        sources = self.rng.choice(n, size=n_bad, replace=False)
        shifted = _format_times(seconds[sources] + 30, self.layout.timestamp_format)
        # A broken row goes after its source's timestamp group, where its time sorts; a
        # duplicate goes after a random row at or after its source: the later occurrence.
        group_end = np.searchsorted(seconds, seconds[sources], side="right") - 1
        anywhere_later = sources + (self.rng.random(n_bad) * (n - sources)).astype(np.int64)
        inserts: list[tuple[int, int, str, str]] = []
        for k, (src, kind) in enumerate(zip(sources.tolist(), kinds, strict=True)):
            if kind == "duplicate":
                line, column = rows[src], self.layout.entity
                inserts.append((int(anywhere_later[k]), k, line, column))
            else:
                cells = rows[src].split(",")
                cells[0] = shifted[k]  # the timestamp comes first
                line, column = self._break(cells, kind, day)
                inserts.append((int(group_end[k]), k, line, column))
        inserts.sort()

        out = [header]
        bad: list[BadRow] = []
        j = 0
        for i, line in enumerate(rows):
            out.append(line)
            while j < len(inserts) and inserts[j][0] == i:
                _, k, extra, column = inserts[j]
                out.append(extra)
                bad.append(BadRow(file, len(out) - 1, kinds[k], column))
                j += 1
        return "\n".join(out) + "\n", bad

    def _break(self, cells: list[str], kind: str, day: dt.date) -> tuple[str, str]:
        """Give one row's cells exactly one problem of the given kind."""
        pos = {name: i for i, name in enumerate(self.layout.columns)}
        if kind == "null":
            column = str(self.rng.choice([*CATEGORIES, *SENSORS]))
            cells[pos[column]] = ""
        elif kind == "out_of_range":
            bounded = [c for c in SENSORS if any(b is not None for b in self.layout.bounds[c])]
            column = str(self.rng.choice(bounded))
            low, high = self.layout.bounds[column]
            span = 0.5 * (high - low) if low is not None and high is not None else 100.0
            if high is not None and (low is None or self.rng.random() < 0.5):
                value = high + max(1.0, span)
            else:
                value = low - max(1.0, span)  # type: ignore[operator]
            cells[pos[column]] = f"{value:.{DECIMALS}f}"
        elif kind == "wrong_type":
            column = str(self.rng.choice(SENSORS))
            cells[pos[column]] = str(self.rng.choice(["abc", "ERR", "1.2.3"]))
        elif kind == "unknown_category":
            column = str(self.rng.choice(CATEGORIES))
            cells[pos[column]] = "Z" if column == "machine_type" else "9.9"
        elif kind == "unparseable_timestamp":
            column = self.layout.timestamp
            cells[pos[column]] = str(
                self.rng.choice([f"{day.isoformat()[:-1]}X 25:61", f"{day}T25:61:00", "soon"])
            )
        else:
            raise ValueError(f"unknown bad-row kind '{kind}'; expected one of {BAD_ROW_KINDS}")
        return ",".join(cells), column


def _write_events(
    f: _Fleet,
    layout: _Layout,
    failures: _Failures,
    start: dt.date,
    start_s: int,
    days: int,
) -> tuple[list[Path], int]:
    """One events file per arrival day; events that arrive after the last day are left out."""
    if failures.machine:
        machine = np.concatenate(failures.machine)
        time_s = np.concatenate(failures.time_s)
        reported_s = time_s + np.concatenate(failures.lateness_s)
        mode = np.concatenate(failures.mode)
    else:
        machine = time_s = reported_s = mode = np.zeros(0, dtype=np.int64)
    arrival = (reported_s - start_s) // 86400
    order = np.lexsort((machine, reported_s))
    entity, failure_col, reported_col, mode_col = layout.event_columns
    events = pl.DataFrame(
        {
            entity: f.ids[machine[order]].astype(str),
            failure_col: _format_times(time_s[order], layout.events_timestamp_format),
            reported_col: _format_times(reported_s[order], layout.events_timestamp_format),
            mode_col: np.array(FAILURE_MODES, dtype=str)[mode[order]],
            "_arrival": arrival[order],
        },
        schema={
            entity: pl.String,
            failure_col: pl.String,
            reported_col: pl.String,
            mode_col: pl.String,
            "_arrival": pl.Int64,
        },
    )
    layout.events_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    written = 0
    for d in range(days):
        day = start + dt.timedelta(days=d)
        name = layout.events_pattern.replace("{date}", day.strftime(layout.events_date_format))
        part = events.filter(pl.col("_arrival") == d).drop("_arrival")
        path = layout.events_dir / name
        put_file(path, part.write_csv())
        paths.append(path)
        written += part.height
    return paths, written


def _format_times(seconds: np.ndarray, fmt: str) -> pl.Series:
    """Unix seconds -> text in the spec's timestamp format (ISO 8601 by default)."""
    times = pl.Series(seconds.astype(np.int64) * 1000).cast(pl.Datetime("ms"))
    return times.dt.to_string(fmt)


def generate(
    spec: Spec,
    days: int,
    machines: int,
    seed: int,
    start: dt.date | None = None,
    drift_from: int | None = None,
    drift: str | None = None,
    bad_rows: float = 0.0,
    progress: bool = False,
) -> GenerationReport:
    """Simulate `machines` machines for `days` days and write readings and failure events.

    drift: one or more of DRIFT_KINDS, comma-separated, active from the 1-based day
    `drift_from`. bad_rows: bad rows to add, as a fraction of the good rows (0..1); each
    one is reported with its place in the file.
    """
    layout = _layout(spec)
    if days < 1 or machines < 1:
        raise ValueError(f"days and machines must be at least 1, got {days} and {machines}")
    if not 0.0 <= bad_rows <= 1.0:
        raise ValueError(f"bad_rows is a fraction of rows between 0 and 1, got {bad_rows}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    kinds = _parse_drift(drift, drift_from, days)
    drift_day = (drift_from or 1) - 1
    start = start or spec.source.start_date
    start_s = int((start - dt.date(1970, 1, 1)).total_seconds())

    phys_seq, late_seq, bad_seq = np.random.SeedSequence(seed).spawn(3)
    phys, late = np.random.default_rng(phys_seq), np.random.default_rng(late_seq)
    fleet = _new_fleet(machines, phys)
    # The fleet has been running before day 1: without this, wear starts out of balance
    # and the first weeks drift on their own. Failures of the run-in are not written.
    for d in range(-RUN_IN_DAYS, 0):
        _simulate_day(
            fleet, start_s + d * 86400, phys, late, _Failures(), False, False, layout.bounds
        )
    failures = _Failures()
    bounded = any(b is not None for c in SENSORS for b in layout.bounds[c])
    bad_kinds = tuple(k for k in BAD_ROW_KINDS if bounded or k != "out_of_range")
    corruptor = _Corruptor(np.random.default_rng(bad_seq), bad_rows, layout, bad_kinds)
    report = GenerationReport()
    layout.readings_dir.mkdir(parents=True, exist_ok=True)

    for d in tqdm(
        range(days), desc="generating", unit="day", disable=not progress, file=sys.stderr
    ):
        day = start + dt.timedelta(days=d)
        day_s = start_s + d * 86400
        drifting = bool(kinds) and d >= drift_day
        sensors = _simulate_day(
            fleet,
            day_s,
            phys,
            late,
            failures,
            covariate=drifting and "covariate" in kinds,
            concept=drifting and "concept" in kinds,
            bounds=layout.bounds,
        )
        new_category = drifting and "new-category" in kinds
        frame, seconds = _readings_frame(fleet, layout, day_s, sensors, new_category)
        text = frame.write_csv(float_precision=DECIMALS)
        name = layout.readings_pattern.replace("{date}", day.strftime(layout.date_format))
        if bad_rows > 0:
            text, bad = corruptor.corrupt(text, seconds, name, day)
            report.bad_rows.extend(bad)
        path = layout.readings_dir / name
        put_file(path, text)
        report.readings_files.append(path)
        report.rows += text.count("\n") - 1

    report.event_files, report.events = _write_events(fleet, layout, failures, start, start_s, days)
    return report
