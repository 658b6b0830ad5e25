"""Raw rows -> valid rows + quarantine, with a pandera schema built from the spec.

Two passes: parse each raw string to its column's type (vectorized in polars; a value that
does not parse is a `type` failure), then the pandera rules schema (nullability, ranges,
categories, the partition day, duplicates) on the rows that parsed. Two passes because a
range check on a column that failed to parse would fail as a whole instead of naming the
bad rows; a row that does not parse is rejected with all of its parse failures. Every
rejected row is kept with its first failure (column, check, value), all of its failures,
the raw record, file and row number, and rows_in == rows_valid + rows_quarantined holds.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlops.ingest import FILE_COLUMNS, ROW_NUMBER, SOURCE_FILE
from mlops.spec import ColumnSpec, Spec

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pandera.pandas as pa
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import pandas as pd
    from mlops.lazy import pandera as pa
    from mlops.lazy import polars as pl


def quarantine_schema() -> dict[str, pl.DataType]:
    """One row per rejected input row; a function so polars loads only when rows are checked."""
    return {
        SOURCE_FILE: pl.String,
        ROW_NUMBER: pl.Int64,
        "column": pl.String,
        "check": pl.String,
        "value": pl.String,
        "reason": pl.String,
        "errors": pl.String,  # JSON list of every failure of the row
        "record": pl.String,  # JSON of the raw row as it arrived
    }


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class SchemaMismatchError(ValueError):
    """A landing file lacks a required column, or has one the spec forbids."""


@dataclass
class ValidationResult:
    valid: pl.DataFrame
    quarantine: pl.DataFrame
    rows_in: int

    @property
    def rows_valid(self) -> int:
        return self.valid.height

    @property
    def rows_quarantined(self) -> int:
        return self.quarantine.height

    def reasons(self) -> dict[str, int]:
        counts = self.quarantine.group_by("check").len().sort("check")
        return dict(zip(counts["check"].to_list(), counts["len"].to_list(), strict=True))


def _pandas_dtype(col: ColumnSpec):
    return {
        "float": "float64",
        "int": "Int64",
        "string": "string",
        "category": "string",
        "bool": "boolean",
        "timestamp": "datetime64[ns]",
    }[col.type]


_ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def _parse_expr(col: ColumnSpec, spec: Spec) -> pl.Expr:
    """Raw text -> the column's type; a value that does not parse becomes null."""
    c = pl.col(col.name).str.strip_chars()
    if col.type == "float":
        return c.cast(pl.Float64, strict=False).fill_nan(None)
    if col.type == "int":
        return c.cast(pl.Int64, strict=False)
    if col.type == "bool":
        return c.str.to_lowercase().replace_strict(
            {**dict.fromkeys(_TRUE, True), **dict.fromkeys(_FALSE, False)},
            default=None,
            return_dtype=pl.Boolean,
        )
    if col.type == "timestamp":
        fmt = spec.source.timestamp_format
        if fmt:
            return c.str.to_datetime(fmt, strict=False, time_unit="us")
        with_zone = (
            c.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f%#z", strict=False, time_unit="us")
            .dt.convert_time_zone("UTC")
            .dt.replace_time_zone(None)
        )
        naive = [c.str.to_datetime(f, strict=False, time_unit="us") for f in _ISO_FORMATS]
        return pl.coalesce(*naive, with_zone)
    return pl.col(col.name)


def parse(spec: Spec, raw: pl.DataFrame) -> tuple[pl.DataFrame, pd.DataFrame]:
    """Parse every schema column (vectorized); return typed rows and the type failures.

    Done in polars rather than by pandera's coercion, whose failure path parses value by
    value (about 1 s per 5,000 rows); pandera then checks the typed rows against the rules.
    """
    # Failing rows by position straight from each column's mask: no row-index column.
    typed = raw.with_columns([_parse_expr(c, spec).alias(c.name) for c in spec.schema_.columns])
    failures = []
    for c in spec.schema_.columns:
        bad = (typed[c.name].is_null() & raw[c.name].is_not_null()).arg_true()
        failures.extend(
            {
                "column": c.name,
                "check": "type",
                "pandera_check": f"coerce_dtype('{c.type}')",
                "index": i,
            }
            for i in bad.to_list()
        )
    fc = pd.DataFrame(failures, columns=["column", "check", "pandera_check", "index"])
    return typed, fc.astype({"index": "int64"})


def rules_schema(spec: Spec, day: dt.date | None, duplicates: bool = True) -> pa.DataFrameSchema:
    """The spec's rules on typed rows: nulls, ranges, categories, partition day, duplicates
    (duplicates=False: without the last, for rows checked a batch at a time)."""
    columns: dict[str, pa.Column] = {}
    for c in spec.schema_.columns:
        checks: list[pa.Check] = []
        if c.min is not None:
            checks.append(pa.Check.greater_than_or_equal_to(c.min))
        if c.max is not None:
            checks.append(pa.Check.less_than_or_equal_to(c.max))
        if c.categories:
            checks.append(pa.Check.isin(c.categories))
        if c.name == spec.source.timestamp_column and day is not None:
            start = pd.Timestamp(day)
            end = start + pd.Timedelta(days=1)
            checks.append(
                pa.Check(lambda s, a=start, b=end: (s >= a) & (s < b), name="partition_day")
            )
        columns[c.name] = pa.Column(
            _pandas_dtype(c), checks=checks, nullable=c.nullable, coerce=True
        )
    key = unique_key(spec) if duplicates else None
    return pa.DataFrameSchema(columns, strict=False, unique=key, report_duplicates="exclude_first")


def unique_key(spec: Spec) -> list[str]:
    """The columns no two valid rows share: entity and timestamp, else every column."""
    if spec.source.entity_column:
        return [spec.source.entity_column, spec.source.timestamp_column]
    return [c.name for c in spec.schema_.columns]


def check_file_columns(spec: Spec, raw: pl.DataFrame) -> None:
    """Fail on a file that misses a required column (or has a forbidden one): name both."""
    if raw.height == 0:
        return
    # A file's rows all carry its columns: group by the file name alone (a unique over both
    # columns row-encodes them, about 2.5x the raw frame's size for a large day).
    files = raw.group_by(SOURCE_FILE, maintain_order=True).agg(pl.col(FILE_COLUMNS).first())
    names = {c.name for c in spec.schema_.columns}
    problems: list[str] = []
    for source_file, cols in files.iter_rows():
        present = set(cols.split(",")) if cols else set()
        for c in spec.schema_.columns:
            if c.name not in present and not c.nullable:
                problems.append(
                    f"required column '{c.name}' is missing from landing file {source_file}"
                )
        if spec.schema_.unknown_columns == "fail":
            problems.extend(
                f"column '{u}' in landing file {source_file} is not in the spec's schema "
                "(schema.unknown_columns: fail)"
                for u in sorted(present - names)
            )
    if problems:
        raise SchemaMismatchError(
            "; ".join(problems) + ". Fix the file and land it again, or change the spec's schema."
        )


def check_name(pandera_check: str) -> str:
    """pandera's check text -> the quarantine's short, stable vocabulary (CHECKS)."""
    for prefix, name in (
        ("coerce_dtype", "type"),
        ("dtype", "type"),
        ("not_nullable", "not_null"),
        ("greater_than", "min"),
        ("less_than", "max"),
        ("isin", "category"),
        ("partition_day", "partition_day"),
        ("multiple_fields_uniqueness", "duplicate"),
    ):
        if pandera_check.startswith(prefix):
            return name
    return pandera_check


CHECKS = ("type", "not_null", "min", "max", "category", "partition_day", "duplicate")


def _reason(column: str, check: str, value: str | None, col: ColumnSpec | None) -> str:
    shown = "missing" if value is None else repr(value)
    if check == "type":
        return f"{column}: {shown} is not a valid {col.type if col else 'value'}"
    if check == "not_null":
        return f"{column}: required value is missing"
    if check == "min":
        return f"{column}: {shown} is below the minimum {col.min if col else ''}"
    if check == "max":
        return f"{column}: {shown} is above the maximum {col.max if col else ''}"
    if check == "category":
        return f"{column}: {shown} is not one of the allowed categories {col.categories if col else ''}"
    if check == "partition_day":
        return f"{column}: {shown} is not in the file's partition day"
    if check == "duplicate":
        return f"duplicate of an earlier row with the same {column}"
    return f"{column}: {shown} fails {check}"


def _failures(schema: pa.DataFrameSchema, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(validated frame, or the input when some rows failed; failures: column/check/value/index)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = schema.validate(frame, lazy=True)
        return out, pd.DataFrame(columns=["column", "check", "pandera_check", "index"])
    except pa.errors.SchemaErrors as e:
        fc = e.failure_cases
    unexpected = fc[fc["index"].isna()]
    if len(unexpected):
        # A check that failed without naming rows is a bug in the schema, not bad data.
        raise RuntimeError(
            "validation could not attribute failures to rows:\n"
            + unexpected[["column", "check", "failure_case"]].to_string()
        )
    fc = fc.rename(columns={"failure_case": "value"})
    fc["pandera_check"] = fc["check"].astype(str)
    fc["check"] = fc["pandera_check"].map(check_name)
    dupes = fc["check"] == "duplicate"
    fc.loc[dupes, "column"] = ", ".join(schema.unique or [])
    # pandera reports a coercion failure twice (coerce_dtype and dtype): keep one.
    fc = fc.drop_duplicates(subset=["column", "check", "index"])
    fc = fc[["column", "check", "pandera_check", "index"]].astype({"index": "int64"})
    return frame, fc


RULES_BATCH_ROWS = 50_000  # rows pandera checks at a time: its pandas copies stay this small


def _rule_failures(
    spec: Spec, typed: pl.DataFrame, parse_bad: list[int], day: dt.date | None
) -> pd.DataFrame:
    """The rules on the rows that parsed: pandera a batch of rows at a time (a whole large
    day in pandas, with pandera's coercion copies, peaked at 8x the file), and duplicates
    across all of them in polars, as pandera reports them (the first of a key is kept)."""
    schema = rules_schema(spec, day, duplicates=False)
    names = [c.name for c in spec.schema_.columns]
    parts = [pd.DataFrame(columns=["column", "check", "pandera_check", "index"])]
    parsed = ~pl.col("_index").is_in(parse_bad)
    for start in range(0, typed.height, RULES_BATCH_ROWS):
        batch = (
            typed.select(names)
            .slice(start, RULES_BATCH_ROWS)
            .with_row_index("_index", offset=start)
            .filter(parsed)
        )
        frame = batch.drop("_index").to_pandas()
        frame.index = pd.Index(batch["_index"].to_numpy().astype("int64"))
        parts.append(_failures(schema, frame)[1])
    key = unique_key(spec)
    # Rows whose key hash repeats, then the exact comparison among those few (a distinct
    # over the whole day's keys row-encodes them all: about 2x the key columns' size).
    # Found in numpy on the hashes' own buffer (sort the parsed rows' hashes, compare
    # neighbours): polars' is_duplicated builds a hash table over every row, about the
    # file's size again for a large day.
    hashes = typed.select(pl.struct(key).hash()).to_series().to_numpy()
    keep = np.ones(len(hashes), dtype=bool)
    keep[parse_bad] = False
    idx = np.flatnonzero(keep)
    parsed_hashes = hashes[idx]
    del hashes, keep
    order = np.argsort(parsed_hashes, kind="stable")
    ordered = parsed_hashes[order]
    del parsed_hashes
    same = ordered[1:] == ordered[:-1]
    repeated = np.zeros(len(ordered), dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    repeats = pl.Series("_index", np.sort(idx[order[repeated]]), dtype=pl.get_index_type())
    rows = typed.select(key)[repeats].with_columns(repeats)  # in row order: the first is kept
    dupes = rows.filter(~pl.struct(key).is_first_distinct())["_index"]
    parts.append(
        pd.DataFrame(
            {
                "column": ", ".join(key),
                "check": "duplicate",
                "pandera_check": "multiple_fields_uniqueness",
                "index": dupes.to_numpy().astype("int64"),
            }
        )
    )
    return pd.concat([p for p in parts if len(p)] or parts[:1], ignore_index=True).astype(
        {"index": "int64"}
    )


@dataclass(frozen=True)
class RawColumns:
    """A raw frame given as its column names and a reader of one column by name (e.g. from
    the lake's Parquet file), so `validate` never holds the whole raw frame."""

    names: list[str]
    read: Callable[[str], pl.Series]


def validate(
    spec: Spec, raw: pl.DataFrame | RawColumns, day: dt.date | None = None
) -> ValidationResult:
    """Split one partition's raw rows into valid, typed rows and quarantined rows.

    The raw rows are used a column at a time: each is read, parsed and dropped in turn; the
    quarantined rows' raw values are read again, a column at a time, once the failures are
    known; the valid frame is gathered a column at a time, each typed column released once
    gathered. Given RawColumns, a large day so peaks near the typed rows plus a column, where
    the whole raw frame (about 3x an all-text CSV) plus the typed and valid frames were held.
    """
    if isinstance(raw, pl.DataFrame):
        raw = RawColumns(raw.columns, raw.get_column)
    columns, read = raw.names, raw.read
    del raw
    meta = pl.DataFrame([read(SOURCE_FILE), read(ROW_NUMBER)])
    rows_in = meta.height
    if rows_in:
        check_file_columns(spec, pl.DataFrame([meta[SOURCE_FILE], read(FILE_COLUMNS)]))
    present = set(columns)
    typed_cols: list[pl.Series] = []
    parse_rows = []
    for c in spec.schema_.columns:
        # A nullable column a file did not have: all nulls.
        raw_col = (
            read(c.name)
            if c.name in present
            else pl.repeat(None, rows_in, dtype=pl.String, eager=True)
        )
        one = pl.DataFrame([raw_col.alias(c.name)])
        typed_col = one.select(_parse_expr(c, spec).alias(c.name)).to_series()
        bad = (typed_col.is_null() & raw_col.is_not_null()).arg_true()
        parse_rows.extend(
            {
                "column": c.name,
                "check": "type",
                "pandera_check": f"coerce_dtype('{c.type}')",
                "index": i,
            }
            for i in bad.to_list()
        )
        typed_cols.append(typed_col)
        del raw_col, one, typed_col
    typed = pl.DataFrame([*typed_cols, *meta.get_columns()])
    del typed_cols, meta
    parse_fc = pd.DataFrame(parse_rows, columns=["column", "check", "pandera_check", "index"])
    parse_fc = parse_fc.astype({"index": "int64"})
    rule_fc = _rule_failures(spec, typed, parse_fc["index"].unique().tolist(), day)
    failures = pd.concat([parse_fc, rule_fc], ignore_index=True)

    bad_idx = sorted(set(failures["index"].tolist()))
    cols = {c.name: c for c in spec.schema_.columns}
    # The raw record's columns, as the frame had them, then the schema's missing ones.
    record_cols = [n for n in columns if n != FILE_COLUMNS]
    record_cols += [n for n in cols if n not in present]

    def bad_rows(name: str) -> pl.Series:
        if name not in present:
            return pl.repeat(None, len(bad_idx), dtype=pl.String, eager=True).alias(name)
        return read(name).gather(bad_idx)

    quarantine = _quarantine_frame(
        pl.DataFrame([bad_rows(n) for n in record_cols]) if bad_idx else None,
        failures,
        bad_idx,
        cols,
    )
    order = _valid_order(spec, typed, bad_idx)
    left = typed.get_columns()
    del typed
    valid_cols = []
    while left:  # each typed column is released once gathered
        valid_cols.append(left.pop(0).gather(order))
    valid = pl.DataFrame(valid_cols)
    result = ValidationResult(valid=valid, quarantine=quarantine, rows_in=rows_in)
    if result.rows_valid + result.rows_quarantined != result.rows_in:  # pragma: no cover
        raise RuntimeError(
            f"row counts do not reconcile: {result.rows_in} in, {result.rows_valid} valid, "
            f"{result.rows_quarantined} quarantined"
        )
    return result


def _quarantine_frame(
    bad_rows: pl.DataFrame | None,
    failures: pd.DataFrame,
    bad_idx: list[int],
    cols: dict[str, ColumnSpec],
) -> pl.DataFrame:
    """The quarantine from the failures and the bad rows' raw values (in `bad_idx` order)."""
    if not bad_idx or bad_rows is None:
        return pl.DataFrame(schema=quarantine_schema())
    order = {name: i for i, name in enumerate(cols)}
    failures = failures.assign(
        _order=failures["column"].map(lambda c: order.get(c, len(order)))
    ).sort_values(["index", "_order", "check"], kind="stable")
    records = dict(zip(bad_idx, bad_rows.to_dicts(), strict=True))
    rows = []
    for idx, group in failures.groupby("index", sort=True):
        rec = records[int(idx)]
        errs = []
        for c, k, pk in zip(group["column"], group["check"], group["pandera_check"], strict=True):
            # The offending value as it arrived (for a duplicate: its key).
            v = (
                ", ".join(str(rec.get(n)) for n in c.split(", "))
                if k == "duplicate"
                else rec.get(c)
            )
            errs.append(
                {
                    "column": c,
                    "check": k,
                    "value": v,
                    "pandera_check": pk,
                    "reason": _reason(c, k, v, cols.get(c)),
                }
            )
        first = errs[0]
        rows.append(
            {
                SOURCE_FILE: rec[SOURCE_FILE],
                ROW_NUMBER: rec[ROW_NUMBER],
                "column": first["column"],
                "check": first["check"],
                "value": first["value"],
                "reason": "; ".join(e["reason"] for e in errs),
                "errors": json.dumps(errs),
                "record": json.dumps(
                    {k: v for k, v in rec.items() if k not in (SOURCE_FILE, ROW_NUMBER)}
                ),
            }
        )
    return pl.DataFrame(rows, schema=quarantine_schema())


def _valid_order(spec: Spec, typed: pl.DataFrame, bad_idx: list[int]) -> pl.Series:
    """The positions of the rows not quarantined, in key order (from the key columns alone:
    a filter, then a sort of every column, held three copies at once)."""
    keys = [spec.source.timestamp_column]
    if spec.source.entity_column:
        keys.append(spec.source.entity_column)
    keys += [SOURCE_FILE, ROW_NUMBER]
    order = typed.select(pl.arg_sort_by(keys).alias("_index"))
    return order.filter(~pl.col("_index").is_in(bad_idx))["_index"]


# --- reconciliation (the rows_reconcile and quarantine_rate checks' rules) ------------------


@dataclass(frozen=True)
class Reconciliation:
    """Every raw row valid or quarantined, exactly once: the counts that say so (or not)."""

    rows_in: int
    rows_valid: int
    rows_quarantined: int
    in_both: int  # rows both valid and quarantined
    lost: int  # raw rows in neither
    unknown: int  # rows in either that the raw data does not hold

    @property
    def ok(self) -> bool:
        counted = self.rows_in == self.rows_valid + self.rows_quarantined
        return counted and self.in_both == self.lost == self.unknown == 0


def reconcile(raw: pl.DataFrame, valid: pl.DataFrame, quarantine: pl.DataFrame) -> Reconciliation:
    """Compare the rows' identities (source file, row number): the frames hold those only."""
    ident = [SOURCE_FILE, ROW_NUMBER]
    accounted = pl.concat([valid.select(ident), quarantine.select(ident)]).unique()
    return Reconciliation(
        rows_in=raw.height,
        rows_valid=valid.height,
        rows_quarantined=quarantine.height,
        in_both=valid.join(quarantine, on=ident).height,
        lost=raw.join(accounted, on=ident, how="anti").height,
        unknown=accounted.join(raw, on=ident, how="anti").height,
    )


def quarantine_rate(rows_valid: int, rows_quarantined: int) -> float:
    """The quarantined share of a day's rows (0.0 for a day without rows)."""
    total = rows_valid + rows_quarantined
    return rows_quarantined / total if total else 0.0
