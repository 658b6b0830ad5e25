"""Micro-batching: concurrent /predict requests served as one vectorized batch.

A worker's /predict requests queue here for its threads. A thread that is free takes every
waiting request, up to `max_size`, and serves them together (Service.respond: one store
read, one feature-kernel call, one predict, one append and one log write for all of them).
A thread that finds fewer requests than the last batches held waits up to `max_wait_s`
(from the first one's arrival) for as many: the clients answered by those batches are
likely to send their next request within that time. So the batch follows the load: one
request at a time when they come one at a time (nothing is waited for), as many as are
in flight when many clients keep the worker busy.

Each request keeps its own request id, response, log lines and error: Service.predict_batch
validates each on its own before the batch, and serves the batch again one request at a
time when the feature step refuses it as a whole (a reading without state under the
`reject` policy, the feature store failing; nothing was appended then).

The event loop only queues a request and awaits its future; the threads take batches, and
hand all of a batch's responses back to the loop in one callback.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Job:
    """One /predict request waiting for its batch: what the handler read, and its future."""

    body: bytes | None
    error: Exception | None  # met before the body was read: answered as is
    explain: bool | None
    top: int
    request_id: str
    t0: float  # perf_counter() at the request's arrival
    extensions: dict[str, Any]
    future: asyncio.Future[Any] | None = field(default=None, repr=False)


class MicroBatcher:
    """Queues jobs and runs `serve(batch) -> one answer per job` on `pool`, at most
    `threads` batches at a time."""

    def __init__(
        self,
        serve: Callable[[list[Job]], list[Any]],
        pool: Executor,
        threads: int,
        max_size: int,
        max_wait_s: float,
    ):
        self.serve = serve
        self.pool = pool
        self.threads = threads
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._draining = 0  # threads taking batches (on the pool)
        self._recent: deque[int] = deque([1], maxlen=2)  # the last batches' sizes
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """Requests queued for a thread."""
        return len(self._queue)

    async def submit(self, job: Job) -> Any:
        """Queue `job` and wait for its answer (on the event loop)."""
        loop = self._loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        with self._cond:
            self._queue.append(job)
            start = self._draining < self.threads
            if start:
                self._draining += 1
            else:
                self._cond.notify()  # a thread waiting for a fuller batch
        if start:
            try:
                self.pool.submit(self._drain)
            except RuntimeError:  # the pool is shut down: the worker is stopping
                with self._cond:
                    self._draining -= 1
                    if job in self._queue:
                        self._queue.remove(job)
                raise
        return await job.future

    def _drain(self) -> None:
        """On a pool thread: take batches until the queue is empty."""
        while True:
            with self._cond:
                batch = self._take()
                if not batch:
                    self._draining -= 1
                    return
            try:
                answers: list[Any] = self.serve(batch)
            except BaseException as e:  # serve answers errors itself; this is a bug
                answers = [e] * len(batch)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_deliver, batch, answers)

    def _take(self) -> list[Job]:
        """The next batch (under the lock): what waits, up to max_size; if that is fewer
        than the last batches held (the requests answered then are likely to come back),
        what else arrives until max_wait_s after the first one's arrival."""
        queue = self._queue
        batch: list[Job] = []
        while queue and len(batch) < self.max_size:
            batch.append(queue.popleft())
        if not batch:
            return batch
        want = min(self.max_size, max(self._recent))
        self._recent.append(len(batch))
        if len(batch) < want and self.max_wait_s > 0:
            deadline = batch[0].t0 + self.max_wait_s
            while len(batch) < want:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                if not queue:
                    self._cond.wait(left)
                while queue and len(batch) < want:
                    batch.append(queue.popleft())
            self._recent[-1] = len(batch)
        return batch


def _deliver(batch: list[Job], answers: list[Any]) -> None:
    """On the event loop: each job's answer to its future (a job whose request is gone,
    cancelled, is skipped)."""
    for job, answer in zip(batch, answers, strict=True):
        fut = job.future
        if fut is None or fut.done():
            continue
        if isinstance(answer, BaseException):
            fut.set_exception(answer)
        else:
            fut.set_result(answer)
