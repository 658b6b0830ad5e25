"""The default profile's Dagster instance ($DAGSTER_HOME/dagster.yaml for `make ui`, the daemon
and the demo): the one place its text lives.

`python -m orchestration.instance [DAGSTER_HOME]` writes it (the Makefile does), and
`write_default_instance(home)` does the same from Python. A file that is missing, or that holds
a default this project shipped earlier, is (re)written; a file you edited is left alone.

The settings are sized for a small, loaded machine (2 cores running the UI, the daemon, its
code server and the runs): a run that fails to launch, or dies before its first step, is
retried instead of lost, and the user hears of it only once the retries are exhausted
(sensors/alerts.py). The production profile (deploy/dagster.yaml) carries the same settings
over PostgreSQL; README "What runs" says which ones to raise on a slower machine.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

DEFAULT_INSTANCE_YAML = """\
# The default profile's Dagster instance (written by orchestration/instance.py; edit freely:
# an edited file is never overwritten). Runs, events and ticks in SQLite under $DAGSTER_HOME.

# Every run is at least one fresh interpreter that imports the code location (several seconds
# of CPU each): ten at once (Dagster's default) starve a 2-core machine until its code server
# stops answering. Raise this to about one run per core.
concurrency:
  runs:
    max_concurrent_runs: 2

# A run whose launch cannot reach the code server (DagsterUserCodeUnreachableError: an
# overloaded machine) goes back into the queue, up to 3 times 30 s apart, instead of failing.
# The queue is checked every second (Dagster's default is 5 s: most of a daily run's time
# in process, bench/startup.py).
run_queue:
  max_user_code_failure_retries: 3
  user_code_failure_retry_delay: 30
  dequeue_interval_seconds: 1

# A run that still fails to launch, is killed, or never starts is re-executed from its failure
# by the daemon, twice at most. A run whose step raised is not: the same input raises again, so
# a retry only delays the alert (a transient step error wants the step's own RetryPolicy).
run_retries:
  enabled: true
  max_retries: 2
  retry_on_asset_or_op_failure: false

# The daemon fails a run still STARTING after 5 minutes (its worker died before the first
# step, or never came up: a worker's start took about 60 s on a loaded 2-core machine);
# run_retries then retries it.
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  poll_interval_seconds: 30

# Starting (or reloading) the code server imports every spec's definitions: allow 6 minutes
# (Dagster's default is 3) before the UI or the daemon gives up on it. Its requests time out
# after DAGSTER_GRPC_TIMEOUT_SECONDS (environment, default 60; README "What runs").
code_servers:
  local_startup_timeout: 360
  reload_timeout: 360

# Sensor and schedule ticks in threads: one slow tick does not hold up the others.
sensors:
  use_threads: true
  num_workers: 4
schedules:
  use_threads: true
  num_workers: 4

telemetry:
  enabled: false
"""

# Defaults this project shipped before: a file holding one of them is replaced by the current
# default. Append the previous text's sha256 here whenever DEFAULT_INSTANCE_YAML changes.
EARLIER_DEFAULTS: frozenset[str] = frozenset(
    {
        hashlib.sha256(b"telemetry:\n  enabled: false\n").hexdigest(),
        "94174414f20169087e1bc5ceeae23af3e16fc075b60c9d649fcd76182804c207",  # before dequeue_interval_seconds
    }
)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_default_instance(home: str | Path) -> Path:
    """`home`/dagster.yaml with the default instance, unless it holds settings of your own.
    Returns the file's path."""
    path = Path(home) / "dagster.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or _sha256(path.read_text()) in EARLIER_DEFAULTS:
        # Temp name then rename, as every file the platform writes: never a half-written file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(DEFAULT_INSTANCE_YAML)
        os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    home = args[0] if args else os.environ.get("DAGSTER_HOME", "")  # Dagster's, not ours
    if not home:
        print("usage: python -m orchestration.instance DAGSTER_HOME", file=sys.stderr)
        return 2
    path = write_default_instance(home)
    path.touch()  # up to date for make, whether written or kept
    if path.read_text() != DEFAULT_INSTANCE_YAML:
        print(
            f"kept {path}: it holds settings of your own (the default: orchestration/instance.py)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
