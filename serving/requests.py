"""Request bodies -> typed readings, checked against the spec's schema, with field-level errors.

A body is one reading (a JSON object with the schema's columns: the entity key, the timestamp
and the sensor values), a JSON list of readings, or `{"records": [...], "explain": bool}`.
`explain` may also sit beside the columns of a single reading. The checks are the batch
validation's rules (mlops.validation) applied to one reading: required columns, types,
nullability, min/max, allowed categories; and, stricter than the landing files, a field
the schema does not name is an error, since it means the device and the spec disagree.

Every problem names the record, the field and the reason, with a stable code (the batch
validation's vocabulary plus `missing` and `extra`): missing, extra, type, not_null, min,
max, category. Hand-written rather than a generated pydantic model: the checks run per
request, and this is several times faster and words each reason like the quarantine does.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json

from mlops.labels import entity_column
from mlops.spec import Spec

ENVELOPE_KEYS = ("records", "explain")
# Timestamps a reading may carry: not before the Unix epoch (a zeroed or unset device
# clock), and not further ahead of the server's clock than `max_future_s` (one reading
# from year 9999 would otherwise become its entity's newest row and push every real
# reading out of order).
EARLIEST = dt.datetime(1970, 1, 1)


class BadRequest(Exception):
    """A request the service refuses: HTTP status, a code, a message and field problems."""

    def __init__(
        self, status: int, code: str, message: str, detail: list[dict[str, Any]] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.detail = detail or []

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": self.message,
            "detail": self.detail,
            "request_id": request_id,
        }


def problem(record: int | None, field: str | None, code: str, reason: str) -> dict[str, Any]:
    return {"record": record, "field": field, "code": code, "reason": reason}


@dataclass
class Record:
    entity: str
    reading: dict[str, Any]  # every schema column, typed; the timestamp as naive UTC
    raw: dict[str, Any]  # as sent


@dataclass
class Parsed:
    records: list[Record]
    explain: bool | None  # from the body; None when the body does not say


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number: send null for a missing value")


def _shown(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(v: Any) -> str:
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }.get(type(v), type(v).__name__)


class RequestParser:
    """Checks bodies against one spec's schema; build once per process."""

    def __init__(self, spec: Spec, max_batch: int, max_future_s: float | None = 86_400.0):
        self.spec = spec
        self.max_batch = max_batch
        self.max_future = dt.timedelta(seconds=max_future_s) if max_future_s is not None else None
        self.entity_col = spec.source.entity_column
        self.entity_key = entity_column(spec)
        self.ts_col = spec.source.timestamp_column
        self.ts_format = spec.source.timestamp_format
        self.columns = {c.name: c for c in spec.schema_.columns}
        optional = {spec.labels.column} if spec.labels.kind == "column" else set()
        self.required = [
            c.name for c in spec.schema_.columns if not c.nullable and c.name not in optional
        ]
        self.allowed = set(self.columns)
        self.categories = {
            c.name: set(c.categories) for c in spec.schema_.columns if c.categories is not None
        }
        self.explain_is_column = "explain" in self.columns

    # Body -> records ---------------------------------------------------------------------
    def parse(self, body: bytes) -> Parsed:
        if not body.strip():
            raise BadRequest(400, "malformed_json", "the request body is empty: send JSON")
        try:  # pydantic-core's parser: 4 times faster on a batch, the same values
            data = from_json(body, allow_inf_nan=False)
        except ValueError:  # json.loads then says what is wrong, or accepts what it accepts
            data = self._loads(body)
        explain = None
        if isinstance(data, list):
            items = data
        elif isinstance(data, dict) and "records" in data and "records" not in self.columns:
            extra = sorted(set(data) - set(ENVELOPE_KEYS))
            if extra:
                raise BadRequest(
                    422,
                    "invalid_request",
                    "the request has unknown field(s)",
                    [
                        problem(
                            None,
                            k,
                            "extra",
                            f"{k}: unknown field; a batch body holds "
                            "'records' (a list of readings) and optionally 'explain'",
                        )
                        for k in extra
                    ],
                )
            items = data["records"]
            if not isinstance(items, list):
                raise BadRequest(
                    422,
                    "invalid_request",
                    "'records' must be a list of readings",
                    [
                        problem(
                            None,
                            "records",
                            "type",
                            f"records: expected a list of objects, got {_type_name(items)}",
                        )
                    ],
                )
            explain = self._explain(data)
        elif isinstance(data, dict):
            if "explain" in data and not self.explain_is_column:
                data = dict(data)
                explain = self._explain(data)
                del data["explain"]
            items = [data]
        else:
            raise BadRequest(
                422,
                "invalid_request",
                "the body must be a JSON object (one reading), a list of readings, or "
                '{"records": [...]}',
                [problem(None, None, "type", f"got a JSON {_type_name(data)}")],
            )
        if not items:
            raise BadRequest(
                422,
                "invalid_request",
                "no readings in the request",
                [problem(None, "records", "missing", "records: the list is empty")],
            )
        if len(items) > self.max_batch:
            raise BadRequest(
                413,
                "too_many_records",
                f"{len(items)} readings in one request; the limit is {self.max_batch}",
                [
                    problem(
                        None,
                        "records",
                        "too_many_records",
                        f"records: {len(items)} > max batch {self.max_batch}; split the batch",
                    )
                ],
            )
        problems: list[dict[str, Any]] = []
        records = []
        for i, item in enumerate(items):
            rec = self._record(i, item, problems)
            if rec is not None:
                records.append(rec)
        if problems:
            n = len({p["record"] for p in problems})
            raise BadRequest(
                422,
                "invalid_request",
                f"{len(problems)} problem(s) in {n} reading(s); nothing was scored",
                problems,
            )
        return Parsed(records, explain)

    @staticmethod
    def _loads(body: bytes) -> Any:
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise BadRequest(
                400,
                "malformed_json",
                f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            ) from None
        except UnicodeDecodeError:
            raise BadRequest(400, "malformed_json", "the body is not UTF-8 text") from None
        except RecursionError:
            raise BadRequest(400, "malformed_json", "the body is nested too deeply") from None
        except ValueError as e:  # NaN/Infinity, or an integer with too many digits
            raise BadRequest(400, "malformed_json", f"the body is not valid JSON: {e}") from None

    def _explain(self, data: dict[str, Any]) -> bool | None:
        v = data.get("explain")
        if v is None or isinstance(v, bool):
            return v
        raise BadRequest(
            422,
            "invalid_request",
            "'explain' must be true or false",
            [problem(None, "explain", "type", f"explain: expected true or false, got {_shown(v)}")],
        )

    # One reading -----------------------------------------------------------------------------
    def _record(self, i: int, item: Any, problems: list[dict[str, Any]]) -> Record | None:
        if not isinstance(item, dict):
            problems.append(
                problem(
                    i, None, "type", f"expected a JSON object (a reading), got {_type_name(item)}"
                )
            )
            return None
        n_before = len(problems)
        for name in self.required:
            if name not in item:
                problems.append(problem(i, name, "missing", f"{name}: required field is missing"))
        for name in item:
            if name not in self.allowed:
                problems.append(
                    problem(
                        i,
                        name,
                        "extra",
                        f"{name}: unknown field; the spec's schema has {', '.join(self.columns)}",
                    )
                )
        reading: dict[str, Any] = {}
        for name, col in self.columns.items():
            v = item.get(name)
            if v is None:
                if name in item and not col.nullable:
                    problems.append(problem(i, name, "not_null", f"{name}: required value is null"))
                reading[name] = None
                continue
            typed, why, code = self._typed(col.type, v)
            if why is not None:
                problems.append(problem(i, name, code, f"{name}: {why}"))
                continue
            if col.min is not None and typed < col.min:
                problems.append(
                    problem(i, name, "min", f"{name}: {_shown(v)} is below the minimum {col.min}")
                )
            elif col.max is not None and typed > col.max:
                problems.append(
                    problem(i, name, "max", f"{name}: {_shown(v)} is above the maximum {col.max}")
                )
            elif name in self.categories and typed not in self.categories[name]:
                problems.append(
                    problem(
                        i,
                        name,
                        "category",
                        f"{name}: {_shown(v)} is not one of the allowed categories "
                        f"{sorted(self.categories[name])}",
                    )
                )
            reading[name] = typed
        if self.entity_col and reading.get(self.entity_col) == "":
            problems.append(problem(i, self.entity_col, "type", f"{self.entity_col}: is empty"))
        if len(problems) > n_before:
            return None
        entity = str(reading[self.entity_col]) if self.entity_col else "all"
        return Record(entity=entity, reading=reading, raw=item)

    def _typed(self, kind: str, v: Any) -> tuple[Any, str | None, str]:
        """(typed value, None, "") or (None, reason, code)."""
        t = type(v)
        if kind == "float":
            if t is float:
                if math.isfinite(v):
                    return v, None, ""
                return None, f"{_shown(v)} is not a finite number", "type"
            if t is int:
                try:
                    return float(v), None, ""
                except OverflowError:
                    return None, "the number is too large", "type"
            return None, f"expected a number, got {_type_name(v)} {_shown(v)}", "type"
        if kind == "int":
            if t is int:
                return v, None, ""
            if t is float and math.isfinite(v) and v.is_integer():
                return int(v), None, ""
            return None, f"expected an integer, got {_type_name(v)} {_shown(v)}", "type"
        if kind in ("string", "category"):
            if t is str:
                return v, None, ""
            return None, f"expected a string, got {_type_name(v)} {_shown(v)}", "type"
        if kind == "bool":
            if t is bool:
                return v, None, ""
            return None, f"expected true or false, got {_type_name(v)} {_shown(v)}", "type"
        if kind == "timestamp":
            if t is not str:
                return None, f"expected an ISO 8601 timestamp string, got {_type_name(v)}", "type"
            try:
                ts = (
                    dt.datetime.strptime(v, self.ts_format)
                    if self.ts_format
                    else dt.datetime.fromisoformat(v)
                )
            except ValueError:
                want = self.ts_format or "ISO 8601, e.g. 2026-01-03T05:00:00 or ...+00:00"
                return None, f"{_shown(v)} is not a timestamp ({want})", "type"
            if ts.tzinfo is not None:
                try:
                    ts = ts.astimezone(dt.UTC).replace(tzinfo=None)
                except OverflowError:
                    return None, f"{_shown(v)} is out of range", "type"
            if ts < EARLIEST:
                return None, f"{_shown(v)} is before {EARLIEST:%Y-%m-%d} (a clock not set?)", "min"
            if self.max_future is not None:
                latest = dt.datetime.now(dt.UTC).replace(tzinfo=None) + self.max_future
                if ts > latest:
                    return (
                        None,
                        f"{_shown(v)} is more than {self.max_future} ahead of the server's "
                        f"clock ({latest - self.max_future:%Y-%m-%dT%H:%M:%S} UTC)",
                        "max",
                    )
            return ts, None, ""
        return None, f"unsupported column type {kind}", "type"  # pragma: no cover


# The schema as JSON Schema (for the OpenAPI document) ------------------------------------------
JSON_TYPES = {"float": "number", "int": "integer", "string": "string", "category": "string",
              "bool": "boolean", "timestamp": "string"}  # fmt: skip


def request_schemas(parser: RequestParser) -> dict[str, dict[str, Any]]:
    """The request bodies the parser accepts, as OpenAPI 3.1 component schemas: each column's
    type, range and categories from the spec's schema, the required columns, no others."""
    spec = parser.spec
    props: dict[str, Any] = {}
    for name, col in parser.columns.items():
        s: dict[str, Any] = {"type": JSON_TYPES[col.type]}
        if col.type == "timestamp":
            if parser.ts_format:
                s["description"] = f"a timestamp in the format {parser.ts_format!r} (UTC)"
            else:
                s["format"] = "date-time"
                s["description"] = "ISO 8601; naive is UTC"
            s["description"] += (
                f"; not before {EARLIEST:%Y-%m-%d}"
                + (f", not more than {parser.max_future} ahead of the server's clock"
                   if parser.max_future is not None else "")
            )  # fmt: skip
        if col.min is not None:
            s["minimum"] = col.min
        if col.max is not None:
            s["maximum"] = col.max
        if name in parser.categories:
            s["enum"] = sorted(parser.categories[name])
        if name == parser.entity_col:
            s["minLength"] = 1
            s["description"] = "the entity key"
        if col.nullable:
            s["type"] = [s["type"], "null"]
            if "enum" in s:
                s["enum"] = [*s["enum"], None]
        props[name] = s
    reading = {
        "type": "object",
        "description": f"One reading of the spec {spec.name!r}.",
        "properties": props,
        "required": list(parser.required),
        "additionalProperties": False,
    }
    explain = {"type": ["boolean", "null"], "description": "add top feature contributions"}
    single = dict(reading, properties=dict(props))
    if not parser.explain_is_column:
        single["properties"]["explain"] = explain
    records = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/Reading"},
        "minItems": 1,
        "maxItems": parser.max_batch,
    }
    return {
        "Reading": reading,
        "SingleReading": single,
        "Readings": records,
        "Batch": {
            "type": "object",
            "properties": {
                "records": {"$ref": "#/components/schemas/Readings"},
                "explain": explain,
            },
            "required": ["records"],
            "additionalProperties": False,
        },
        "PredictBody": {
            "anyOf": [
                {"$ref": "#/components/schemas/SingleReading"},
                {"$ref": "#/components/schemas/Readings"},
                {"$ref": "#/components/schemas/Batch"},
            ]
        },
        "Problem": {
            "type": "object",
            "properties": {
                "record": {"type": ["integer", "null"]},
                "field": {"type": ["string", "null"]},
                "code": {"type": "string"},
                "reason": {"type": "string"},
            },
            "required": ["record", "field", "code", "reason"],
        },
        "Error": {
            "type": "object",
            "properties": {
                "error": {"type": "string", "description": "a stable code"},
                "message": {"type": "string"},
                "detail": {"type": "array", "items": {"$ref": "#/components/schemas/Problem"}},
                "request_id": {"type": "string"},
            },
            "required": ["error", "message"],
        },
    }


def example_reading(parser: RequestParser) -> dict[str, Any]:
    """A valid reading (an hour before now) for the OpenAPI document's example."""
    when = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0) - dt.timedelta(hours=1)
    out: dict[str, Any] = {}
    for name, col in parser.columns.items():
        if name not in parser.required:
            continue
        if col.type == "timestamp":
            out[name] = when.strftime(parser.ts_format) if parser.ts_format else when.isoformat()
        elif name in parser.categories:
            out[name] = sorted(parser.categories[name])[0]
        elif col.type in ("float", "int"):
            lo = col.min if col.min is not None else 0
            hi = col.max if col.max is not None else lo + 1
            mid = (lo + hi) / 2
            out[name] = int(mid) if col.type == "int" else float(mid)
        elif col.type == "bool":
            out[name] = False
        else:
            out[name] = "example-1"
    return out
