"""SQL source (`source.kind: sql`): the same rows, checks and quarantine as landing files.

Against the real local MariaDB (and PostgreSQL): generated readings, bad rows included, are
loaded into a table made for the test, the data job runs on a spec that reads it, and the
result must equal the file source's for the same days.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import sqlalchemy as sa
import yaml

from mlops import ingest, sources, sql_source
from mlops.ingest import ROW_NUMBER, SOURCE_FILE
from mlops.spec import SpecError, SqlSource, load_spec
from mlops.sql_source import SqlSourceError
from mlops.urls import redact_url
from tests.conftest import (
    MARIADB_URL,
    POSTGRES_URL,
    REPO,
    Project,
    make_project,
    materialization_meta,
    require_mariadb,
    require_postgres,
    small_data,
)

DAYS = ("2026-01-01", "2026-01-02")
SENSORS = ("temperature", "vibration", "pressure", "rpm", "voltage")
ISO = "%Y-%m-%dT%H:%M:%S"
COMPARED = ["column", "check", "value", "reason", "errors", "record"]


def _key(p: Project, asset: str) -> dg.AssetKey:
    return dg.AssetKey([p.spec.name, asset])


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The file source's run, once per module: the reference every SQL run must equal. ------
@pytest.fixture(scope="module")
def file_run(tmp_path_factory) -> dict:
    p = make_project(tmp_path_factory.mktemp("files"))
    report = small_data(p, days=len(DAYS), machines=6, bad_rows=0.04, seed=11)
    metas = {}
    for day in DAYS:
        result = p.run_day(day)
        metas[day] = {
            a: materialization_meta(result, _key(p, a))
            for a in ("raw_data", "validated_data", "quarantine")
        }
    return {"project": p, "report": report, "meta": metas}


def _sql_spec_text(file_project: Project, url: str, query: str) -> str:
    data = yaml.safe_load((REPO / "specs" / "machine_failure.yaml").read_text())
    base = data["source"]
    data["source"] = {
        "kind": "sql",
        "url": url,
        "query": query,
        "timestamp_column": base["timestamp_column"],
        "entity_column": base["entity_column"],
        "start_date": base["start_date"],
    }
    # Labels still come from the file project's event feed.
    events = copy.deepcopy(data["labels"]["events"])
    events["path"] = str(file_project.spec.resolve(events["path"]))
    events["allow_outside_project"] = True  # the file project's feed, in its own tmp root
    data["labels"]["events"] = events
    return yaml.safe_dump(data, sort_keys=False)


def _storable(record: dict, typed: bool) -> dict | None:
    """A raw CSV row as a table with a DATETIME timestamp column can hold it (None: cannot)."""
    try:
        row = {**record, "timestamp": dt.datetime.strptime(record["timestamp"], ISO)}
        if typed:
            row.update({s: None if row[s] is None else float(row[s]) for s in SENSORS})
    except (TypeError, ValueError):
        return None
    return row


def _create_table(url: str, name: str, columns: list[str], typed: bool) -> sa.Table:
    def col_type(c: str):
        if c == "timestamp":
            return sa.DateTime()
        return sa.Double() if typed and c in SENSORS else sa.String(64)

    table = sa.Table(name, sa.MetaData(), *[sa.Column(c, col_type(c)) for c in columns])
    engine = sa.create_engine(url)
    try:
        table.create(engine)
    finally:
        engine.dispose()
    return table


def _insert(url: str, table: sa.Table, rows: list[dict]) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            if rows:
                conn.execute(table.insert(), rows)
    finally:
        engine.dispose()


def _load_readings(url: str, name: str, landing: Path, typed: bool) -> tuple[sa.Table, int]:
    """Every generated CSV row a typed table can hold goes in; returns the table and skips."""
    frames = [
        pl.read_csv(f, infer_schema=False, missing_utf8_is_empty_string=False)
        for f in sorted(landing.glob("readings_*.csv"))
    ]
    raw = pl.concat(frames)
    table = _create_table(url, name, raw.columns, typed)
    rows = [_storable(r, typed) for r in raw.to_dicts()]
    _insert(url, table, [r for r in rows if r is not None])
    return table, sum(r is None for r in rows)


@pytest.fixture
def table_name():
    made: list[tuple[str, str]] = []

    def new(url: str) -> str:
        name = f"readings_{uuid.uuid4().hex[:12]}"
        made.append((url, name))
        return name

    yield new
    for url, name in made:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        finally:
            engine.dispose()


def _query(url: str, table: str) -> str:
    q = '"' if url.startswith("postgresql") else "`"
    ts = f"{q}timestamp{q}"
    return f"SELECT * FROM {table} WHERE {ts} >= :start AND {ts} < :end"


def _sql_project(tmp_path: Path, file_run: dict, url: str, table: str) -> Project:
    text = _sql_spec_text(file_run["project"], url, _query(url, table))
    return make_project(tmp_path / "sql", text)


def _expected_quarantine(file_q: pl.DataFrame, typed: bool) -> pl.DataFrame:
    keep = [_storable(json.loads(r), typed) is not None for r in file_q["record"]]
    return file_q.filter(pl.Series(keep))


def _same_rows(a: pl.DataFrame, b: pl.DataFrame, columns: list[str]) -> None:
    a, b = a.select(columns).sort(columns), b.select(columns).sort(columns)
    assert a.equals(b), f"\n{a}\n!=\n{b}"


# The comparison -------------------------------------------------------------------------
def test_mariadb_rows_validate_and_quarantine_like_the_file_source(tmp_path, file_run, table_name):
    require_mariadb()
    files: Project = file_run["project"]
    name = table_name(MARIADB_URL)
    # A raw staging table: the timestamp typed (the query ranges over it), the rest as text,
    # so wrongly typed values reach validation as they would in a file.
    _, skipped = _load_readings(MARIADB_URL, name, files.spec.landing_dir, typed=False)
    assert skipped > 0  # unparseable timestamps cannot be stored in a DATETIME column
    p = _sql_project(tmp_path, file_run, MARIADB_URL, name)
    spec_name = p.spec.name
    for day in DAYS:
        result = p.run_day(day)
        file_q = files.lake.read(spec_name, "quarantine", day)
        sql_q = p.lake.read(spec_name, "quarantine", day)
        expected_q = _expected_quarantine(file_q, typed=False)
        unstorable = file_q.height - expected_q.height
        assert expected_q.height > 0
        # Valid rows: identical, typed values and order (only where they came from differs).
        meta_cols = [SOURCE_FILE, ROW_NUMBER]
        file_v = files.lake.read(spec_name, "validated_data", day).drop(meta_cols)
        sql_v = p.lake.read(spec_name, "validated_data", day).drop(meta_cols)
        assert sql_v.height > 100 and sql_v.equals(file_v)
        # Quarantine: the same rows with the same column, check, value, reasons and record.
        _same_rows(sql_q, expected_q, COMPARED)
        assert (sql_q[SOURCE_FILE] == "sql:mysql+pymysql://root@127.0.0.1:3306/test").all()
        # Counts: equal, but for the rows a typed timestamp column could not hold.
        fm, sm = (
            file_run["meta"][day],
            {
                a: materialization_meta(result, _key(p, a))
                for a in ("raw_data", "validated_data", "quarantine")
            },
        )
        assert sm["validated_data"]["rows_in"] == fm["validated_data"]["rows_in"] - unstorable
        assert sm["validated_data"]["rows_valid"] == fm["validated_data"]["rows_valid"]
        assert sm["validated_data"]["rows_quarantined"] == sql_q.height == expected_q.height
        assert sm["raw_data"]["source_files"] == {
            "sql:mysql+pymysql://root@127.0.0.1:3306/test": sm["validated_data"]["rows_in"]
        }
        # raw_data's data version is the rows' content hash, what the new-data sensor sees.
        raw_version = next(
            e.step_materialization_data.materialization.tags["dagster/data_version"]
            for e in result.get_asset_materialization_events()
            if e.step_materialization_data.materialization.asset_key == _key(p, "raw_data")
        )
        day_d = dt.date.fromisoformat(day)
        assert raw_version == sm["raw_data"]["content_hash"]
        assert raw_version == sources.partition_fingerprint(p.spec, day_d)
    # Every kind of bad row the table can hold was exercised.
    checks = set(p.lake.read_many(spec_name, "quarantine", list(DAYS))["check"].to_list())
    assert {"not_null", "type", "category", "duplicate"} <= checks and checks & {"min", "max"}
    # What follows from equal valid rows is equal too: labels and features, byte for byte.
    for asset in ("labels", "features"):
        for day in DAYS:
            assert p.lake.content_hash(spec_name, asset, day) == files.lake.content_hash(
                spec_name, asset, day
            )


def test_postgres_typed_table_gives_the_file_sources_valid_rows(tmp_path, file_run, table_name):
    require_postgres()
    files: Project = file_run["project"]
    name = table_name(POSTGRES_URL)
    # A typed table (DOUBLE sensors): values come back as floats and are rendered as text.
    _load_readings(POSTGRES_URL, name, files.spec.landing_dir, typed=True)
    p = _sql_project(tmp_path, file_run, POSTGRES_URL, name)
    day = DAYS[0]
    result = p.run_day(day)
    meta_cols = [SOURCE_FILE, ROW_NUMBER]
    file_v = files.lake.read(p.spec.name, "validated_data", day).drop(meta_cols)
    assert p.lake.read(p.spec.name, "validated_data", day).drop(meta_cols).equals(file_v)
    expected = _expected_quarantine(files.lake.read(p.spec.name, "quarantine", day), typed=True)
    sql_q = p.lake.read(p.spec.name, "quarantine", day)
    _same_rows(sql_q, expected, ["column", "check"])
    meta = materialization_meta(result, _key(p, "validated_data"))
    assert meta["rows_quarantined"] == expected.height > 0


# Data versions --------------------------------------------------------------------------
READINGS = [
    ("2026-01-01 01:00:00", "m1", "A", "1.0", 70.5, 1.0, 120.0, 2000.0, 220.0),
    ("2026-01-01 02:00:00", "m1", "A", "1.0", 71.25, 1.1, 121.0, 2001.0, 221.0),
    ("2026-01-01 02:00:00", "m2", "B", "2.0", None, 1.2, 122.0, 2002.0, 222.0),
    ("2026-01-02 00:00:00", "m2", "B", "2.0", 68.0, 1.3, 123.0, 2003.0, 223.0),
]
COLUMNS = ["timestamp", "machine_id", "machine_type", "firmware", *SENSORS]


def _typed_table(url: str, name: str, rows: list[tuple]) -> None:
    table = _create_table(url, name, COLUMNS, typed=True)
    _insert(
        url,
        table,
        [dict(zip(COLUMNS, (dt.datetime.fromisoformat(r[0]), *r[1:]), strict=True)) for r in rows],
    )


def _source(url: str, table: str) -> SqlSource:
    return SqlSource(
        kind="sql",
        url=url,
        query=_query(url, table),
        timestamp_column="timestamp",
        entity_column="machine_id",
        start_date=dt.date(2026, 1, 1),
    )


def test_data_version_is_the_rows_content_hash(table_name):
    require_mariadb()
    day1, day2, day3 = (dt.date(2026, 1, d) for d in (1, 2, 3))
    a, b = table_name(MARIADB_URL), table_name(MARIADB_URL)
    _typed_table(MARIADB_URL, a, READINGS)
    _typed_table(MARIADB_URL, b, READINGS[::-1])  # same rows, stored in another order
    src_a, src_b = _source(MARIADB_URL, a), _source(MARIADB_URL, b)
    first = sql_source.fingerprint(src_a, day1)
    assert first is not None
    assert sql_source.fingerprint(src_a, day1) == first  # stable
    assert sql_source.fingerprint(src_b, day1) == first  # independent of row order
    assert sql_source.fingerprint(src_a, day2) not in (None, first)
    assert sql_source.fingerprint(src_a, day3) is None  # no rows: nothing to run
    batch = sql_source.load_day(src_b, day1)
    assert batch.content_hash == first
    # Rows rendered as a CSV holds them, in a total order: time, entity, then the rest.
    assert batch.frame.select(COLUMNS).rows() == [
        ("2026-01-01T01:00:00", "m1", "A", "1.0", "70.5", "1.0", "120.0", "2000.0", "220.0"),
        ("2026-01-01T02:00:00", "m1", "A", "1.0", "71.25", "1.1", "121.0", "2001.0", "221.0"),
        ("2026-01-01T02:00:00", "m2", "B", "2.0", None, "1.2", "122.0", "2002.0", "222.0"),
    ]
    assert batch.frame[ROW_NUMBER].to_list() == [1, 2, 3]
    assert batch.frame[ingest.FILE_COLUMNS].unique().to_list() == [",".join(COLUMNS)]
    # One changed value changes that day's version, and only that day's.
    before_day2 = sql_source.fingerprint(src_a, day2)
    engine = sa.create_engine(MARIADB_URL)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(f"UPDATE {a} SET temperature = :t WHERE machine_id = :m AND rpm = :r"),
                {"t": 70.75, "m": "m1", "r": 2000.0},
            )
    finally:
        engine.dispose()
    changed = sql_source.fingerprint(src_a, day1)
    assert changed not in (None, first)
    assert sql_source.fingerprint(src_a, day2) == before_day2


def test_values_are_bound_never_spliced_into_the_sql(table_name):
    require_mariadb()
    name = table_name(MARIADB_URL)
    nasty = "m'7\"; DROP TABLE x; -- \\"
    _typed_table(MARIADB_URL, name, [("2026-01-01 03:00:00", nasty, "A", "1.0", *READINGS[0][4:])])
    seen: list[tuple[str, object]] = []

    def spy(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", spy)
    try:
        batch = sql_source.load_day(_source(MARIADB_URL, name), dt.date(2026, 1, 1))
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", spy)
    assert batch.frame["machine_id"].to_list() == [nasty]  # the quote round-trips
    statement, params = next((s, p) for s, p in seen if name in s)
    assert "2026-01" not in statement and "%(start)s" in statement and "%(end)s" in statement
    assert params == {"start": dt.datetime(2026, 1, 1), "end": dt.datetime(2026, 1, 2)}


# Spec and errors --------------------------------------------------------------------------
def _write_spec(tmp_path: Path, source: dict) -> Path:
    data = yaml.safe_load((REPO / "specs" / "machine_failure.yaml").read_text())
    data["source"] = source
    (tmp_path / "specs").mkdir(exist_ok=True)
    path = tmp_path / "specs" / "x.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


SQL_SOURCE = {
    "kind": "sql",
    "url": "mysql+pymysql://etl:${MLOPS_TEST_DB_PASSWORD}@127.0.0.1:3306/test",
    "query": "SELECT * FROM readings WHERE ts >= :start AND ts < :end",
    "timestamp_column": "timestamp",
    "entity_column": "machine_id",
    "start_date": "2026-01-01",
}


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"query": "SELECT * FROM readings WHERE ts >= :start"}, "source.query", "must bind :end"),
        (
            {"query": "SELECT * FROM readings WHERE ts >= '2026-01-01'"},
            "source.query",
            "must bind :start and :end",
        ),
        (
            {"query": "SELECT * FROM r WHERE ts >= :start AND ts < :end AND site = :site"},
            "source.query",
            "binds :site",
        ),
        ({"query": "DELETE FROM r WHERE ts >= :start AND ts < :end"}, "source.query", "SELECT"),
        ({"url": "not a url"}, "source.url", "is not a SQLAlchemy URL"),
        ({"kind": "kafka"}, "source.kind", "must be 'files' (landing files) or 'sql'"),
        ({"path": "landing/"}, "source.path", "unknown field"),
        ({"query": None}, "source.query", "required field is missing"),
    ],
)
def test_sql_source_spec_errors_name_the_field(tmp_path, change, where, message):
    source = {**SQL_SOURCE, **change}
    source = {k: v for k, v in source.items() if v is not None}
    with pytest.raises(SpecError) as err:
        load_spec(_write_spec(tmp_path, source))
    assert [loc for loc, _ in err.value.problems] == [where]
    assert message in str(err.value)


def test_files_stay_the_default_kind(tmp_path):
    source = yaml.safe_load((REPO / "specs" / "machine_failure.yaml").read_text())["source"]
    del source["kind"]
    spec = load_spec(_write_spec(tmp_path, source))
    assert spec.source.kind == "files"
    sql = load_spec(_write_spec(tmp_path, SQL_SOURCE))
    assert isinstance(sql.source, SqlSource)
    with pytest.raises(ValueError, match="has no landing directory"):
        _ = sql.landing_dir


def test_credentials_come_from_the_environment_and_never_show(tmp_path, monkeypatch):
    spec = load_spec(_write_spec(tmp_path, {**SQL_SOURCE, "url": SQL_SOURCE["url"]}))
    monkeypatch.delenv("MLOPS_TEST_DB_PASSWORD", raising=False)
    with pytest.raises(SqlSourceError, match=r"uses \$\{MLOPS_TEST_DB_PASSWORD\}, not set"):
        sql_source.load_day(spec.source, dt.date(2026, 1, 1))
    monkeypatch.setenv("MLOPS_TEST_DB_PASSWORD", "s3cret-Pw")
    port = _closed_port()
    source = spec.source.model_copy(update={"url": spec.source.url.replace("3306", str(port))})
    with pytest.raises(SqlSourceError) as err:
        sql_source.load_day(source, dt.date(2026, 1, 1))
    text = str(err.value)
    assert f"cannot connect to the SQL source mysql+pymysql://etl:***@127.0.0.1:{port}/test" in text
    assert "s3cret-Pw" not in text and "Check that the database server is running" in text
    assert sql_source.describe(source) == f"sql:mysql+pymysql://etl:***@127.0.0.1:{port}/test"
    assert "s3cret" not in redact_url("postgresql://u@h/db?password=s3cret&sslmode=require")


def test_unreachable_database_fails_the_run_with_what_to_check(tmp_path, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("MLOPS_TEST_DB_PASSWORD", "s3cret-Pw")
    source = {**SQL_SOURCE, "url": SQL_SOURCE["url"].replace("3306", str(port))}
    data = yaml.safe_load((REPO / "specs" / "machine_failure.yaml").read_text())
    data["source"] = source
    p = make_project(tmp_path, yaml.safe_dump(data, sort_keys=False))
    result = p.run_day("2026-01-01", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.event_specific_data.error)
    assert f"mysql+pymysql://etl:***@127.0.0.1:{port}/test" in message
    assert "s3cret-Pw" not in message
    assert not p.lake.exists(p.spec.name, "raw_data", "2026-01-01")


def test_bad_query_fails_with_the_database_message(table_name):
    require_mariadb()
    source = _source(MARIADB_URL, f"missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(SqlSourceError, match=r"source.query failed on mysql\+pymysql://root@"):
        sql_source.load_day(source, dt.date(2026, 1, 1))


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_database_skips_locally_and_fails_in_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    url = f"mysql+pymysql://root@127.0.0.1:{_closed_port()}/test"
    if ci:
        with pytest.raises(pytest.fail.Exception, match="required in CI"):
            require_mariadb(url)
    else:
        with pytest.raises(pytest.skip.Exception, match=r"start MariaDB on 127\.0\.0\.1:3306"):
            require_mariadb(url)
