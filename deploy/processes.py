"""Supervised child processes, for deploy/prod.py, deploy/services.py, bench/ and the tests.

A server is started in its own process group (it spawns workers, and stopping it must stop
them too) with its output appended to a log file; waited on until it is ready, failing with
the log's tail when it exits or takes too long; stopped with SIGTERM to the group (a
graceful stop: uvicorn drains, celery warm-shuts down), SIGKILL when it lingers. No Dagster
import: the tests and the bench scripts use it before any code location loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class NotReady(RuntimeError):
    """A process exited while starting, or was not ready in time (the message has its log)."""


def start(
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    *,
    stdout: bool = True,
) -> subprocess.Popen:
    """`args` in a new process group, stderr (and stdout, unless `stdout=False`: then it is
    dropped) appended to `log`."""
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=out if stdout else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if stdout else out,
            start_new_session=True,
        )


def group_alive(pid: int) -> bool:
    """Is anything left of the process group `pid` leads?"""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _gone(proc: subprocess.Popen | int, timeout: float) -> bool:
    """Wait up to `timeout` s for the process to end: a child of ours through wait() (it is
    reaped), a recorded pid (another invocation's child) by polling its group."""
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while group_alive(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def stop(proc: subprocess.Popen | int, grace: float = 20) -> None:
    """SIGTERM to the process group, SIGKILL if it has not ended after `grace` s. `proc`: a
    process this one started, or the pid of a group leader another invocation recorded."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is not None:
            return
        pid = proc.pid
    else:
        pid = proc
    _signal(pid, signal.SIGTERM)
    if not _gone(proc, grace):
        _signal(pid, signal.SIGKILL)
        _gone(proc, 10)


def kill(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL to the process group now, as a crash or an OOM kill would: no goodbye."""
    if proc.poll() is None:
        _signal(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _ended(proc: subprocess.Popen | int) -> int | str | None:
    """The exit status of an ended process (`?` for a recorded pid's), None while it runs."""
    if isinstance(proc, subprocess.Popen):
        return proc.poll()
    return None if group_alive(proc) else "?"


def wait_until(
    ready: Callable[[], bool],
    what: str,
    log: Path,
    timeout: float = 180,
    *,
    proc: subprocess.Popen | int | None = None,
    interval: float = 0.5,
) -> None:
    """Poll `ready` until true. NotReady, with the log's tail, after `timeout` s or as soon
    as `proc` (the process that should become ready) has exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        ended = None if proc is None else _ended(proc)
        if ended is not None:
            raise NotReady(f"{what} exited ({ended}) while starting; {log}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise NotReady(f"{what} not ready after {timeout:.0f} s; {log}:\n{tail(log)}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    """Does `url` answer 200 (within 2 s)?"""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
