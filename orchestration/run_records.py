"""A spec's runs, read from the Dagster instance without importing Dagster.

`mlops status` needs a few facts from the instance (the training runs with their trigger
tags, recent failures). Opening a DagsterInstance costs seconds (Dagster, its storage layer,
SQLAlchemy and alembic); the default profile's run storage is one SQLite file whose `runs`
and `run_tags` tables have kept their columns since Dagster 0.13. So the default profile is
read straight from `$DAGSTER_HOME/history/runs.db`, read-only, and anything else (PostgreSQL
storage, a custom storage class, a file whose tables are not the expected ones) goes through
the Dagster API: the same answers, only slower.

Both readers return `RunRecord`s, newest first, with the filters the status needs.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# The columns read; a file without them is not a run storage this module understands.
_RUN_COLUMNS = ("id", "run_id", "pipeline_name", "status", "start_time", "end_time")
_TAG_COLUMNS = ("run_id", "key", "value")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    job_name: str
    status: str  # a DagsterRunStatus value: QUEUED, STARTED, SUCCESS, FAILURE, ...
    tags: Mapping[str, str] = field(default_factory=dict)
    start_time: float | None = None  # unix seconds
    end_time: float | None = None


class RunReader(Protocol):
    def runs(
        self,
        job_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        statuses: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        """Runs matching every filter given, newest first."""
        ...


class UnknownRunStorage(RuntimeError):
    """The instance's run storage is not the default SQLite file this module can read."""


class SqliteRuns:
    """The default profile's run storage, `<base_dir>/history/runs.db`, opened read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        if path.exists():
            # mode=ro: never create or migrate the file; a missing file is "no runs yet".
            self._conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            self._check_schema()

    def _check_schema(self) -> None:
        assert self._conn is not None
        for table, wanted in (("runs", _RUN_COLUMNS), ("run_tags", _TAG_COLUMNS)):
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in wanted if c not in have]
            if missing:
                self.close()
                raise UnknownRunStorage(
                    f"{self.path}: table {table} lacks {', '.join(missing)} (a Dagster version "
                    "this reader does not know)"
                )

    def runs(
        self,
        job_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        statuses: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        if self._conn is None:
            return []
        where, params = [], []
        if job_name is not None:
            where.append("r.pipeline_name = ?")
            params.append(job_name)
        if statuses:
            where.append(f"r.status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        for key, value in (tags or {}).items():
            where.append("EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = r.run_id "
                         "AND t.key = ? AND t.value = ?)")  # fmt: skip
            params.extend([key, value])
        sql = "SELECT r.run_id, r.pipeline_name, r.status, r.start_time, r.end_time FROM runs r"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        rows = self._conn.execute(sql, params).fetchall()
        run_tags = self._tags([r[0] for r in rows])
        return [
            RunRecord(run_id, job, status, run_tags.get(run_id, {}), start, end)
            for run_id, job, status, start, end in rows
        ]

    def _tags(self, run_ids: list[str]) -> dict[str, dict[str, str]]:
        assert self._conn is not None
        out: dict[str, dict[str, str]] = {}
        for i in range(0, len(run_ids), 500):  # far below SQLite's variable limit
            chunk = run_ids[i : i + 500]
            sql = (
                "SELECT run_id, key, value FROM run_tags "
                f"WHERE run_id IN ({', '.join('?' * len(chunk))}) ORDER BY id"
            )
            for run_id, key, value in self._conn.execute(sql, chunk):
                out.setdefault(run_id, {})[key] = value
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class InstanceRuns:
    """The same through the Dagster API, for any storage Dagster can open."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance

    def runs(
        self,
        job_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        statuses: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[RunRecord]:
        import dagster as dg

        records = self.instance.get_run_records(
            dg.RunsFilter(
                job_name=job_name,
                tags=dict(tags or {}),
                statuses=[dg.DagsterRunStatus(s) for s in statuses or ()],
            ),
            limit=limit,
        )
        return [
            RunRecord(
                r.dagster_run.run_id,
                r.dagster_run.job_name,
                r.dagster_run.status.value,
                dict(r.dagster_run.tags),
                r.start_time,
                r.end_time,
            )
            for r in records
        ]


def default_storage_file(dagster_home: str | Path) -> Path | None:
    """`<base_dir>/history/runs.db` when $DAGSTER_HOME/dagster.yaml leaves the run storage at
    Dagster's default (no storage, or `storage: sqlite:`); None for anything else."""
    import yaml

    home = Path(dagster_home)
    config_file = home / "dagster.yaml"
    config: Any = {}
    if config_file.exists():
        config = yaml.safe_load(config_file.read_text()) or {}
    if not isinstance(config, dict):
        return None
    if "run_storage" in config or "event_log_storage" in config:
        return None  # the legacy per-storage settings: let Dagster resolve them
    storage = config.get("storage")
    base = home
    if storage is not None:
        if not (isinstance(storage, dict) and set(storage) == {"sqlite"}):
            return None  # postgres, mysql, a custom class
        sqlite_conf = storage["sqlite"] or {}
        base_dir = sqlite_conf.get("base_dir") if isinstance(sqlite_conf, dict) else None
        if isinstance(base_dir, dict):  # {env: VAR}: the user's dagster.yaml names it
            base_dir = os.environ.get(str(base_dir.get("env", "")))
        if base_dir is not None and not isinstance(base_dir, str):
            return None
        base = Path(base_dir) if base_dir else home
    return base / "history" / "runs.db"


def open_runs(dagster_home: str | Path, instance_factory: Any = None) -> tuple[RunReader, Any]:
    """A reader of the instance at `dagster_home`, and what to close afterwards: the SQLite file
    directly when the storage is the default one, else a DagsterInstance."""
    path = default_storage_file(dagster_home)
    if path is not None:
        try:
            reader = SqliteRuns(path)
            return reader, reader
        except (UnknownRunStorage, sqlite3.Error):
            pass
    import dagster as dg

    instance = (instance_factory or dg.DagsterInstance.get)()
    return InstanceRuns(instance), instance


def iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds") if ts else None
