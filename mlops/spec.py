"""The project spec: one YAML file per ML project, validated by pydantic.

A wrong spec fails with the field path and what was expected, so users fix it before any
run starts. Paths in a spec are relative to the project root (the folder holding specs/).

A spec is untrusted input: load_spec caps the document's size, nesting and alias expansion
(a "billion laughs" document fails in milliseconds instead of exhausting memory), echoes at
most a short excerpt of a wrong value, every number has bounds a real project never hits,
and a landing folder outside the project root needs `allow_outside_project: true`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import reprlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

NAME_RE = r"^[a-z][a-z0-9_]*$"
# An owner as the Dagster UI shows it: an email address or `team:<name>`.
OWNER_RE = r"^(team:[A-Za-z0-9_.\- ]+|[^@\s]+@[^@\s]+\.[^@\s]+)$"
DURATION_RE = re.compile(r"^(\d+)([mhd])$")
DURATION_DIGITS = 9  # 999999999d still fits a timedelta; more digits would overflow it

# Loader limits: a spec is a few KB with a few hundred YAML nodes. PyYAML's pure-Python
# parser (the one whose composer can be bounded) takes ~25 us a node, so the worst document
# under these caps still loads or fails in about a second of CPU.
MAX_SPEC_CHARS = 512 * 1024
MAX_YAML_NODES = 50_000  # nodes, aliases expanded (billion laughs: 10^9)
MAX_YAML_DEPTH = 50
MAX_PROBLEMS = 50  # problems listed in one SpecError; the rest are counted

# Bounds no real project reaches; past them a value is a typo or an attack.
FIRST_DATE, LAST_DATE = dt.date(1970, 1, 1), dt.date(2100, 12, 31)
MAX_DAYS = 3660  # ten years of daily partitions
MAX_ABS = 1e12  # metric thresholds, tolerances and search bounds, in any metric's units
FileFormat = Literal["csv", "parquet", "jsonl"]
ColumnType = Literal["float", "int", "string", "category", "bool", "timestamp"]
AggFunction = Literal["mean", "std", "min", "max", "sum", "count"]


_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = 60
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 4
_ECHO.maxlevel = 2


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def echo(value: object) -> str:
    """A short repr of a wrong value for an error message (at most ~80 characters, however
    large or deeply shared the value is: reprlib never walks more than a few items)."""
    return _clip(_ECHO.repr(value), 80)


class SpecError(ValueError):
    """A spec that cannot be used; `problems` lists (field path, message) pairs."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in problems[:MAX_PROBLEMS])
        if len(problems) > MAX_PROBLEMS:
            lines += f"\n  ... and {len(problems) - MAX_PROBLEMS} more"
        super().__init__(f"{path}: {len(problems)} problem(s)\n{lines}")


class _Problems(ValueError):
    """Raised by a model validator with (field path, message) pairs; load_spec lists each at
    its own path."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in problems))


class _Strict(BaseModel):
    # Unknown keys are errors: a typo'd field must not silently fall back to a default.
    # .inf and .nan are never a meaningful setting (a nan bound passes every comparison).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def parse_duration(text: str) -> dt.timedelta:
    """'30m', '6h', '2d' -> timedelta."""
    m = DURATION_RE.match(text.strip())
    if not m:
        raise ValueError(
            f"{echo(text)} is not a duration; expected a number and a unit: 30m, 6h, 2d"
        )
    if len(m.group(1).lstrip("0")) > DURATION_DIGITS:
        raise ValueError(f"{echo(text)} is too long a duration")
    n, unit = int(m.group(1)), m.group(2)
    return {"m": dt.timedelta(minutes=n), "h": dt.timedelta(hours=n), "d": dt.timedelta(days=n)}[
        unit
    ]


Duration = Annotated[str, Field(pattern=DURATION_RE.pattern, examples=["6h", "1d"])]


def _between(low: dt.timedelta, high: dt.timedelta) -> AfterValidator:
    """A Duration within [low, high]."""

    def check(v: str) -> str:
        if not low <= parse_duration(v) <= high:
            raise ValueError(f"must be between {_days(low)} and {_days(high)}, got '{v}'")
        return v

    return AfterValidator(check)


def _days(d: dt.timedelta) -> str:
    return f"{d.days}d" if d.days else f"{d.seconds // 60}m"


MINUTE = dt.timedelta(minutes=1)
Horizon = Annotated[Duration, _between(MINUTE, dt.timedelta(days=365))]
Maturity = Annotated[Duration, _between(dt.timedelta(0), dt.timedelta(days=730))]
Window = Annotated[Duration, _between(MINUTE, dt.timedelta(days=91))]  # lookback_days <= 90

# Cron fields (minute, hour, day of month, month, day of week) and the numbers each allows.
CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_MACROS = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")


def _cron(v: str) -> str:
    """A five-field cron (names, ranges, steps, L/W/#) or a macro; numbers within range."""
    fields = v.split()
    ok = len(v) <= 200 and (
        (len(fields) == 1 and fields[0] in CRON_MACROS)
        or (
            len(fields) == 5
            and all(re.fullmatch(r"[0-9A-Za-z*/,?#-]+", f) for f in fields)
            and all(
                lo <= int(n) <= hi
                for f, (lo, hi) in zip(fields, CRON_RANGES, strict=True)
                for n in re.findall(r"(?<![/#])\b\d+", f)
            )
        )
    )
    if not ok:
        raise ValueError(
            f"{echo(v)} is not a cron schedule; expected five fields (minute hour day month "
            "weekday), e.g. '0 2 * * *', or a macro like @daily"
        )
    return v


Cron = Annotated[str, AfterValidator(_cron)]

StartDate = Annotated[
    dt.date, Field(ge=FIRST_DATE, le=LAST_DATE, description="first daily partition")
]
EndDate = Annotated[
    dt.date | None,
    Field(
        ge=FIRST_DATE,
        le=LAST_DATE,
        description="last daily partition, for a finished history (a backtest's copy, the "
        "demo); none: a partition for every day that has ended",
    ),
]


class FileFeed(_Strict):
    """A landing directory of files, one or more per day, named with the day's date."""

    path: str = Field(min_length=1, description="landing directory, relative to the project root")
    allow_outside_project: bool = Field(
        False,
        description="read a landing directory that resolves outside the project root "
        "(an absolute path, '..', a symlink); `spec check` warns about it",
    )
    format: FileFormat = "csv"
    file_pattern: str = Field(
        "*_{date}.csv",
        description="glob with a {date} placeholder that maps each file to its daily partition",
    )
    date_format: str = "%Y-%m-%d"
    timestamp_column: str
    timestamp_format: str | None = Field(None, description="strftime format; None = ISO 8601")
    entity_column: str | None = None
    settle_seconds: float = Field(
        5.0,
        ge=0,
        le=86_400,
        description="a landing file is read only once it has not changed for this long, so a "
        "file still being written waits for a later tick; 0 = writers rename complete files in",
    )
    encoding: str = Field(
        "utf-8", description="text encoding of csv and jsonl landing files (a Python codec name)"
    )

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, v: str) -> str:
        try:
            "".encode(v)  # also refuses codecs that are not text encodings (base64, rot13)
        except (LookupError, ValueError):
            raise ValueError(
                f"unknown text encoding {v[:40]!r}; e.g. utf-8, latin-1, cp1252"
            ) from None
        return v

    @field_validator("date_format")
    @classmethod
    def _names_a_day(cls, v: str) -> str:
        probe = dt.date(2026, 11, 28)
        try:
            back = dt.datetime.strptime(probe.strftime(v), v).date()
        except ValueError:
            back = None
        if back != probe:
            raise ValueError(
                f"{echo(v)} does not name a day: give the year, month and day, e.g. %Y-%m-%d"
            )
        return v

    @field_validator("file_pattern")
    @classmethod
    def _has_date(cls, v: str) -> str:
        if v.count("{date}") != 1:
            raise ValueError(
                "must contain the placeholder {date} exactly once, e.g. 'x_{date}.csv'"
            )
        return v


class FileSource(FileFeed):
    """kind: files (the default): landing files named with their day's date."""

    kind: Literal["files"] = "files"
    start_date: StartDate
    end_date: EndDate = None


ENV_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
QUERY_PARAMS = ("start", "end")


class SqlSource(_Strict):
    """kind: sql: a SELECT over a SQLAlchemy URL, run once per daily partition.

    The query binds :start and :end, the partition's [start, end) bounds as naive datetimes
    (UTC, like the rest of the lake); values are never formatted into the SQL text. Against
    a column with a time zone (Postgres timestamptz), run the session in UTC, e.g. with
    `?options=-c%20timezone%3DUTC` in a psycopg2 URL. Rows need no ORDER BY: they are
    sorted after the pull (see mlops.sql_source).
    """

    kind: Literal["sql"]
    url: str = Field(
        description="SQLAlchemy URL, e.g. postgresql+psycopg2://etl:${DB_PASSWORD}@db/iot; "
        "${VAR} is read from the environment when the source is queried"
    )
    query: str = Field(
        description="one SELECT binding :start and :end, e.g. SELECT * FROM readings "
        "WHERE ts >= :start AND ts < :end"
    )
    timestamp_column: str
    timestamp_format: str | None = Field(
        None, description="strftime format of timestamps stored as text; None = ISO 8601"
    )
    entity_column: str | None = None
    start_date: StartDate
    end_date: EndDate = None

    @field_validator("url")
    @classmethod
    def _is_url(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a SQLAlchemy URL: dialect+driver://user:password@host/db")
        if ENV_VAR_RE.search(v) is None:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(v)
            except (ArgumentError, ValueError):
                raise ValueError(
                    "is not a SQLAlchemy URL; expected dialect+driver://user:password@host/db, "
                    "e.g. mysql+pymysql://etl:${DB_PASSWORD}@127.0.0.1:3306/iot"
                ) from None
        return v

    @field_validator("query")
    @classmethod
    def _binds_the_day(cls, v: str) -> str:
        from sqlalchemy import text

        body = re.sub(r"^(\s*--[^\n]*\n)*", "", v).strip()
        if not re.match(r"(?is)^\(?\s*(select|with)\b", body):
            raise ValueError("must be a SELECT (or WITH ... SELECT) query")
        if ";" in re.sub(r"'(?:[^']|'')*'", "''", body).rstrip().rstrip(";"):
            raise ValueError("must be a single statement (found ';' inside the query)")
        params = set(text(v).compile().params)
        missing = [f":{p}" for p in QUERY_PARAMS if p not in params]
        extra = sorted(f":{p}" for p in params - set(QUERY_PARAMS))
        if missing:
            raise ValueError(
                f"must bind {' and '.join(missing)}: the query reads one daily partition, "
                "[:start, :end), e.g. SELECT * FROM readings WHERE ts >= :start AND ts < :end"
            )
        if extra:
            raise ValueError(
                f"binds {', '.join(extra)}, but only :start and :end are given; write "
                "constants into the query text, or escape a literal colon as \\:"
            )
        return v


def _source_kind(v: object) -> object:
    return v.get("kind", "files") if isinstance(v, dict) else getattr(v, "kind", "files")


Source = Annotated[
    Annotated[FileSource, Tag("files")] | Annotated[SqlSource, Tag("sql")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="must be 'files' (landing files) or 'sql' (a query over a "
        "SQLAlchemy URL)",
    ),
]
SOURCE_KINDS = ("files", "sql")


class ColumnSpec(_Strict):
    name: str
    type: ColumnType
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ColumnSpec:
        if self.type == "category" and not self.categories:
            raise ValueError("a category column needs a non-empty 'categories' list")
        if self.categories and self.type not in ("category", "string"):
            raise ValueError("'categories' only applies to category or string columns")
        if (self.min is not None or self.max is not None) and self.type not in ("float", "int"):
            raise ValueError("'min'/'max' only apply to float or int columns")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class SchemaSpec(_Strict):
    columns: list[ColumnSpec] = Field(min_length=1)
    unknown_columns: Literal["ignore", "fail"] = Field(
        "ignore", description="what to do with columns in the files that the schema does not name"
    )
    max_quarantine_rate: float = Field(0.05, ge=0, le=1)

    @field_validator("columns")
    @classmethod
    def _unique(cls, v: list[ColumnSpec]) -> list[ColumnSpec]:
        names = [c.name for c in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"column names must be unique; repeated: {dupes}")
        return v


class EventFeed(FileFeed):
    """A separate, possibly late feed of events (e.g. failures), one file per arrival day."""


class LabelSpec(_Strict):
    kind: Literal["column", "event_feed", "feedback"] = Field(
        description="column: a target column of the rows; event_feed: late-arriving events; "
        "feedback: only what the field sends back (POST /feedback, `mlops labels import`)"
    )
    name: str = Field("label", description="name of the label column in the training set")
    column: str | None = Field(None, description="kind=column: the target column of the rows")
    events: EventFeed | None = Field(None, description="kind=event_feed: where events land")
    horizon: Horizon = Field("24h", description="kind=event_feed: label = event within this")
    maturity: Maturity = Field(
        "0h",
        description="how long after a row's time its label is final (horizon + lateness; "
        "for feedback, how long after a reading its feedback can still arrive)",
    )
    feedback: Literal["none", "override"] = Field(
        "none",
        description="kind=column or event_feed: 'override' lets field feedback replace the "
        "label of the readings it names",
    )

    @property
    def uses_feedback(self) -> bool:
        """Field feedback is (part of) the label source: the label_feedback asset exists."""
        return self.kind == "feedback" or self.feedback == "override"

    @model_validator(mode="after")
    def _kind_fields(self) -> LabelSpec:
        if self.kind == "column" and not self.column:
            raise ValueError("kind 'column' needs 'column': the target column of the rows")
        if self.kind == "event_feed" and self.events is None:
            raise ValueError("kind 'event_feed' needs 'events': the feed's landing directory")
        if self.kind == "feedback" and (self.column or self.events or self.feedback != "none"):
            raise ValueError(
                "kind 'feedback' takes its labels from field feedback only: remove 'column', "
                "'events' and 'feedback' (or use kind column/event_feed with feedback: override)"
            )
        return self


class AggregateSpec(_Strict):
    columns: list[str] = Field(min_length=1)
    functions: list[AggFunction] = Field(min_length=1)
    windows: list[Window] = Field(min_length=1)


class TransformSpec(_Strict):
    name: str = Field(pattern=NAME_RE)
    kind: Literal["diff", "ratio", "product", "log1p"]
    column: str
    other: str | None = Field(None, description="second column for ratio and product")

    @model_validator(mode="after")
    def _needs_other(self) -> TransformSpec:
        if self.kind in ("ratio", "product") and not self.other:
            raise ValueError(f"kind '{self.kind}' needs 'other': the second column")
        return self


class FeatureSpec(_Strict):
    lookback_days: int = Field(1, ge=0, le=90, description="previous days each day reads")
    passthrough: list[str] = Field(default_factory=list, description="raw columns used as-is")
    categorical: list[str] = Field(default_factory=list, description="category columns")
    aggregates: list[AggregateSpec] = Field(default_factory=list)
    transforms: list[TransformSpec] = Field(default_factory=list)
    online_fallback: Literal["reject", "reading_only"] = Field(
        "reject",
        description="online path, entity unknown or state stale: reject with the reason, "
        "or compute from the reading alone and flag it",
    )


def _finite_values(v: object) -> object:
    """Refuse .inf/.nan among scalars (the union type would report each member's error)."""
    values = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
    for x in values:
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"{x} is not a finite number")
    return v


Scalar = str | int | float | bool | None


class SearchParam(_Strict):
    type: Literal["int", "float", "categorical"]
    low: float | None = Field(None, ge=-MAX_ABS, le=MAX_ABS)
    high: float | None = Field(None, ge=-MAX_ABS, le=MAX_ABS)
    log: bool = False
    choices: list[Scalar] | None = Field(None, max_length=1000)

    _finite = field_validator("choices", mode="before")(_finite_values)

    @model_validator(mode="after")
    def _range(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("type 'categorical' needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("'low' and 'high' only apply to int or float parameters")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"type '{self.type}' needs 'low' and 'high'")
        if self.choices is not None:
            raise ValueError("'choices' only applies to categorical parameters")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is greater than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low}): a log scale has no 0")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"type 'int' needs whole low and high, got {self.low}, {self.high}")
        return self


class CandidateSpec(_Strict):
    estimator: Literal[
        "xgboost", "logistic_regression", "random_forest", "hist_gradient_boosting", "ridge"
    ]
    params: dict[str, Scalar] = Field(default_factory=dict)
    search_space: dict[str, SearchParam] = Field(default_factory=dict)

    _finite = field_validator("params", mode="before")(_finite_values)


class ModelSpec(_Strict):
    task: Literal["binary_classification", "regression"] = "binary_classification"
    registered_name: str | None = Field(None, description="MLflow model name; default: spec name")
    candidates: list[CandidateSpec] = Field(min_length=1)
    trials: int = Field(20, ge=1, le=10_000)
    seed: int = Field(42, ge=0, le=2**32 - 1, description="0 to 2**32 - 1 (numpy's range)")
    training_window_days: int = Field(21, ge=1, le=MAX_DAYS)
    split: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/valid/test fractions of the window, time-ordered"
    )

    @field_validator("split")
    @classmethod
    def _sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(v) - 1.0) > 1e-9 or min(v) <= 0:
            raise ValueError(f"train/valid/test fractions must be positive and sum to 1, got {v}")
        return v


class GateSpec(_Strict):
    thresholds: dict[str, Annotated[float, Field(ge=-MAX_ABS, le=MAX_ABS)]] = Field(
        default_factory=dict, description="metric -> minimum"
    )
    min_improvement: float = Field(0.0, ge=-MAX_ABS, le=MAX_ABS)
    primary_metric: str = "roc_auc"
    slice_columns: list[str] = Field(default_factory=list)
    slice_tolerance: float = Field(0.02, ge=0, le=MAX_ABS)
    latency_budget_ms: float = Field(50.0, gt=0, le=60_000)


class MonitoringSpec(_Strict):
    drift_method: str = "wasserstein"
    drift_threshold: float = Field(0.3, ge=0, le=1, description="drift share that counts")
    column_drift_threshold: float | None = Field(
        None, gt=0, le=1e6, description="per-column test threshold; None = the method's default"
    )
    drift_sample_rows: int = Field(
        20_000, ge=100, le=10_000_000, description="rows sampled per side"
    )
    drift_max_columns: int = Field(
        50, ge=1, le=10_000, description="columns tested, highest-importance first"
    )
    drift_significance: float | None = Field(
        0.001,
        gt=0,
        lt=1,
        description="a distance counts as drift only when a two-sample test (KS, chi-square) "
        "also rejects at this level: small days cannot drift by chance; null = distance only",
    )
    consecutive_drift_days: int = Field(2, ge=1, le=365)
    metric_decline_tolerance: float = Field(0.05, ge=0, le=MAX_ABS)
    consecutive_decline_days: int = Field(1, ge=1, le=365)
    decline_confidence: float | None = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="a day declines only when its realized metric is below the line by more "
        "than chance at this one-sided confidence (its standard error on the day's rows); "
        "null = the tolerance alone",
    )
    retrain_cooldown_partitions: int = Field(
        3,
        ge=0,
        le=365,
        description="partitions after a drift- or decline-triggered retraining before a new "
        "episode may retrain (scheduled retrainings never delay a recovery)",
    )
    retry_after_partitions: int = Field(
        1,
        ge=1,
        le=365,
        description="a refused retraining re-arms after this many more breached days",
    )
    max_attempts_per_episode: int = Field(
        4, ge=1, le=100, description="retrainings per episode (one breach against one champion)"
    )
    recovery_min_rows: int = Field(
        200,
        ge=1,
        le=10_000_000,
        description="labelled rows after the change point (and of each class, for "
        "classification, a tenth of it) before a retraining trains on them alone; fewer: "
        "the spec window, with the post-change rows weighted up",
    )
    scoring_schedule: Cron = "0 2 * * *"
    retraining_schedule: Cron | None = Field(
        None, description="cron of a periodic retraining; none unless named"
    )


def _resolved(path: Path) -> Path | None:
    """The path with '..' and symlinks resolved; None when it cannot be (a NUL byte, a loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None


class Spec(_Strict):
    name: str = Field(pattern=NAME_RE, description="lower_snake_case; prefixes every asset key")
    description: str = ""
    owners: list[Annotated[str, Field(pattern=OWNER_RE)]] = Field(
        default_factory=lambda: ["team:ml-platform"],
        description="Who answers for the spec's assets (emails or team:<name>): the owners "
        "every asset of its graph shows in the Dagster UI",
    )
    source: Source
    schema_: SchemaSpec = Field(alias="schema")
    labels: LabelSpec
    features: FeatureSpec
    model: ModelSpec
    gates: GateSpec = Field(default_factory=GateSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)

    # Set by load_spec, not by the YAML.
    root: Path = Field(default=Path("."), exclude=True)
    path: Path = Field(default=Path("."), exclude=True)
    content_hash: str = Field(default="", exclude=True)

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _cross_references(self) -> Spec:
        problems = [*self._reference_problems(), *self._path_problems()]
        if problems:
            raise _Problems(problems)
        return self

    def feeds(self) -> list[tuple[str, FileFeed]]:
        """(field path, feed) for every landing directory the spec reads."""
        out: list[tuple[str, FileFeed]] = []
        if isinstance(self.source, FileSource):
            out.append(("source", self.source))
        if self.labels.events is not None:
            out.append(("labels.events", self.labels.events))
        return out

    def outside_project(self) -> list[tuple[str, Path]]:
        """(field path, resolved folder) for each landing directory outside the project root
        (allowed by its allow_outside_project, or the spec would not have loaded)."""
        root = self.root.resolve()
        out = []
        for where, feed in self.feeds():
            resolved = _resolved(self.resolve(feed.path))
            if resolved is not None and not resolved.is_relative_to(root):
                out.append((f"{where}.path", resolved))
        return out

    def _path_problems(self):
        root = self.root.resolve()
        for where, feed in self.feeds():
            loc = f"{where}.path"
            resolved = _resolved(self.resolve(feed.path))
            if resolved is None:
                yield loc, f"{echo(feed.path)} is not a usable path (a NUL byte or a symlink loop)"
            elif not resolved.is_relative_to(root) and not feed.allow_outside_project:
                yield (
                    loc,
                    f"{echo(feed.path)} resolves to {_clip(str(resolved))}, outside the project "
                    f"root {root}; put the folder under the project root, or set "
                    f"{where}.allow_outside_project: true to read it from there",
                )

    def _reference_problems(self):
        cols = {c.name: c for c in self.schema_.columns}
        src = self.source
        if src.timestamp_column not in cols:
            yield (
                "source.timestamp_column",
                f"'{src.timestamp_column}' is not in schema.columns",
            )
        elif cols[src.timestamp_column].type != "timestamp":
            yield (
                "source.timestamp_column",
                f"schema column '{src.timestamp_column}' is the timestamp: give it type timestamp",
            )
        if src.entity_column and src.entity_column not in cols:
            yield "source.entity_column", f"'{src.entity_column}' is not in schema.columns"
        if src.end_date is not None and src.end_date < src.start_date:
            yield (
                "source.end_date",
                f"{src.end_date} is before source.start_date {src.start_date}: give the last "
                "day of data (on or after start_date), or remove end_date for open-ended "
                "partitions",
            )
        if self.labels.kind == "column" and self.labels.column not in cols:
            yield "labels.column", f"'{self.labels.column}' is not in schema.columns"
        events = self.labels.events
        if (
            self.labels.kind == "event_feed"
            and events is not None
            and bool(events.entity_column) != bool(src.entity_column)
        ):
            yield (
                "labels.events.entity_column",
                "labels.events.entity_column and source.entity_column must both be set or unset",
            )
        numeric = {n for n, c in cols.items() if c.type in ("float", "int", "bool")}
        feats = self.features
        for name in feats.passthrough:
            if name not in cols:
                yield "features.passthrough", f"'{name}' is not in schema.columns"
        for name in feats.categorical:
            if name not in cols or cols[name].type not in ("category", "string"):
                yield "features.categorical", f"'{name}' must be a category/string schema column"
        for i, agg in enumerate(feats.aggregates):
            for name in agg.columns:
                if name not in numeric:
                    yield (
                        f"features.aggregates.{i}.columns",
                        f"'{name}' must be a numeric schema column",
                    )
            for w in agg.windows:
                if parse_duration(w) > dt.timedelta(days=feats.lookback_days + 1):
                    yield (
                        f"features.aggregates.{i}.windows",
                        f"'{w}' is longer than the lookback ({feats.lookback_days} day(s) + "
                        "the current day); raise lookback_days",
                    )
        for i, t in enumerate(feats.transforms):
            for name in filter(None, (t.column, t.other)):
                if name not in numeric:
                    yield (
                        f"features.transforms.{i}",
                        f"column '{name}' must be a numeric schema column",
                    )
        if self.labels.kind == "column" and self.labels.column in feats.passthrough:
            yield (
                "features.passthrough",
                f"includes the label column '{self.labels.column}' (leakage)",
            )
        for name in self.gates.slice_columns:
            if name not in cols:
                yield "gates.slice_columns", f"'{name}' is not in schema.columns"

    # Convenience accessors -------------------------------------------------------------
    @property
    def registered_model_name(self) -> str:
        return self.model.registered_name or self.name

    @property
    def landing_dir(self) -> Path:
        if not isinstance(self.source, FileSource):
            raise ValueError(
                f"spec '{self.name}' reads a SQL source (source.kind: sql): it has no landing "
                "directory"
            )
        return self.resolve(self.source.path)

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    @property
    def maturity(self) -> dt.timedelta:
        return parse_duration(self.labels.maturity)

    def column(self, name: str) -> ColumnSpec:
        return next(c for c in self.schema_.columns if c.name == name)


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("function-after[_consistent(), ColumnSpec]",)]
    # The source union's tag (source.sql.query) is not a field the user wrote: drop it.
    if len(parts) > 1 and parts[0] == "source" and parts[1] in SOURCE_KINDS:
        del parts[1]
    return ".".join(parts) or "(top level)"


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps dates as strings, so pydantic reports a bad date with its path,
    and refuses documents nested deeper than MAX_YAML_DEPTH or whose aliases expand past
    MAX_YAML_NODES nodes: PyYAML shares an aliased node, but everything downstream (pydantic,
    repr in messages) walks the expanded tree."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            problem = (
                f"nested deeper than {MAX_YAML_DEPTH} levels"
                if self._depth > MAX_YAML_DEPTH
                else f"has more than {MAX_YAML_NODES} nodes; a spec has a few hundred"
                if self._nodes > MAX_YAML_NODES
                else None
            )
            if problem:
                raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node | None) -> None:
    """Count the nodes (and depth) of the document with every alias expanded, without
    expanding it: each distinct node is visited once."""
    if root is None:
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    path: set[int] = set()  # nodes being visited: an alias to one of them is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            path.discard(key)
            if size[key] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"expands to more than {MAX_YAML_NODES} nodes through aliases "
                    "(an alias bomb); a spec has a few hundred",
                    node.start_mark,
                )
            if depth[key] > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_YAML_DEPTH} levels through aliases",
                    node.start_mark,
                )
            continue
        if key in size:
            continue
        if key in path:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to a node that contains it", node.start_mark
            )
        path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _read(path: Path) -> str:
    """The spec file's text, refusing what cannot be a spec before reading all of it."""
    if not path.exists():
        raise SpecError(str(path), [("(file)", "does not exist")])
    if not path.is_file():  # a directory, or a FIFO or device that would block or never end
        raise SpecError(str(path), [("(file)", "is not a regular file")])
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read(MAX_SPEC_CHARS + 1)
    except UnicodeDecodeError as e:
        raise SpecError(
            str(path), [("(file)", f"is not UTF-8 text (byte {e.start}); save it as UTF-8")]
        ) from None
    except OSError as e:
        raise SpecError(str(path), [("(file)", f"cannot be read: {e.strerror or e}")]) from None
    _check_size(text, path)
    return text


def _check_size(text: str, path: Path) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(
            str(path),
            [("(file)", f"is larger than {MAX_SPEC_CHARS:,} characters; a spec is a few KB")],
        )


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raise SpecError listing every problem."""
    path = Path(path)
    return spec_from_text(_read(path), path)


def spec_from_text(text: str, path: str | Path) -> Spec:
    """Validate `text` as the spec file at `path` would be (the same caps, root and hash),
    without reading or writing the file: an edit is checked before it is written."""
    path = Path(path)
    _check_size(text, path)
    try:
        data = yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        # ValueError: a scalar the constructor cannot build (an int of 5000 digits, a bad
        # explicit !!timestamp); RecursionError: a last resort, the depth cap comes first.
        raise SpecError(str(path), [("(file)", f"is not valid YAML: {e}")]) from None
    if not isinstance(data, dict):
        raise SpecError(str(path), [("(file)", "expected a mapping of spec fields at top level")])
    root = path.resolve().parent.parent
    digest = hashlib.sha256(text.encode()).hexdigest()
    try:
        return Spec.model_validate(
            {**data, "root": root, "path": path.resolve(), "content_hash": digest}
        )
    except ValidationError as e:
        raise SpecError(str(path), _problems(e)) from None


def _problems(e: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in e.errors():
        loc = _loc(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            prefix = "" if loc == "(top level)" else f"{loc}."
            problems.extend((prefix + where, msg) for where, msg in cause.problems)
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (typo?); see the spec reference in the README"
        elif err["type"] == "source_kind":
            kind = err["input"].get("kind") if isinstance(err["input"], dict) else None
            loc, msg = f"{loc}.kind", f"{msg} (got {echo(kind)})"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {echo(err['input'])})"
        problems.append((loc, msg))
    return problems


def find_specs(specs_dir: str | Path) -> list[Spec]:
    return [load_spec(p) for p in sorted(Path(specs_dir).glob("*.yaml"))]


def summary(spec: Spec) -> str:
    """One screen describing what the spec will build."""
    src, lab, feats, m = spec.source, spec.labels, spec.features, spec.model
    n_aggs = sum(len(a.columns) * len(a.functions) * len(a.windows) for a in feats.aggregates)
    label_src = {
        "column": lambda: f"column '{lab.column}'",
        "event_feed": lambda: f"event feed {lab.events.path} (event within {lab.horizon})",  # type: ignore[union-attr]
        "feedback": lambda: "field feedback (POST /feedback, `mlops labels import`)",
    }[lab.kind]() + (", overridden by field feedback" if lab.feedback == "override" else "")
    where = (
        f"{src.format} files in {src.path} matching {src.file_pattern}"
        if isinstance(src, FileSource)
        else f"SQL query over {_redacted(src.url)}, bound to each day's [:start, :end)"
    )
    lines = [
        f"spec {spec.name}: {spec.description}".rstrip(": "),
        f"  source     {where}",
        f"             timestamp '{src.timestamp_column}', entity '{src.entity_column or '-'}', "
        f"daily partitions from {src.start_date}{f' to {src.end_date}' if src.end_date else ''}",
        *(
            f"  warning    {where} reads {folder}, outside the project root "
            f"{spec.root.resolve()} (allow_outside_project: true)"
            for where, folder in spec.outside_project()
        ),
        f"  schema     {len(spec.schema_.columns)} columns, unknown columns: "
        f"{spec.schema_.unknown_columns}, max quarantine rate {spec.schema_.max_quarantine_rate:.1%}",
        f"  labels     '{lab.name}' from {label_src}, mature after {lab.maturity}",
        f"  features   lookback {feats.lookback_days} day(s): {len(feats.passthrough)} passthrough, "
        f"{len(feats.categorical)} categorical, {n_aggs} rolling aggregates, "
        f"{len(feats.transforms)} transforms",
        f"  model      {m.task}: {', '.join(c.estimator for c in m.candidates)}; "
        f"{m.trials} trials, seed {m.seed}, window {m.training_window_days} days, "
        f"split {'/'.join(str(s) for s in m.split)}",
        f"  gates      {spec.gates.primary_metric}, thresholds {spec.gates.thresholds or '-'}, "
        f"min improvement {spec.gates.min_improvement}, latency {spec.gates.latency_budget_ms} ms",
        *_automation_lines(spec),
        f"  assets     {', '.join(f'{spec.name}/{a}' for a in (*ASSET_NAMES, *MODEL_ASSET_NAMES))}",
        f"  spec hash  {spec.content_hash[:12]}",
    ]
    return "\n".join(lines)


def _automation_lines(spec: Spec) -> list[str]:
    """Every sensor and schedule that will run for the spec, and the retraining policy."""
    m = spec.monitoring
    periodic = (
        f"retraining_schedule '{m.retraining_schedule}' (skipped within the cooldown)"
        if m.retraining_schedule
        else "no periodic retraining (set monitoring.retraining_schedule to a cron for one)"
    )
    return [
        f"  automation new_data_sensor: new or corrected {'files' if isinstance(spec.source, FileSource) else 'rows'} -> the day's data run"
        + ("; label feed arrived -> labels" if spec.labels.kind == "event_feed" else ""),
        *(
            [
                "             feedback_sensor: field feedback (POST /feedback, labels import) "
                "-> label_feedback -> labels -> model_performance of the days it names"
            ]
            if spec.labels.uses_feedback
            else []
        ),
        "             monitoring_sensor: every built day after the first champion's window "
        "-> scoring + drift report; mature labels -> model_performance",
        f"             drift_retrain_sensor: {m.drift_method} drift share > {m.drift_threshold} "
        f"for {m.consecutive_drift_days} day(s)"
        + (
            f" (a column drifts when significant at p < {m.drift_significance})"
            if m.drift_significance
            else ""
        ),
        f"             metric_decline_sensor: realized {spec.gates.primary_metric} more than "
        f"{m.metric_decline_tolerance} below the champion's evaluation for "
        f"{m.consecutive_decline_days} day(s)"
        + (f", beyond chance at {m.decline_confidence:.0%}" if m.decline_confidence else ""),
        f"             retraining policy: cooldown {m.retrain_cooldown_partitions} partitions "
        f"after a change-triggered retraining; a refused one retried after "
        f"{m.retry_after_partitions} more breached day(s), up to {m.max_attempts_per_episode} "
        f"per episode; trains from the change point once {m.recovery_min_rows} labelled rows "
        "follow it",
        f"             scoring_schedule '{m.scoring_schedule}' (safety net: scores yesterday if "
        "not scored)",
        f"             {periodic}",
        "             run_failure_sensor: alerts on every failed run",
    ]


def _redacted(url: str) -> str:
    """A URL safe to show: any password replaced by ***."""
    from mlops.urls import redact_url

    return redact_url(url)


ASSET_NAMES = (
    "raw_data",
    "validated_data",
    "quarantine",
    "labels",
    "features",
    "online_features",
    "training_set",
)
MODEL_ASSET_NAMES = ("candidate_model", "model_evaluation", "champion_model", "batch_predictions")
