"""The production profile's local services, for `deploy/prod.py`, bench/ and the tests:
scratch PostgreSQL databases, dagster-celery workers, an MLflow server, and how to tell each
is ready (the processes themselves: deploy/processes.py)."""

from __future__ import annotations

import contextlib
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG = {"host": "127.0.0.1", "port": 5432, "user": "root"}


def pg_url(db: str, host: str = PG["host"], port: int = PG["port"], user: str = PG["user"]) -> str:
    return f"postgresql+psycopg2://{user}@{host}:{port}/{db}"


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped (with its connections) afterwards."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def worker_ready(log: Path, since: int = 0) -> bool:
    """A celery worker said " ready." in its log after byte `since` (a log appended to across
    restarts holds the last start's line too)."""
    if not log.exists():
        return False
    with log.open("rb") as f:
        f.seek(since)
        return b" ready." in f.read()


def celery_config(path: Path, key_prefix: str = "") -> Path:
    """deploy/celery.yaml, with the broker key prefix the executor uses (MLOPS_CELERY_KEY_PREFIX)
    when there is one, written to `path`."""
    import yaml

    cfg = yaml.safe_load((ROOT / "deploy" / "celery.yaml").read_text())
    if key_prefix:
        source = cfg["execution"]["config"]["config_source"]
        source["broker_transport_options"]["global_keyprefix"] = key_prefix
    path.write_text(yaml.safe_dump(cfg))
    return path


def celery_worker_args(config: Path, name: str) -> list[str]:
    """A dagster-celery worker running one step at a time, the code location imported once,
    before its first task."""
    return [
        str(BIN / "dagster-celery"),
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(config),
        "-n",
        name,
        "-i",
        "orchestration.definitions",
        "-l",
        "INFO",
        "--",
        "--concurrency=1",
    ]


def mlflow_server_args(backend: str, artifacts: str, port: int, host: str = "127.0.0.1"):
    """An MLflow tracking server that also serves the artifact store (mlflow-artifacts:/)."""
    return [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def forget_broker_keys(broker: str, prefix: str) -> None:
    """Every key a run with this broker key prefix left in Redis."""
    import redis

    r = redis.Redis.from_url(broker)
    keys = list(r.scan_iter(f"{prefix}*"))
    if keys:
        r.delete(*keys)
