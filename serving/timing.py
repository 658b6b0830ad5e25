"""When a request reached the server, so its latency includes the time it queued.

A worker runs each request's work on its event loop without yielding (serving/app.py), so
a request that arrives while others are being scored waits: first for the loop to look at
its socket, then behind the requests read in the same pass. An ASGI middleware starts its
clock only when the request's task runs, after all of that; under 50 connections clients
saw a p99 of 316 ms while such a clock said 7.5 ms.

`TimedHttpToolsProtocol` is uvicorn's httptools protocol plus an arrival stamp: a daemon
thread per worker waits (epoll, one-shot) on every connection's socket and notes the moment
it becomes readable, which does not wait for the loop (only for the GIL, which a busy loop
hands over every 5 ms). The protocol puts that moment, as `time.perf_counter()`, into the
request's scope (`scope["extensions"][ARRIVAL]`); serving.app.Guard measures from it. An
arrival the thread cannot vouch for (it saw the data only after the loop had read it) falls
back to the moment the loop read the data: the stamp is never earlier than the arrival.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from typing import Any

try:  # the locked set has httptools (uvicorn's faster parser); h11 is uvicorn's own
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]

ARRIVAL = "mlops.arrival"  # the scope extension: perf_counter() when the request arrived
PROTOCOL = "serving.timing:TimedHttpToolsProtocol"  # uvicorn's `http` setting


class ArrivalWatcher:
    """Notes when each registered socket becomes readable, in a thread of its own."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._arrived: dict[int, float] = {}
        self._seq: dict[int, int] = {}  # bumped at each re-arm, so a late note is dropped
        self._thread = threading.Thread(target=self._run, name="arrival-watcher", daemon=True)
        self._thread.start()

    def watch(self, fd: int) -> None:
        self._seq[fd] = self._seq.get(fd, 0) + 1
        self._arrived.pop(fd, None)
        try:
            self._ep.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
        except FileExistsError:
            self._ep.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def take(self, fd: int) -> float | None:
        """When data on `fd` arrived since the last take, if noted in time; then re-arm."""
        t = self._arrived.pop(fd, None)
        self._seq[fd] = self._seq.get(fd, 0) + 1
        with contextlib.suppress(OSError):  # closed meanwhile
            self._ep.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
        return t

    def forget(self, fd: int) -> None:
        self._seq.pop(fd, None)
        self._arrived.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(fd)

    def _run(self) -> None:
        while True:
            seen = dict(self._seq)  # the armings this poll can report
            events = self._ep.poll(1.0)
            now = time.perf_counter()
            for fd, _ in events:
                # Re-armed since the poll began: the loop already read what woke us.
                if self._seq.get(fd) == seen.get(fd):
                    self._arrived.setdefault(fd, now)


_WATCHER: list[ArrivalWatcher] = []
_LOCK = threading.Lock()


def watcher() -> ArrivalWatcher:
    """This process's watcher, started on first use (never at import)."""
    if not _WATCHER:
        with _LOCK:
            if not _WATCHER:
                _WATCHER.append(ArrivalWatcher())
    return _WATCHER[0]


class TimedHttpToolsProtocol(_Base):
    """uvicorn's httptools protocol (h11 without httptools), with each request's arrival in
    its scope."""

    _fd: int | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            watcher().watch(self._fd)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fd is not None:
            watcher().forget(self._fd)
            self._fd = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        noted = watcher().take(self._fd) if self._fd is not None else None
        arrival = noted if noted is not None and noted <= now else now
        before = getattr(self, "scope", None)
        super().data_received(data)
        scope = getattr(self, "scope", None)
        if scope is not None and scope is not before:  # a request began in this data
            scope.setdefault("extensions", {}).setdefault(ARRIVAL, arrival)
