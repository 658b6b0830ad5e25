"""The online service's request log: append-only JSON lines, one file per worker process.

The server (serving/) writes one line per scored record, and one per rejected request, and
flushes them before the response is sent; the inference_log asset reads one day of it.
No Dagster and no web framework here: the writer and the readers are plain functions.

Files: `<log dir>/inference-<YYYY-MM-DD>-<pid>-<seq>.jsonl`. The date is the UTC day the file
was opened (a new file each day, and each time one passes `max_bytes`); the pid names the
worker, so workers never share a file. A line (the log record schema):

    request_id   str     one per HTTP request; a batch's records share it
    record       int     the record's index in the request (null for a rejected request)
    time         str     ISO 8601 UTC, when the response was ready
    event_time   str     the reading's timestamp, ISO 8601 naive UTC (the partition key)
    entity       str     the entity key
    route        str     champion | canary | shadow (null for a rejected request)
    model_version int    the version that produced `outputs`
    status       int     the request's HTTP status
    latency_ms   float   the request, from its body read to its response built
    score_ms     float   this model's scoring time for the request's records
    inputs       object  the reading as the device sent it
    features     object  the feature vector the model scored (online feature store)
    outputs      object  {"score": float, "decision": int | float}
    fallback     str     why the entity's stored state was not used (reading_only), or null
    bandit       object  bandit mode: {"explore": bool, "arms": {version: [alpha, beta]}},
                         the posteriors the route was chosen on; absent in other modes
    error        object  a rejected request's {"code", "detail": [...]}, else absent
    pid          int     the worker process

A shadow request writes two lines per record with the same request_id and record: route
champion (what the client got) and route shadow (the challenger's score, not returned).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic_core import PydanticSerializationError, to_json

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl


DEFAULT_MAX_BYTES = 128 * 1024 * 1024
# Readings are logged when they are served, never before they happen: a day's records are
# in files opened that day or later. One day of slack covers device clocks running ahead.
CLOCK_SLACK = dt.timedelta(days=1)
ROUTES = ("champion", "canary", "shadow")


@functools.cache
def file_re(prefix: str) -> re.Pattern[str]:
    """`<prefix>-<day>-<pid>-<seq>.jsonl`: the request log (inference) and the field
    feedback (mlops.feedback) share the writer and the naming."""
    return re.compile(rf"^{re.escape(prefix)}-(\d{{4}}-\d{{2}}-\d{{2}})-(\d+)-(\d+)\.jsonl$")


@functools.cache
def log_schema() -> dict[str, pl.DataType]:
    """The request log's columns, as `read_day` returns them (a function: polars loads only when a log is read)."""
    return {
        "request_id": pl.String(),
        "record": pl.Int64(),
        "time": pl.Datetime("us", "UTC"),
        "event_time": pl.Datetime("us"),
        "entity": pl.String(),
        "route": pl.String(),
        "model_version": pl.Int64(),
        "status": pl.Int64(),
        "score": pl.Float64(),
        "decision": pl.Float64(),
        "latency_ms": pl.Float64(),
        "score_ms": pl.Float64(),
        "fallback": pl.String(),
        "inputs": pl.String(),  # JSON text: the schema's columns, as sent
        "features": pl.String(),  # JSON text: feature name -> value
        "pid": pl.Int64(),
        "bandit": pl.String(),  # JSON text: bandit mode's route decision, else null
    }


def inference_log_dir(spec_name: str) -> Path:
    """Where the service writes, and the asset reads, one spec's log:
    `$MLOPS_INFERENCE_LOG_DIR/<spec>` (default `.mlops/inference_log/<spec>`)."""
    from mlops.settings import settings

    return settings().inference_log_dir / spec_name


# Writing ---------------------------------------------------------------------------------------


class InferenceLogWriter:
    """Appends lines to this process's current file; rotates by UTC day and by size.

    `write` returns once the lines are in the operating system (flushed): a process that
    exits, even on a signal, after `write` returned has them in the file.
    """

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        prefix: str = "inference",
    ):
        self.directory = Path(directory)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._day: str | None = None
        self._size = 0
        self._pid = os.getpid()
        self.path: Path | None = None

    def _open(self, day: str) -> None:
        if self._file is not None:
            self._file.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        prefix = f"{self.prefix}-{day}-{self._pid}-"
        seqs = [
            int(m.group(3))
            for p in self.directory.glob(prefix + "*.jsonl")
            if (m := file_re(self.prefix).match(p.name))
        ]
        # Always a new file: a previous process with the same pid may have left a torn line.
        self.path = self.directory / f"{prefix}{max(seqs, default=-1) + 1:04d}.jsonl"
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open
        self._day, self._size = day, 0

    def write(self, lines: Iterable[dict[str, Any]]) -> None:
        text = b"".join(_encode(line) + b"\n" for line in lines)
        day = self.clock().date().isoformat()
        with self._lock:
            if (
                self._file is None
                or day != self._day
                or self._size >= self.max_bytes
                or os.getpid() != self._pid
            ):
                self._open(day)
            assert self._file is not None
            self._file.write(text)
            self._file.flush()
            self._size += len(text)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _encode(line: dict[str, Any]) -> bytes:
    """One line's compact JSON (UTF-8). pydantic-core's encoder (in the locked set through
    pydantic) is 4-5 times faster than json.dumps on a served reading's line, with the same
    values; a string it cannot encode as UTF-8 (a lone surrogate a request's JSON escaped)
    goes through json.dumps, which escapes it again."""
    try:
        return to_json(line, fallback=str)
    except PydanticSerializationError:
        return json.dumps(line, separators=(",", ":"), default=str).encode()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# Reading ---------------------------------------------------------------------------------------


def log_files(
    directory: str | Path, since: dt.date | None = None, prefix: str = "inference"
) -> list[Path]:
    """The log's files, oldest first; with `since`, only files opened on or after that day."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    pattern = file_re(prefix)
    for p in d.iterdir():
        m = pattern.match(p.name)
        if m and (since is None or dt.date.fromisoformat(m.group(1)) >= since):
            found.append((m.group(1), int(m.group(2)), int(m.group(3)), p))
    return [p for *_, p in sorted(found)]


def read_lines(files: Iterable[Path]) -> tuple[list[dict[str, Any]], int]:
    """Every parseable line of the files, and how many lines were not (a torn last line of a
    killed process, for instance)."""
    out: list[dict[str, Any]] = []
    bad = 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
                else:
                    bad += 1
    return out, bad


def _json_text(v: Any) -> str | None:
    return None if v is None else json.dumps(v, separators=(",", ":"), sort_keys=False)


def to_frame(lines: list[dict[str, Any]]) -> pl.DataFrame:
    """Log lines -> a frame in log_schema() (inputs and features kept as JSON text)."""
    cols: dict[str, list[Any]] = {k: [] for k in log_schema()}
    for rec in lines:
        outputs = rec.get("outputs") or {}
        for k in ("request_id", "record", "entity", "route", "model_version", "status"):
            cols[k].append(rec.get(k))
        for k in ("latency_ms", "score_ms"):
            cols[k].append(rec.get(k))
        cols["time"].append(rec.get("time"))
        cols["event_time"].append(rec.get("event_time"))
        cols["score"].append(outputs.get("score"))
        d = outputs.get("decision")
        cols["decision"].append(None if d is None else float(d))
        cols["fallback"].append(rec.get("fallback"))
        cols["inputs"].append(_json_text(rec.get("inputs")))
        cols["features"].append(_json_text(rec.get("features")))
        cols["pid"].append(rec.get("pid"))
        cols["bandit"].append(_json_text(rec.get("bandit")))
    text = {k: pl.String() for k in ("time", "event_time")}
    frame = pl.DataFrame(
        {k: cols[k] for k in log_schema()},
        schema={**log_schema(), **text},
        strict=False,
    )
    return frame.with_columns(
        pl.col("time").str.to_datetime(time_unit="us", time_zone="UTC", strict=False),
        pl.col("event_time").str.to_datetime(time_unit="us", strict=False),
    ).select([pl.col(k).cast(t) for k, t in log_schema().items()])


def read_day(directory: str | Path, day: dt.date | str) -> pl.DataFrame:
    """The day's served records (event time in [day, day + 1)), in log_schema(), sorted by
    event time, request and route. Rejected requests carry no event time and are left out."""
    day = dt.date.fromisoformat(day) if isinstance(day, str) else day
    lines, _ = read_lines(log_files(directory, since=day - CLOCK_SLACK))
    start = dt.datetime.combine(day, dt.time())
    frame = to_frame([ln for ln in lines if ln.get("route") in ROUTES])
    return frame.filter(
        (pl.col("event_time") >= start) & (pl.col("event_time") < start + dt.timedelta(days=1))
    ).sort(["event_time", "request_id", "record", "route"])


# Comparing routes --------------------------------------------------------------------------------


@functools.cache
def comparison_schema() -> dict[str, pl.DataType]:
    """One row per route and model version, as `compare_routes` returns them (a function: polars loads only when a log is read)."""
    return {
        "route": pl.String(),
        "model_version": pl.Int64(),
        "count": pl.Int64(),
        "mean_score": pl.Float64(),
        "decision_rate": pl.Float64(),
        "latency_p50_ms": pl.Float64(),
        "latency_p99_ms": pl.Float64(),
        "score_p50_ms": pl.Float64(),
        "paired": pl.Int64(),  # shadow: records scored by the champion too
        "agreement": pl.Float64(),  # shadow: share of paired records with the same decision
        "mean_abs_score_diff": pl.Float64(),  # shadow: |shadow - champion| over paired records
        "max_abs_score_diff": pl.Float64(),
        "explored": pl.Int64(),  # bandit: requests routed by the exploration floor
        "posterior_alpha": pl.Float64(),  # bandit: the version's Beta posterior, as of the
        "posterior_beta": pl.Float64(),  # newest request of the log
        "posterior_mean": pl.Float64(),
    }


def compare_routes(log: pl.DataFrame) -> pl.DataFrame:
    """Per route and model version: count, mean score, decision rate, latency p50/p99; for
    the shadow route also the agreement with, and the score difference from, the champion's
    answer to the same records (paired on request id and record)."""
    if log.height == 0:
        return pl.DataFrame(schema=comparison_schema())
    stats = (
        log.group_by("route", "model_version")
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            pl.col("score").mean().alias("mean_score"),
            pl.col("decision").mean().alias("decision_rate"),
            pl.col("latency_ms").quantile(0.5, "linear").alias("latency_p50_ms"),
            pl.col("latency_ms").quantile(0.99, "linear").alias("latency_p99_ms"),
            pl.col("score_ms").quantile(0.5, "linear").alias("score_p50_ms"),
        )
        .sort("route", "model_version")
    )
    pair = ["request_id", "record"]
    champ = log.filter(pl.col("route") == "champion").select(
        *pair, pl.col("score").alias("c_score"), pl.col("decision").alias("c_decision")
    )
    shadow = log.filter(pl.col("route") == "shadow").join(champ, on=pair, how="inner")
    paired = shadow.group_by("route", "model_version").agg(
        pl.len().cast(pl.Int64).alias("paired"),
        (pl.col("decision") == pl.col("c_decision")).cast(pl.Float64).mean().alias("agreement"),
        (pl.col("score") - pl.col("c_score")).abs().mean().alias("mean_abs_score_diff"),
        (pl.col("score") - pl.col("c_score")).abs().max().alias("max_abs_score_diff"),
    )
    out = stats.join(paired, on=["route", "model_version"], how="left")
    out = out.join(_posteriors(log), on=["route", "model_version"], how="left")
    return out.select([pl.col(k).cast(t) for k, t in comparison_schema().items()])


def _posteriors(log: pl.DataFrame) -> pl.DataFrame:
    """Bandit mode: per route and version, the requests that explored, and the version's
    posterior as the newest routed request saw it."""
    schema = {
        "route": pl.String(),
        "model_version": pl.Int64(),
        "explored": pl.Int64(),
        "posterior_alpha": pl.Float64(),
        "posterior_beta": pl.Float64(),
        "posterior_mean": pl.Float64(),
    }
    routed = log.filter(pl.col("bandit").is_not_null()) if "bandit" in log.columns else log.clear()
    if routed.height == 0:
        return pl.DataFrame(schema=schema)
    explored = routed.group_by("route", "model_version").agg(
        pl.col("bandit")
        .str.contains('"explore":true', literal=True)
        .sum()
        .cast(pl.Int64)
        .alias("explored")
    )
    newest = json.loads(routed.sort("time")["bandit"][-1]).get("arms") or {}
    post = pl.DataFrame(
        [
            {"model_version": int(v), "posterior_alpha": float(a), "posterior_beta": float(b),
             "posterior_mean": float(a) / (float(a) + float(b))}
            for v, (a, b) in newest.items()
        ],
        schema={k: schema[k] for k in ("model_version", "posterior_alpha", "posterior_beta", "posterior_mean")},
    )  # fmt: skip
    return explored.join(post, on="model_version", how="left").select(list(schema))
