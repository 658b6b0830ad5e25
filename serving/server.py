"""Start the service under uvicorn: settings and the metrics folder go to the workers
through the environment, then uvicorn runs one process or supervises N workers.

SIGTERM (or Ctrl-C) is a graceful stop: uvicorn stops accepting connections, lets the
requests in flight finish (each writes its log lines before its response), then each
worker closes its log file and feature-store connections.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from serving.metrics import MULTIPROC_ENV
from serving.settings import SETTINGS_ENV, ServeSettings
from serving.timing import PROTOCOL

APP = "serving.app:app_from_env"


def _metrics_dir(workers: int) -> tuple[str | None, bool]:
    """(folder for prometheus multiprocess mode, whether we made it). The folder must be
    set before a worker imports prometheus_client and must start empty."""
    given = os.environ.get(MULTIPROC_ENV)  # prometheus_client's own variable, not a setting
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):  # samples of a previous run
            stale.unlink()
        return given, False
    if workers == 1 and "prometheus_client" in sys.modules:
        return None, False  # already imported in this process: keep one-process metrics
    return tempfile.mkdtemp(prefix="mlops-serve-metrics-"), True


def run(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    timeout_graceful_shutdown: int = 30,
) -> None:
    import uvicorn

    os.environ[SETTINGS_ENV] = settings.to_env()  # the hand-over to the worker processes
    folder, made = _metrics_dir(workers)
    if folder:
        os.environ[MULTIPROC_ENV] = folder
    try:
        uvicorn.run(
            APP,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=False,  # every /predict request is in the request log already
            log_level="info",
            server_header=False,
            http=PROTOCOL,  # stamps each request's arrival: latency includes queueing
            timeout_graceful_shutdown=timeout_graceful_shutdown,
        )
    finally:
        if made and folder:
            shutil.rmtree(folder, ignore_errors=True)
