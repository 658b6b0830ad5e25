"""The project spec: one YAML file per ML project, validated by pydantic.

A wrong spec fails with the field path and what was expected, so users fix it before any
run starts. Paths in a spec are relative to the project root (the folder holding specs/).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
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
DURATION_RE = re.compile(r"^(\d+)([mhd])$")
FileFormat = Literal["csv", "parquet", "jsonl"]
ColumnType = Literal["float", "int", "string", "category", "bool", "timestamp"]
AggFunction = Literal["mean", "std", "min", "max", "sum", "count"]


class SpecError(ValueError):
    """A spec that cannot be used; `problems` lists (field path, message) pairs."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in problems)
        super().__init__(f"{path}: {len(problems)} problem(s)\n{lines}")


class _Strict(BaseModel):
    # Unknown keys are errors: a typo'd field must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_duration(text: str) -> dt.timedelta:
    """'30m', '6h', '2d' -> timedelta."""
    m = DURATION_RE.match(text.strip())
    if not m:
        raise ValueError(f"'{text}' is not a duration; expected a number and a unit: 30m, 6h, 2d")
    n, unit = int(m.group(1)), m.group(2)
    return {"m": dt.timedelta(minutes=n), "h": dt.timedelta(hours=n), "d": dt.timedelta(days=n)}[
        unit
    ]


Duration = Annotated[str, Field(pattern=DURATION_RE.pattern, examples=["6h", "1d"])]


class FileFeed(_Strict):
    """A landing directory of files, one or more per day, named with the day's date."""

    path: str = Field(description="landing directory, relative to the project root")
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
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(
                f"unknown text encoding {v[:40]!r}; e.g. utf-8, latin-1, cp1252"
            ) from None
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
    start_date: dt.date = Field(description="first daily partition")


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
    start_date: dt.date = Field(description="first daily partition")

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
    kind: Literal["column", "event_feed"]
    name: str = Field("label", description="name of the label column in the training set")
    column: str | None = Field(None, description="kind=column: the target column of the rows")
    events: EventFeed | None = Field(None, description="kind=event_feed: where events land")
    horizon: Duration = Field("24h", description="kind=event_feed: label = event within this")
    maturity: Duration = Field(
        "0h", description="how long after a row's time its label is final (horizon + lateness)"
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> LabelSpec:
        if self.kind == "column" and not self.column:
            raise ValueError("kind 'column' needs 'column': the target column of the rows")
        if self.kind == "event_feed" and self.events is None:
            raise ValueError("kind 'event_feed' needs 'events': the feed's landing directory")
        return self


class AggregateSpec(_Strict):
    columns: list[str] = Field(min_length=1)
    functions: list[AggFunction] = Field(min_length=1)
    windows: list[Duration] = Field(min_length=1)


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


class SearchParam(_Strict):
    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[str | int | float | bool | None] | None = None


class CandidateSpec(_Strict):
    estimator: Literal[
        "xgboost", "logistic_regression", "random_forest", "hist_gradient_boosting", "ridge"
    ]
    params: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    search_space: dict[str, SearchParam] = Field(default_factory=dict)


class ModelSpec(_Strict):
    task: Literal["binary_classification", "regression"] = "binary_classification"
    registered_name: str | None = Field(None, description="MLflow model name; default: spec name")
    candidates: list[CandidateSpec] = Field(min_length=1)
    trials: int = Field(20, ge=1)
    seed: int = 42
    training_window_days: int = Field(21, ge=1)
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
    thresholds: dict[str, float] = Field(default_factory=dict, description="metric -> minimum")
    min_improvement: float = 0.0
    primary_metric: str = "roc_auc"
    slice_columns: list[str] = Field(default_factory=list)
    slice_tolerance: float = 0.02
    latency_budget_ms: float = 50.0


class MonitoringSpec(_Strict):
    drift_method: str = "wasserstein"
    drift_threshold: float = Field(0.3, ge=0, le=1, description="drift share that counts")
    column_drift_threshold: float | None = Field(
        None, gt=0, description="per-column test threshold; None = the method's default"
    )
    drift_sample_rows: int = Field(20_000, ge=100, description="rows sampled per side")
    drift_max_columns: int = Field(50, ge=1, description="columns tested, highest-importance first")
    drift_significance: float | None = Field(
        0.001,
        gt=0,
        lt=1,
        description="a distance counts as drift only when a two-sample test (KS, chi-square) "
        "also rejects at this level: small days cannot drift by chance; null = distance only",
    )
    consecutive_drift_days: int = Field(2, ge=1)
    metric_decline_tolerance: float = Field(0.05, ge=0)
    consecutive_decline_days: int = Field(1, ge=1)
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
        description="partitions after a drift- or decline-triggered retraining before a new "
        "episode may retrain (scheduled retrainings never delay a recovery)",
    )
    retry_after_partitions: int = Field(
        1, ge=1, description="a refused retraining re-arms after this many more breached days"
    )
    max_attempts_per_episode: int = Field(
        4, ge=1, description="retrainings per episode (one breach against one champion)"
    )
    recovery_min_rows: int = Field(
        200,
        ge=1,
        description="labelled rows after the change point (and of each class, for "
        "classification, a tenth of it) before a retraining trains on them alone; fewer: "
        "the spec window, with the post-change rows weighted up",
    )
    scoring_schedule: str = "0 2 * * *"
    retraining_schedule: str | None = Field(
        None, description="cron of a periodic retraining; none unless named"
    )


class Spec(_Strict):
    name: str = Field(pattern=NAME_RE, description="lower_snake_case; prefixes every asset key")
    description: str = ""
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

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross_references(self) -> Spec:
        problems = list(self._reference_problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _reference_problems(self):
        cols = {c.name: c for c in self.schema_.columns}
        src = self.source
        if src.timestamp_column not in cols:
            yield f"source.timestamp_column '{src.timestamp_column}' is not in schema.columns"
        elif cols[src.timestamp_column].type != "timestamp":
            yield f"schema column '{src.timestamp_column}' is the timestamp: give it type timestamp"
        if src.entity_column and src.entity_column not in cols:
            yield f"source.entity_column '{src.entity_column}' is not in schema.columns"
        if self.labels.kind == "column" and self.labels.column not in cols:
            yield f"labels.column '{self.labels.column}' is not in schema.columns"
        events = self.labels.events
        if (
            self.labels.kind == "event_feed"
            and events is not None
            and bool(events.entity_column) != bool(src.entity_column)
        ):
            yield "labels.events.entity_column and source.entity_column must both be set or unset"
        numeric = {n for n, c in cols.items() if c.type in ("float", "int", "bool")}
        feats = self.features
        for name in feats.passthrough:
            if name not in cols:
                yield f"features.passthrough '{name}' is not in schema.columns"
        for name in feats.categorical:
            if name not in cols or cols[name].type not in ("category", "string"):
                yield f"features.categorical '{name}' must be a category/string schema column"
        for i, agg in enumerate(feats.aggregates):
            for name in agg.columns:
                if name not in numeric:
                    yield f"features.aggregates.{i}.columns '{name}' must be a numeric schema column"
            for w in agg.windows:
                if parse_duration(w) > dt.timedelta(days=feats.lookback_days + 1):
                    yield (
                        f"features.aggregates.{i}.windows '{w}' is longer than the lookback "
                        f"({feats.lookback_days} day(s) + the current day); raise lookback_days"
                    )
        for i, t in enumerate(feats.transforms):
            for name in filter(None, (t.column, t.other)):
                if name not in numeric:
                    yield f"features.transforms.{i} column '{name}' must be a numeric schema column"
        if self.labels.kind == "column" and self.labels.column in feats.passthrough:
            yield f"features.passthrough includes the label column '{self.labels.column}' (leakage)"
        for name in self.gates.slice_columns:
            if name not in cols:
                yield f"gates.slice_columns '{name}' is not in schema.columns"

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
    """SafeLoader that keeps dates as strings, so pydantic reports a bad date with its path."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raise SpecError listing every problem."""
    path = Path(path)
    if not path.exists():
        raise SpecError(str(path), [("(file)", "does not exist")])
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
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
        problems = []
        for err in e.errors():
            loc = _loc(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (typo?); see the spec reference in the README"
            elif err["type"] == "source_kind":
                kind = err["input"].get("kind") if isinstance(err["input"], dict) else None
                loc, msg = f"{loc}.kind", f"{msg} (got {kind!r})"
                problems.append((loc, msg))
                continue
            elif err["type"] == "missing":
                msg = "required field is missing"
            elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
                msg = f"{msg} (got {err['input']!r})"
            problems.append((loc, msg))
        raise SpecError(str(path), problems) from None


def find_specs(specs_dir: str | Path) -> list[Spec]:
    return [load_spec(p) for p in sorted(Path(specs_dir).glob("*.yaml"))]


def summary(spec: Spec) -> str:
    """One screen describing what the spec will build."""
    src, lab, feats, m = spec.source, spec.labels, spec.features, spec.model
    n_aggs = sum(len(a.columns) * len(a.functions) * len(a.windows) for a in feats.aggregates)
    label_src = (
        f"column '{lab.column}'"
        if lab.kind == "column"
        else f"event feed {lab.events.path} (event within {lab.horizon})"  # type: ignore[union-attr]
    )
    where = (
        f"{src.format} files in {src.path} matching {src.file_pattern}"
        if isinstance(src, FileSource)
        else f"SQL query over {_redacted(src.url)}, bound to each day's [:start, :end)"
    )
    lines = [
        f"spec {spec.name}: {spec.description}".rstrip(": "),
        f"  source     {where}",
        f"             timestamp '{src.timestamp_column}', entity '{src.entity_column or '-'}', "
        f"daily partitions from {src.start_date}",
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
    from mlops.sql_source import redact_url  # imports this module: import it late

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
