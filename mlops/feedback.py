"""Labels from the field: technicians confirm or deny what the model predicted.

Feedback names a reading in one of two ways and gives its label:

    {"request_id": "...", "record": 0, "label": 1}     a served request (record: the
                                                        reading's index in it; optional
                                                        when the request had one reading)
    {"entity": "M0007", "timestamp": "...", "label": 0} the reading itself (entity only
                                                        when the spec has an entity key;
                                                        the spec's own column names, as
                                                        /predict takes them, work too)

The label is checked against the spec's label type (binary: 0/1 or true/false; regression:
a finite number). `POST /feedback` (serving/) and `mlops labels import` append it durably
(flushed, rotated by day and size) to `feedback-<day>-<pid>-<seq>.jsonl` beside the request
log, through the request log's own writer.

The label_feedback asset ingests it by the *reading's* day, as the inference_log asset
does: a reading of day D can be labelled on D or weeks later (active learning labels old
readings), and its day's labels, training rows and realized performance follow. A
request id is resolved against the request log; the newest feedback for a reading wins
(a technician's correction replaces a mistake). What cannot be used is kept with its
reason: feedback that names no served request, or a request of several readings without
`record`.

`labels.kind: feedback` makes the feedback the labels (a reading without feedback has no
label); `labels.feedback: override` lets it replace a column's or an event feed's label.
Export picks the readings most worth a technician's time (`uncertainty`: scores nearest
the decision threshold; `random`), as a CSV with an empty `label` column to fill in.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import random
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops import inference_log
from mlops.inference_log import CLOCK_SLACK, InferenceLogWriter, log_files, now_iso, read_lines
from mlops.labels import entity_column
from mlops.spec import Spec

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

PREFIX = "feedback"
FIELDS = ("request_id", "record", "entity", "timestamp", "label")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# How far back a request id is looked for before feedback naming it is rejected as unknown.
RESOLVE_DAYS = 30
SOURCES = ("api", "import")
_REQUEST_ID_IN_LINE = re.compile(r'"request_id":"([A-Za-z0-9._:-]{1,64})"')
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}


class FeedbackError(ValueError):
    """Feedback that cannot be used: each problem names the item, the field and the reason."""

    def __init__(self, message: str, problems: list[dict[str, Any]]):
        super().__init__(message)
        self.problems = problems


def problem(item: int | None, field: str | None, code: str, reason: str) -> dict[str, Any]:
    return {"record": item, "field": field, "code": code, "reason": reason}


def feedback_dir(spec_name: str) -> Path:
    """Beside the spec's request log (`$MLOPS_INFERENCE_LOG_DIR/<spec>`): one folder to keep."""
    return inference_log.inference_log_dir(spec_name)


# Checking one item ------------------------------------------------------------------------------


def label_value(spec: Spec, v: Any) -> tuple[float | None, str | None]:
    """The label as a number, or why it is not one of the spec's label type."""
    if spec.model.task == "binary_classification":
        if isinstance(v, bool):
            return float(v), None
        if isinstance(v, int | float) and v in (0, 1):
            return float(v), None
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return (1.0 if v.strip().lower() in _TRUE else 0.0), None
        return None, f"{_shown(v)} is not a binary label: send 0 or 1 (or true/false)"
    if isinstance(v, bool):
        return None, f"{_shown(v)} is not a number: a regression label is a finite number"
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None, f"{_shown(v)} is not a number: a regression label is a finite number"
    try:
        if isinstance(v, int | float) and math.isfinite(v):
            return float(v), None
    except OverflowError:  # an integer too large for a float
        pass
    return None, f"{_shown(v)} is not a finite number: a regression label is a finite number"


def _shown(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_timestamp(v: Any, fmt: str | None) -> tuple[dt.datetime | None, str | None]:
    """A reading's timestamp as naive UTC (as the request log and the lake hold it)."""
    if not isinstance(v, str) or not v.strip():
        return None, f"{_shown(v)} is not a timestamp string"
    try:
        ts = dt.datetime.strptime(v.strip(), fmt) if fmt else dt.datetime.fromisoformat(v.strip())
    except ValueError:
        return (
            None,
            f"{_shown(v)} is not a timestamp ({fmt or 'ISO 8601, e.g. 2026-01-03T05:00:00'})",
        )
    if ts.tzinfo is not None:
        ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
    return ts, None


def check_items(spec: Spec, items: list[Any], iso: bool = False) -> list[dict[str, Any]]:
    """Items -> normalized feedback ({request_id, record, entity, event_time, label}); all
    or nothing: any problem raises FeedbackError naming every item, field and reason.
    Timestamps are in the spec's format, as /predict takes them (`iso`: ISO 8601, as an
    export writes them)."""
    problems: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    has_entity = bool(spec.source.entity_column)
    ts_format = None if iso else spec.source.timestamp_format
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(problem(i, None, "type", f"{_shown(item)} is not a JSON object"))
            continue
        item = _named_as_the_spec(spec, item)
        extra = sorted(set(item) - set(FIELDS))
        for k in extra:
            problems.append(
                problem(i, k, "extra", f"unknown field; feedback takes {', '.join(FIELDS)}")
            )
        n = len(problems)
        label, why = label_value(spec, item.get("label"))
        if "label" not in item:
            problems.append(problem(i, "label", "missing", "every feedback item needs a label"))
        elif why:
            problems.append(problem(i, "label", "type", why))
        rid, rec = item.get("request_id"), item.get("record")
        entity, stamp = item.get("entity"), item.get("timestamp")
        row: dict[str, Any] = {
            "request_id": None,
            "record": None,
            "entity": None,
            "event_time": None,
        }
        if rid is not None:
            if stamp is not None or entity is not None:
                problems.append(
                    problem(i, "request_id", "form", "give request_id (and record) or "
                            "entity and timestamp, not both")
                )  # fmt: skip
            elif not isinstance(rid, str) or not REQUEST_ID_RE.match(rid):
                problems.append(
                    problem(i, "request_id", "type", f"{_shown(rid)} is not a request id "
                            "(1-64 of A-Z a-z 0-9 . _ : -)")
                )  # fmt: skip
            row["request_id"] = rid
            if rec is not None and (isinstance(rec, bool) or not isinstance(rec, int) or rec < 0):
                problems.append(
                    problem(
                        i,
                        "record",
                        "type",
                        f"{_shown(rec)} is not a record index (an integer >= 0)",
                    )
                )
            row["record"] = rec
        else:
            if rec is not None:
                problems.append(problem(i, "record", "form", "record goes with request_id"))
            ts, why = parse_timestamp(stamp, ts_format) if stamp is not None else (None, None)
            if stamp is None:
                problems.append(
                    problem(i, "timestamp", "missing", "name the reading: request_id, or "
                            + ("entity and timestamp" if has_entity else "timestamp"))
                )  # fmt: skip
            elif why:
                problems.append(problem(i, "timestamp", "type", why))
            if has_entity:
                if entity is None:
                    problems.append(
                        problem(
                            i, "entity", "missing", f"the reading's {spec.source.entity_column}"
                        )
                    )
                elif (
                    isinstance(entity, bool)
                    or not isinstance(entity, str | int)
                    or str(entity) == ""
                ):
                    problems.append(
                        problem(i, "entity", "type", f"{_shown(entity)} is not an entity key")
                    )
            row["entity"] = str(entity) if has_entity and entity is not None else "all"
            row["event_time"] = ts.isoformat() if ts else None
        if len(problems) == n:
            out.append({**row, "label": label})
    if problems:
        raise FeedbackError(
            f"{len(problems)} problem(s) in {len(items)} feedback item(s); nothing was recorded",
            problems,
        )
    return out


def _named_as_the_spec(spec: Spec, item: dict[str, Any]) -> dict[str, Any]:
    """The reading's own column names (as /predict takes them: `machine_id`, `timestamp`)
    stand for `entity` and `timestamp`."""
    aliases = {spec.source.entity_column: "entity", spec.source.timestamp_column: "timestamp"}
    aliases = {k: v for k, v in aliases.items() if k and k != v and k in item and v not in item}
    return {aliases.get(k, k): v for k, v in item.items()} if aliases else item


def parse_body(spec: Spec, body: bytes, max_items: int) -> list[dict[str, Any]]:
    """A request body (one item, a list, or {"records": [...]}) -> checked items."""
    if not body.strip():
        raise FeedbackError("the body is empty: send JSON", [])
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise FeedbackError(
            f"the body is not valid JSON: {type(e).__name__}: {e}"[:300], []
        ) from None
    if isinstance(data, dict) and set(data) == {"records"}:
        data = data["records"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise FeedbackError("no feedback items: send one object or a non-empty list", [])
    if len(items) > max_items:
        raise FeedbackError(f"{len(items)} items is more than the limit of {max_items}", [])
    return check_items(spec, items)


# Writing ----------------------------------------------------------------------------------------


class FeedbackWriter:
    """Appends checked items durably (the request log's writer: flushed before returning)."""

    def __init__(self, directory: str | Path, max_bytes: int = inference_log.DEFAULT_MAX_BYTES):
        self.log = InferenceLogWriter(directory, max_bytes, prefix=PREFIX)

    def append(self, items: list[dict[str, Any]], source: str) -> list[str]:
        assert source in SOURCES
        if not items:
            return []
        now = now_iso()
        lines = [
            {**it, "feedback_id": uuid.uuid4().hex, "time": now, "source": source} for it in items
        ]
        self.log.write(lines)
        return [ln["feedback_id"] for ln in lines]

    def close(self) -> None:
        self.log.close()


# Ingesting one day ------------------------------------------------------------------------------


@functools.cache
def feedback_schema() -> dict[str, pl.DataType]:
    """The label_feedback table: one row per labelled reading (the newest feedback for it)."""
    return {
        "entity": pl.String(),
        "event_time": pl.Datetime("us"),
        "label": pl.Float64(),
        "received_at": pl.Datetime("us", "UTC"),
        "source": pl.String(),
        "feedback_id": pl.String(),
        "request_id": pl.String(),
        "record": pl.Int64(),
        "model_version": pl.Int64(),
        "route": pl.String(),
        "score": pl.Float64(),
        "decision": pl.Float64(),
    }


@functools.cache
def rejected_schema() -> dict[str, pl.DataType]:
    return {
        "feedback_id": pl.String(),
        "received_at": pl.Datetime("us", "UTC"),
        "source": pl.String(),
        "request_id": pl.String(),
        "record": pl.Int64(),
        "label": pl.Float64(),
        "reason": pl.String(),
    }


@dataclass
class FeedbackDay:
    accepted: pl.DataFrame  # feedback_schema(): the day's labelled readings
    rejected: pl.DataFrame  # rejected_schema(): ambiguous feedback on the day's requests, and
    # feedback received that day naming a request the log does not know
    lines: int  # feedback lines about the day's readings (before the newest-wins rule)
    superseded: int  # older feedback for a reading that got newer feedback
    unreadable: int  # torn or non-JSON lines in the files read
    files: list[str]


def _frame(rows: list[dict[str, Any]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    text = {k: pl.String() for k, t in schema.items() if isinstance(t, pl.Datetime)}
    frame = pl.DataFrame(
        {k: [r.get(k) for r in rows] for k in schema}, schema={**schema, **text}, strict=False
    )
    return frame.with_columns(
        [
            pl.col(k).str.to_datetime(time_unit="us", time_zone=schema[k].time_zone, strict=False)  # type: ignore[attr-defined]
            for k in text
        ]
    ).select([pl.col(k).cast(t) for k, t in schema.items()])


def ingest_day(spec: Spec, directory: str | Path, day: dt.date | str) -> FeedbackDay:
    """The feedback about readings of `day` (event time in [day, day + 1)), resolved and
    newest-wins, plus the feedback *received* on `day` that names no usable reading."""
    day = dt.date.fromisoformat(day) if isinstance(day, str) else day
    directory = Path(directory)
    files = log_files(directory, since=day - CLOCK_SLACK, prefix=PREFIX)
    lines, unreadable = read_lines(files)
    start = dt.datetime.combine(day, dt.time())
    end = start + dt.timedelta(days=1)
    served = inference_log.read_day(directory, day).filter(pl.col("route") != "shadow")
    by_request: dict[str, list[dict[str, Any]]] = {}
    for row in served.select(
        "request_id",
        "record",
        "entity",
        "event_time",
        "model_version",
        "route",
        "score",
        "decision",
    ).iter_rows(named=True):
        by_request.setdefault(row["request_id"], []).append(row)
    by_reading = {(r["entity"], r["event_time"]): r for rs in by_request.values() for r in rs}
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    received_today = [
        ln for ln in lines
        if isinstance(ln.get("time"), str) and ln["time"][:10] == day.isoformat()
    ]  # fmt: skip
    for ln in lines:
        base = {k: ln.get(k) for k in ("feedback_id", "source", "request_id", "record", "label")}
        base["received_at"] = ln.get("time")
        rid = ln.get("request_id")
        if rid is not None:
            recs = by_request.get(rid)
            if not recs:
                continue  # another day's request (or unknown: judged on its arrival day below)
            rec = ln.get("record")
            if rec is None:
                if len(recs) != 1 or recs[0]["record"] != 0:
                    why = f"request {rid} has {len(recs)} readings that day: give 'record'"
                    rejected.append({**base, "reason": why})
                    continue
                match = recs[0]
            else:
                match = next((r for r in recs if r["record"] == rec), None)
                if match is None:
                    continue  # that record is another day's reading
            rows.append({**base, **match, "event_time": match["event_time"].isoformat()})
            continue
        try:
            when = dt.datetime.fromisoformat(ln.get("event_time") or "")
        except ValueError:
            continue
        if not start <= when < end:
            continue
        served_row = by_reading.get((ln.get("entity"), when), {})
        rows.append(
            {
                **{k: served_row.get(k) for k in ("model_version", "route", "score", "decision")},
                **base,
                "entity": ln.get("entity"),
                "event_time": when.isoformat(),
            }
        )
    # Request ids received today that the request log does not know at all.
    asked = {ln["request_id"]: day.isoformat() for ln in received_today if ln.get("request_id")}
    if asked:
        known = _request_days(directory, asked)
        for ln in received_today:
            rid = ln.get("request_id")
            if rid and rid not in known:
                rejected.append(
                    {
                        **{
                            k: ln.get(k)
                            for k in ("feedback_id", "source", "request_id", "record", "label")
                        },
                        "received_at": ln.get("time"),
                        "reason": f"request {rid} is not in the request log of the last "
                        f"{RESOLVE_DAYS} days ({directory})",
                    }
                )
    frame = _frame(rows, feedback_schema())
    newest = frame.sort("received_at", "feedback_id").unique(
        ["entity", "event_time"], keep="last", maintain_order=True
    )
    return FeedbackDay(
        accepted=newest.sort("event_time", "entity"),
        rejected=_frame(rejected, rejected_schema()),
        lines=frame.height,
        superseded=frame.height - newest.height,
        unreadable=unreadable,
        files=[p.name for p in files],
    )


# Active learning: what to label next ------------------------------------------------------------

STRATEGIES = ("uncertainty", "random")


def select_for_labelling(
    spec: Spec, scored: pl.DataFrame, strategy: str, n: int, threshold: float | None, seed: int = 0
) -> pl.DataFrame:
    """`n` scored readings most worth labelling: `uncertainty` takes the scores nearest the
    decision threshold (binary classification only), `random` a seeded uniform sample."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if scored.height == 0:
        return scored
    if strategy == "uncertainty":
        if spec.model.task != "binary_classification":
            raise ValueError(
                "uncertainty sampling needs a decision threshold, which a regression model does "
                "not have: use --strategy random"
            )
        t = 0.5 if threshold is None else threshold
        return scored.sort((pl.col("score") - t).abs(), maintain_order=True).head(n)
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(scored.height), min(n, scored.height)))
    return scored[picked]


def export_frame(spec: Spec, picked: pl.DataFrame, features: Iterable[str]) -> pl.DataFrame:
    """The CSV a technician fills in: the reading's key, its score and features, an empty label."""
    ent, ts = entity_column(spec), spec.source.timestamp_column
    cols = [c for c in features if c in picked.columns and c not in (ent, ts, "score", "decision")]
    out = picked.select(
        pl.col(ent).cast(pl.String).alias("entity"),
        pl.col(ts).dt.strftime("%Y-%m-%dT%H:%M:%S%.f").alias("timestamp"),
        "score",
        *(["decision"] if "decision" in picked.columns else []),
        *cols,
    )
    return out.with_columns(pl.lit(None, dtype=pl.String).alias("label"))


def import_rows(spec: Spec, frame: pl.DataFrame, where: str) -> tuple[list[dict[str, Any]], int]:
    """A filled-in export -> checked feedback items; rows with an empty label are skipped
    (returned as the second value). Problems name the CSV row (1 = the first data row)."""
    missing = [c for c in ("timestamp", "label") if c not in frame.columns]
    if spec.source.entity_column and "entity" not in frame.columns:
        missing.insert(0, "entity")
    if missing:
        raise FeedbackError(
            f"{where} lacks column(s) {missing}: import the CSV `mlops labels export` wrote, "
            "with its label column filled in",
            [],
        )
    items, csv_rows, skipped = [], [], 0
    for i, row in enumerate(frame.iter_rows(named=True), start=1):
        lab = row.get("label")
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            skipped += 1
            continue
        item = {"timestamp": row["timestamp"], "label": lab}
        if spec.source.entity_column:
            item["entity"] = row["entity"]
        items.append(item)
        csv_rows.append(i)
    try:
        return check_items(spec, items, iso=True), skipped
    except FeedbackError as e:
        for p in e.problems:
            p["record"] = None if p["record"] is None else csv_rows[p["record"]]
        raise FeedbackError(f"{where}: {e}", e.problems) from None


# What the feedback sensor needs: which days' labels new feedback touches -------------------------


@dataclass
class FeedbackScan:
    offsets: dict[str, int]  # file name -> bytes read (whole lines only)
    days: set[str]  # reading days that new feedback labels
    unresolved: set[str]  # arrival days of new feedback naming a request the log lacks
    lines: int


def scan_new(directory: str | Path, offsets: dict[str, int]) -> FeedbackScan:
    """The feedback appended since `offsets`: the days of the readings it labels (a request
    id is looked up in the request log). A torn last line waits for its end."""
    directory = Path(directory)
    new_offsets: dict[str, int] = {}
    direct: set[str] = set()
    wanted: dict[str, str] = {}  # request id -> arrival day
    n = 0
    for path in log_files(directory, prefix=PREFIX):
        start = offsets.get(path.name, 0)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        new_offsets[path.name] = start
        if size <= start:
            continue
        with open(path, "rb") as f:
            f.seek(start)
            chunk = f.read(size - start)
        cut = chunk.rfind(b"\n") + 1
        new_offsets[path.name] = start + cut
        for raw in chunk[:cut].splitlines():
            try:
                ln = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(ln, dict):
                continue
            n += 1
            if ln.get("request_id"):
                wanted[ln["request_id"]] = str(ln.get("time", ""))[:10]
            elif isinstance(ln.get("event_time"), str):
                direct.add(ln["event_time"][:10])
    found = _request_days(directory, wanted)
    unresolved = {day for rid, day in wanted.items() if rid not in found and day}
    return FeedbackScan(new_offsets, direct | set().union(*found.values()), unresolved, n)


def _request_days(directory: Path, wanted: dict[str, str]) -> dict[str, set[str]]:
    """Request id -> the days of its served readings, from the request log: `wanted` maps
    each id to the day its feedback arrived, and the log is read from the oldest of those
    days less RESOLVE_DAYS, newest file first, until every id is found (a request's lines
    are in one file: one write). A regex finds the ids; only their lines are parsed."""
    if not wanted:
        return {}
    oldest = min((dt.date.fromisoformat(d) for d in wanted.values() if d), default=dt.date.today())
    out: dict[str, set[str]] = {}
    for path in reversed(log_files(directory, since=oldest - dt.timedelta(days=RESOLVE_DAYS))):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                m = _REQUEST_ID_IN_LINE.search(line)
                if not m or m.group(1) not in wanted:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("route") in ("champion", "canary") and rec.get("event_time"):
                    out.setdefault(m.group(1), set()).add(rec["event_time"][:10])
        if len(out) == len(wanted):
            break
    return out


def export_day(
    spec: Spec, lake: Any, day: str, strategy: str, n: int, seed: int = 0
) -> tuple[pl.DataFrame, str]:
    """The CSV frame of `labels export`: `n` of the day's scored readings without feedback yet,
    picked by `strategy`, with their features and score; and where the scores came from."""
    from mlops import monitoring
    from mlops.model_evaluation import load_evaluation

    if not (
        lake.exists(spec.name, "batch_predictions", day)
        or lake.exists(spec.name, "inference_log", day)
    ):
        raise ValueError(
            f"{spec.name} has no scored readings for {day}: materialize {spec.name}/batch_predictions "
            f"(or inference_log) for {day} first"
        )
    scored, source = monitoring.scored_rows(lake, spec, day)
    ent, ts = entity_column(spec), spec.source.timestamp_column
    if source == "batch" and lake.exists(spec.name, "features", day):
        feats = lake.read(spec.name, "features", day)
        extra = [c for c in feats.columns if c not in scored.columns]
        scored = scored.join(feats.select(ent, ts, *extra), on=[ent, ts], how="left")
    if lake.exists(spec.name, "label_feedback", day):
        done = lake.read(spec.name, "label_feedback", day).select(
            pl.col("entity").alias(ent), pl.col("event_time").alias(ts)
        )
        scored = scored.join(done, on=[ent, ts], how="anti")
    threshold = None
    if scored.height:
        doc = load_evaluation(lake, spec, monitoring.scored_version(scored)) or {}
        threshold = (doc.get("challenger") or {}).get("threshold")
    picked = select_for_labelling(spec, scored, strategy, n, threshold, seed)
    skip = {"model_version", "label_mature", "label_as_of", spec.labels.name}
    out = export_frame(spec, picked, [c for c in scored.columns if c not in skip])
    return out.with_columns(pl.lit(spec.name).alias("spec")), source
