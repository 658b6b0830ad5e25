"""Labels per prediction point, with label maturity.

A label row is (entity, timestamp = the prediction time / cut-off, label, mature). For an
event feed, label = an event for the entity in (t, t + horizon]. Events arrive late, so a
row's label is final (mature) only once the feed has arrived through t + maturity; the
training set uses mature rows only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlops import ingest
from mlops.spec import EventFeed, Spec, parse_duration

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

ENTITY = "_entity"  # internal entity key when the spec has none
MATURE = "label_mature"
AS_OF = "label_as_of"


def entity_column(spec: Spec) -> str:
    return spec.source.entity_column or ENTITY


def with_entity(spec: Spec, df: pl.DataFrame) -> pl.DataFrame:
    """Datasets without an entity key behave as one entity."""
    if spec.source.entity_column or ENTITY in df.columns:
        return df
    return df.with_columns(pl.lit("all").alias(ENTITY))


@dataclass
class EventBatch:
    events: pl.DataFrame  # columns: entity, event time
    files: list[Path]
    content_hash: str
    as_of: dt.datetime | None  # end of the last day the feed has arrived for, contiguously
    rows_unparseable: int


def events_window(spec: Spec, day: dt.date) -> tuple[dt.date, dt.date]:
    """Arrival days whose files can hold events that label rows of `day`."""
    reach = dt.timedelta(days=1) + spec.maturity
    last = (dt.datetime.combine(day, dt.time()) + reach - dt.timedelta(microseconds=1)).date()
    return day, max(day, last)


def load_events(spec: Spec, day: dt.date) -> EventBatch:
    feed = spec.labels.events
    assert feed is not None
    folder = spec.resolve(feed.path)
    first, last = events_window(spec, day)
    files: list[Path] = []
    arrived_through: dt.date | None = None
    d = first
    while d <= last:
        day_files = ingest.files_for_day(feed, folder, d)
        if not day_files:
            break  # a gap: later files cannot make earlier rows mature
        files.extend(day_files)
        arrived_through = d
        d += dt.timedelta(days=1)
    events, bad = _parse_events(spec, feed, files)
    as_of = (
        dt.datetime.combine(arrived_through + dt.timedelta(days=1), dt.time())
        if arrived_through
        else None
    )
    return EventBatch(events, files, ingest.content_hash(files), as_of, bad)


def _parse_events(spec: Spec, feed: EventFeed, files: list[Path]) -> tuple[pl.DataFrame, int]:
    ent = entity_column(spec)
    schema = {ent: pl.String, "event_time": pl.Datetime("us")}
    if not files:
        return pl.DataFrame(schema=schema), 0
    raw = pl.concat(
        [ingest.read_file(p, feed.format, feed.encoding, "labels.events.encoding") for p in files],
        how="diagonal",
    )
    missing = [c for c in (feed.timestamp_column, feed.entity_column) if c and c not in raw.columns]
    if missing:
        raise ingest.LandingError(
            f"event feed files {[p.name for p in files]} lack column(s) {missing} named in "
            "spec labels.events"
        )
    ts = pl.col(feed.timestamp_column).str.strip_chars()
    parsed = (
        ts.str.to_datetime(feed.timestamp_format, strict=False, time_unit="us")
        if feed.timestamp_format
        else ts.str.to_datetime(strict=False, time_unit="us")
    )
    out = raw.select(
        (pl.col(feed.entity_column) if feed.entity_column else pl.lit("all")).alias(ent),
        parsed.alias("event_time"),
    )
    bad = out.filter(pl.col("event_time").is_null() | pl.col(ent).is_null()).height
    return out.drop_nulls().unique().sort([ent, "event_time"]), bad


def event_labels(
    spec: Spec, points: pl.DataFrame, events: pl.DataFrame, as_of: dt.datetime | None
) -> pl.DataFrame:
    """Label each prediction point: an event for its entity in (t, t + horizon]."""
    ent, ts = entity_column(spec), spec.source.timestamp_column
    horizon = parse_duration(spec.labels.horizon)
    pts = points.select(ent, ts).sort(ts)
    ev = (
        events.rename({"event_time": "_next_event"})
        .with_columns(pl.col("_next_event").alias("_event_key"))
        .sort("_event_key")
    )
    joined = pts.join_asof(
        ev,
        left_on=ts,
        right_on="_event_key",
        by=ent,
        strategy="forward",
        allow_exact_matches=False,
        check_sortedness=False,  # sorted by time; polars cannot verify it per group
    )
    label = (pl.col("_next_event") - pl.col(ts) <= horizon).fill_null(False).cast(pl.Int8)
    return _finish(spec, joined.with_columns(label.alias(spec.labels.name)), as_of)


def column_labels(spec: Spec, valid: pl.DataFrame, as_of: dt.datetime | None) -> pl.DataFrame:
    ent = entity_column(spec)
    rows = with_entity(spec, valid).select(
        ent, spec.source.timestamp_column, pl.col(spec.labels.column).alias(spec.labels.name)
    )
    return _finish(spec, rows, as_of)


def _finish(spec: Spec, rows: pl.DataFrame, as_of: dt.datetime | None) -> pl.DataFrame:
    ent, ts = entity_column(spec), spec.source.timestamp_column
    mature = (
        (pl.col(ts) + spec.maturity <= pl.lit(as_of, dtype=pl.Datetime("us")))
        if as_of is not None
        else pl.lit(False)
    )
    return (
        rows.select(ent, ts, spec.labels.name)
        .with_columns(mature.alias(MATURE), pl.lit(as_of, dtype=pl.Datetime("us")).alias(AS_OF))
        .sort([ts, ent])
    )


# Field feedback (mlops.feedback's label_feedback rows) as labels -------------------------------


def label_dtype(spec: Spec) -> pl.DataType:
    return pl.Int64() if spec.model.task == "binary_classification" else pl.Float64()


def feedback_rows(spec: Spec, feedback: pl.DataFrame | None) -> pl.DataFrame:
    """label_feedback rows (entity, event_time, label) -> rows in the labels' layout."""
    if feedback is None:
        feedback = pl.DataFrame(
            schema={"entity": pl.String, "event_time": pl.Datetime("us"), "label": pl.Float64}
        )
    return feedback.select(
        pl.col("entity").alias(entity_column(spec)),
        pl.col("event_time").alias(spec.source.timestamp_column),
        pl.col("label").cast(label_dtype(spec)).alias(spec.labels.name),
    )


def override(
    spec: Spec, labels: pl.DataFrame, feedback: pl.DataFrame
) -> tuple[pl.DataFrame, int, int]:
    """The labels with field feedback replacing the label of each reading it names; returns
    (labels, rows overridden, feedback rows that name no labelled reading)."""
    if feedback.height == 0:
        return labels, 0, 0
    ent, ts, name = entity_column(spec), spec.source.timestamp_column, spec.labels.name
    fb = feedback_rows(spec, feedback).rename({name: "_feedback"})
    joined = labels.join(fb, on=[ent, ts], how="left")
    hit = joined["_feedback"].is_not_null()
    out = joined.with_columns(
        pl.coalesce(pl.col("_feedback").cast(labels.schema[name]), pl.col(name)).alias(name)
    ).drop("_feedback")
    n = int(hit.sum())
    return out, n, fb.height - n


def build_labels(
    spec: Spec,
    valid: pl.DataFrame,
    day: dt.date,
    data_through: dt.date | None = None,
    feedback: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Labels for one day's valid rows, plus metadata about where they came from.

    `data_through`: the newest day whose data is in the lake (column labels and feedback):
    the clock of their maturity, so a label follows the data, never the wall clock, and a
    file or a SQL source behave alike. `feedback`: the day's label_feedback rows (specs
    that use field feedback): the labels themselves (kind feedback: a reading without
    feedback has no label row), or overrides of the column's or the feed's labels."""
    if spec.labels.kind in ("column", "feedback"):
        # Final once `maturity` has passed after the newest day in the lake: a re-delivered
        # file (or a technician's correction) can still change them before that.
        through = max(data_through or day, day)
        as_of = dt.datetime.combine(through + dt.timedelta(days=1), dt.time())
        if spec.labels.kind == "feedback":
            rows = feedback_rows(spec, feedback)
            return _finish(spec, rows, as_of), {
                "source": "field feedback",
                "data_through": through.isoformat(),
                "readings_labelled": rows.height,
                "readings_unlabelled": max(valid.height - rows.height, 0),
                "data_version": None,
            }
        labels = column_labels(spec, with_entity(spec, valid), as_of)
        info: dict = {
            "source": f"column {spec.labels.column}",
            "data_through": through.isoformat(),
            "data_version": None,
        }
    else:
        batch = load_events(spec, day)
        labels = event_labels(spec, with_entity(spec, valid), batch.events, batch.as_of)
        info = {
            "source": "event feed",
            "event_files": [p.name for p in batch.files],
            "events": batch.events.height,
            "events_unparseable": batch.rows_unparseable,
            "data_version": batch.content_hash,
        }
    if spec.labels.feedback == "override" and feedback is not None:
        labels, n, unmatched = override(spec, labels, feedback)
        info |= {"feedback_overrides": n, "feedback_unmatched": unmatched}
    return labels, info
