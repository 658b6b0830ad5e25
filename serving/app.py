"""The online prediction service: a FastAPI app over the registry, the online feature store
and the request log.

    POST /predict        readings -> score, decision, model version, route, request id
    POST /feedback       field labels for served readings -> appended beside the request log
    GET  /health/live    the process answers
    GET  /health/ready   503 until a champion is loaded
    GET  /model          served versions, aliases, lineage summary, refusals, retries
    GET  /metrics        Prometheus text format
    GET  /openapi.json   the OpenAPI document; its request schema is generated from the
                         spec's (types, ranges, categories, required columns)

The event loop only admits requests, reads bodies and answers; a request's work runs in
a bounded pool of `threads` threads per worker (default 1: the work is CPU-bound Python,
so more threads mostly take turns on the GIL). That work is the same for one reading or a
thousand: one validation pass over the body, one feature-store read, one call of the
feature kernel over every reading, one model call, one feature-store append (atomic) and
one request-log write. Requests that wait for a thread together are served as one such
batch (serving.microbatch, `microbatch_max_size`), each still validated, answered and
logged on its own.

Admission: at most `max_inflight` /predict requests per worker are admitted (running or
waiting for a thread); one more is answered 503 at once, with `Retry-After` and a JSON
error (`overloaded`), and counted (mlops_serving_shed_total), so the wait of an admitted
request is bounded instead of growing with the load. /health/*, /metrics and /model are
never refused. Latency is measured from the request's arrival at the server
(serving.timing), so the wait for the loop and for a thread count.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from mlops.feedback import FeedbackError, FeedbackWriter, parse_body
from mlops.inference_log import InferenceLogWriter, now_iso
from mlops.online import (
    OUT_OF_ORDER,
    BatchRejected,
    FeatureRejected,
    OnlineBatch,
    OnlineFeatures,
    OnlineResult,
)
from mlops.online_store import StoreUnavailable, make_store
from mlops.registry import CHALLENGER, CHAMPION
from mlops.settings import settings as platform_settings
from mlops.spec import load_spec
from serving.bandit import Bandit, Reward
from serving.metrics import ServingMetrics
from serving.microbatch import Job, MicroBatcher
from serving.models import ModelManager, ServedModel, Snapshot, bound_registry_requests
from serving.requests import (
    BadRequest,
    Parsed,
    Record,
    RequestParser,
    example_reading,
    problem,
    request_schemas,
)
from serving.settings import TOKEN_ENV, ServeSettings
from serving.timing import ARRIVAL

log = logging.getLogger("mlops.serving")
JSON = "application/json"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_TOP = 100
RETRY_AFTER_S = 1  # what a request refused by the admission limit is told to wait
STARTED = "mlops.started"  # scope extension: perf_counter() when a thread took the request
STORE_DOWN = "feature_store_unavailable"
_dumps = __import__("json").JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_ids: tuple[int, random.Random | None] = (-1, None)  # (pid, generator) of new_request_id


def new_request_id() -> str:
    """A random 128-bit id in hex, as uuid4().hex is. Not uuid4 itself: os.urandom releases
    the GIL, and on a busy worker the event loop then waits up to the switch interval (5 ms)
    to get it back from the predict thread; py-spy at twice a worker's capacity found the
    loop spending more than half of its refusals' time there. One generator per process,
    seeded from os.urandom (a forked worker seeds its own)."""
    global _ids
    pid, rng = _ids
    if rng is None or pid != os.getpid():
        rng = random.Random(os.urandom(32))
        _ids = (os.getpid(), rng)
    return f"{rng.getrandbits(128):032x}"


class Service:
    """Everything one worker process holds: spec, parser, feature store, models, log."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.spec = spec = load_spec(settings.spec_path)
        self.parser = RequestParser(spec, settings.max_batch, settings.max_future_s)
        self.features = OnlineFeatures(spec, make_store(settings.store_url))
        self.metrics = ServingMetrics(spec.model.task)
        self.manager = ModelManager(
            spec,
            settings.tracking_uri,
            settings.poll_interval_s,
            with_challenger=settings.mode != "champion",
            on_swap=self._on_swap,
            on_refusal=lambda alias, v, why: self.metrics.refusals.labels(alias).inc(),
            retry_s=settings.load_retry_s,
            retry_max_s=settings.load_retry_max_s,
            on_retry=lambda alias, v, why: self.metrics.load_retries.labels(alias).inc(),
        )
        self.log = InferenceLogWriter(settings.log_dir, settings.log_max_bytes)
        self.feedback_log = FeedbackWriter(settings.log_dir, settings.log_max_bytes)
        self.bandit = (
            Bandit(
                settings.log_dir,
                spec.model.task,
                Reward(
                    settings.bandit_reward_tp,
                    settings.bandit_reward_tn,
                    settings.bandit_reward_fp,
                    settings.bandit_reward_fn,
                    settings.bandit_tolerance,
                ),
                settings.bandit_floor,
                settings.bandit_window_days,
            )
            if settings.mode == "bandit"
            else None
        )
        self._stop = threading.Event()
        token = platform_settings().serve_token  # MLOPS_SERVE_TOKEN
        self.token = token.get_secret_value() if token else None
        self.pid = os.getpid()
        self.ts_col = spec.source.timestamp_column
        self.classify = spec.model.task == "binary_classification"
        self._pred_children: dict[tuple[str, int, Any], Any] = {}
        self._score_children: dict[str, Any] = {}
        # The request path's blocking work runs here, never on the event loop; the
        # admission limit (Guard) bounds what waits for it.
        self.pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="predict")
        # /predict requests queue here for the pool; those that wait together are one batch.
        self.batcher = MicroBatcher(
            self.respond,
            self.pool,
            settings.threads,
            settings.microbatch_max_size,
            settings.microbatch_max_wait_ms / 1000,
        )

    def _on_swap(self, alias: str, version: int) -> None:
        self.metrics.model_version.labels(alias).set(version)
        self.metrics.swaps.labels(alias).inc()

    def start(self) -> None:
        self.manager.start()
        if self.bandit is not None:
            threading.Thread(target=self._learn, name="bandit", daemon=True).start()

    def _learn(self) -> None:
        """Bandit mode: fold new log and feedback lines into the posteriors, every
        bandit_refresh_s (every worker reads all workers' files, so all agree)."""
        assert self.bandit is not None
        while not self._stop.is_set():
            try:
                self.bandit.refresh()
            except Exception:  # a torn file or a full disk must not stop the routing
                log.exception("bandit: could not read the log and feedback files")
            self._stop.wait(self.settings.bandit_refresh_s)

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=True)  # requests in flight finish and log first
        self.manager.stop()
        self.log.close()
        self.feedback_log.close()
        self.features.store.close()
        ServingMetrics.worker_exit()

    # Predict ---------------------------------------------------------------------------------
    def predict(
        self, body: bytes, explain: bool | None, top: int, request_id: str, t0: float
    ) -> tuple[int, dict[str, Any]]:
        """One request: a batch of one."""
        return self.predict_batch([Job(body, None, explain, top, request_id, t0, {})])[0]

    def predict_batch(self, jobs: list[Job]) -> list[tuple[int, dict[str, Any]]]:
        """(status, body) of each request of a micro-batch. Each is validated on its own (a
        bad one is answered alone); the valid ones are one vectorized batch (one store read,
        one kernel call, one predict per model, one append, one log write), their readings
        in request order, so each gets what it would get alone."""
        snap: Snapshot = self.manager.snapshot  # read once: one version per batch
        out: list[tuple[int, dict[str, Any]] | None] = [None] * len(jobs)
        valid: list[tuple[int, Job, Parsed]] = []
        for i, job in enumerate(jobs):
            try:
                parsed = self.parser.parse(job.body or b"")
            except BadRequest as e:
                out[i] = self.reject(e, job.request_id, job.t0)
                continue
            except Exception as e:
                out[i] = self.failed(job, e)
                continue
            if snap.champion is None:
                why = BadRequest(503, "model_not_ready", self.not_ready_reason())
                out[i] = self.reject(why, job.request_id, job.t0, parsed)
                continue
            valid.append((i, job, parsed))
        if valid:
            try:
                self._serve(snap, valid, out)
            except Exception as e:
                for i, job, _ in valid:
                    if out[i] is None:
                        out[i] = self.failed(job, e)
        return out  # type: ignore[return-value]

    def _route(self, snap: Snapshot) -> tuple[str, ServedModel, dict[str, Any] | None]:
        """The route and model of one request, and bandit mode's decision for its log."""
        assert snap.champion is not None
        if self.bandit is not None and snap.challenger is not None:
            version, how = self.bandit.choose(snap.champion.version, snap.challenger.version)
            if version == snap.challenger.version != snap.champion.version:
                return "canary", snap.challenger, how
            return CHAMPION, snap.champion, how
        if (
            self.settings.mode == "canary"
            and snap.challenger is not None
            and random.random() < self.settings.canary_fraction
        ):
            return "canary", snap.challenger, None
        return CHAMPION, snap.champion, None

    def _serve(
        self,
        snap: Snapshot,
        valid: list[tuple[int, Job, Parsed]],
        out: list[tuple[int, dict[str, Any]] | None],
    ) -> None:
        """Valid requests -> out[i]: their readings' features in one batch, one predict per
        route, one log write. When the feature step fails for a batch of several requests
        (a reading without state under the `reject` policy, the store failing; nothing was
        appended), each request is served again on its own, so each gets its own answer."""
        records = [rec for _, _, parsed in valid for rec in parsed.records]
        try:
            batch = self.features.serve_batch([(r.entity, r.reading) for r in records])
        except Exception as e:
            if len(valid) > 1:
                self._one_by_one(snap, valid, out)
                return
            i, job, parsed = valid[0]
            out[i] = self.reject(self._feature_error(e), job.request_id, job.t0, parsed)
            return
        results = batch.results
        spans, k = [], 0  # each request's rows in the batch
        for _, _, parsed in valid:
            spans.append((k, k + len(parsed.records)))
            k += len(parsed.records)
        routes = [self._route(snap) for _ in valid]
        groups: dict[str, list[int]] = {}
        for j, (route, _, _) in enumerate(routes):
            groups.setdefault(route, []).append(j)
        scored: list[Any] = [None] * len(valid)  # per request: scores, decisions, X, score_ms
        counts = []
        for route, members in groups.items():
            model = routes[members[0]][1]
            t1 = time.perf_counter()
            if len(members) == len(valid):  # every request: the batch's columns as they are
                X = model.scorer.matrix_from_columns(batch.columns, len(results))
            else:
                rows = [r for j in members for r in range(*spans[j])]
                cols = {c: v[rows] for c, v in batch.columns.items()}
                X = model.scorer.matrix_from_columns(cols, len(rows))
            scores = model.scorer.score(X)
            decisions = model.scorer.decide(scores)
            score_ms = (time.perf_counter() - t1) * 1000
            counts.append((model.version, route, scores, decisions))
            at = 0
            for j in members:
                m = spans[j][1] - spans[j][0]
                scored[j] = (scores[at : at + m], decisions[at : at + m], X[at : at + m], score_ms)
                at += m
        shadow = self._shadow(snap, batch) if self.settings.mode == "shadow" else None
        now = now_iso()
        lines: list[dict[str, Any]] = []
        answers = []
        for j, (i, job, parsed) in enumerate(valid):
            route, model, how = routes[j]
            scores, decisions, X, score_ms = scored[j]
            lo = spans[j][0]
            rid = job.request_id
            explain = job.explain if job.explain is not None else bool(parsed.explain)
            explanations = self._explain(model, X, job.top) if explain else None
            preds = []
            for r, rec in enumerate(parsed.records):
                p = {
                    "record": r,
                    "entity": rec.entity,
                    "timestamp": rec.reading[self.ts_col].isoformat(),
                    "score": float(scores[r]),
                    "decision": decisions[r],
                    "model_version": model.version,
                    "route": route,
                    "request_id": rid,
                    "fallback": results[lo + r].fallback,
                }
                if explanations is not None:
                    p["explanation"] = explanations[r]
                preds.append(p)
            latency_ms = (time.perf_counter() - job.t0) * 1000
            for r, rec in enumerate(parsed.records):
                res = results[lo + r]
                lines.append(
                    self._line(
                        rid, now, r, rec, res, res.features, preds[r], route, model.version,
                        latency_ms, score_ms,
                    )
                )  # fmt: skip
                if how is not None:
                    lines[-1]["bandit"] = how  # the route decision and the posteriors it used
            if shadow is not None:
                s_model, s_scores, s_decisions, s_ms = shadow
                for r, rec in enumerate(parsed.records):
                    res = results[lo + r]
                    pred = {"score": float(s_scores[lo + r]), "decision": s_decisions[lo + r]}
                    lines.append(
                        self._line(
                            rid, now, r, rec, res, res.features, pred, "shadow",
                            s_model.version, latency_ms, s_ms,
                        )
                    )  # fmt: skip
            payload = {
                "request_id": rid,
                "model_version": model.version,
                "route": route,
                "predictions": preds,
            }
            answers.append((i, payload))
        self.log.write(lines)  # flushed before the responses leave
        for count in counts:
            self._count(*count)
        if shadow is not None:
            s_model, s_scores, s_decisions, _ = shadow
            self._count(s_model.version, "shadow", s_scores, s_decisions)
        for res in results:
            if res.fallback_code:
                self.metrics.fallbacks.labels(res.fallback_code).inc()
        for i, payload in answers:
            out[i] = (200, payload)

    def _one_by_one(
        self,
        snap: Snapshot,
        valid: list[tuple[int, Job, Parsed]],
        out: list[tuple[int, dict[str, Any]] | None],
    ) -> None:
        """Each request of a refused batch on its own, in order. Once the store fails again,
        the requests left are answered 503 at once rather than each waiting for it."""
        down: BadRequest | None = None
        for item in valid:
            i, job, parsed = item
            if down is not None:
                self.metrics.store_unavailable.inc()
                out[i] = self.reject(down, job.request_id, job.t0, parsed)
                continue
            try:
                self._serve(snap, [item], out)
            except Exception as e:
                out[i] = self.failed(job, e)
            answer = out[i]
            if answer is not None and answer[1].get("error") == STORE_DOWN:
                down = BadRequest(503, STORE_DOWN, answer[1]["message"])

    def _line(
        self,
        request_id: str,
        now: str,
        index: int,
        rec: Record,
        result: OnlineResult,
        features: dict[str, Any],
        pred: dict[str, Any],
        route: str,
        version: int,
        latency_ms: float,
        score_ms: float,
    ) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "record": index,
            "time": now,
            "event_time": rec.reading[self.ts_col].isoformat(),
            "entity": rec.entity,
            "route": route,
            "model_version": version,
            "status": 200,
            "latency_ms": round(latency_ms, 3),
            "score_ms": round(score_ms, 3),
            "inputs": rec.raw,
            "features": features,
            "outputs": {"score": pred["score"], "decision": pred["decision"]},
            "fallback": result.fallback,
            "pid": self.pid,
        }

    def _feature_error(self, e: Exception) -> BadRequest:
        """The answer to a request whose feature step failed with `e` (re-raised when it is
        not the store's or the fallback policy's)."""
        if isinstance(e, BatchRejected):
            return self._rejected(e.rejected)
        if isinstance(e, StoreUnavailable | sqlite3.Error | OSError):
            self.metrics.store_unavailable.inc()
            log.error("online feature store unavailable: %s", e)
            return BadRequest(
                503,
                STORE_DOWN,
                f"the online feature store is unavailable: {e}; nothing was scored, retry later",
            )
        raise e

    def _rejected(self, rejected: list[tuple[int, FeatureRejected]]) -> BadRequest:
        field = self.spec.source.entity_column
        detail = [
            problem(i, field, e.code, f"{field or 'entity'} {e.entity!r}: {e.reason}")
            for i, e in rejected
        ]
        late = any(e.code == OUT_OF_ORDER for _, e in rejected)
        return BadRequest(
            422,
            detail[0]["code"],
            f"{len(rejected)} reading(s) have no usable feature state in the online store; "
            + ("send each entity's readings in time order, " if late else "")
            + "materialize online_features for the entity, or set features.online_fallback: "
            "reading_only in the spec; nothing was scored",
            detail,
        )

    def _explain(self, model: ServedModel, X, top: int) -> list[dict[str, Any]]:
        if model.explainer is None:
            gone = {"method": "unavailable", "reason": model.explain_error or "not supported"}
            return [gone] * len(X)
        return model.explainer.explain(X, model.scorer.columns, top)

    def _shadow(self, snap: Snapshot, batch: OnlineBatch):
        challenger = snap.challenger
        if challenger is None:
            return None
        t = time.perf_counter()
        n = len(batch.results)
        try:
            X = challenger.scorer.matrix_from_columns(batch.columns, n)
            scores = challenger.scorer.score(X)
            decisions = challenger.scorer.decide(scores)
        except Exception as e:  # the challenger never fails a request
            self.metrics.shadow_errors.inc(n)
            log.warning("shadow v%s failed to score: %s", challenger.version, e)
            return None
        return challenger, scores, decisions, (time.perf_counter() - t) * 1000

    def _count(self, version: int, route: str, scores, decisions: list[Any]) -> None:
        hist = self._score_children.get(route)
        if hist is None:
            hist = self._score_children[route] = self.metrics.scores.labels(route)
        for s, d in zip(scores, decisions, strict=True):
            key = (route, version, d if self.classify else "")
            child = self._pred_children.get(key)
            if child is None:
                child = self._pred_children[key] = self.metrics.predictions.labels(
                    route, str(version), str(key[2])
                )
            child.inc()
            hist.observe(float(s))

    def reject(
        self, e: BadRequest, request_id: str, t0: float, parsed: Parsed | None = None
    ) -> tuple[int, dict[str, Any]]:
        codes = [p["code"] for p in e.detail] or [e.code]
        for code in codes:
            self.metrics.rejections.labels(code).inc()
        entity = parsed.records[0].entity if parsed and parsed.records else None
        self.log.write(
            [
                {
                    "request_id": request_id,
                    "record": None,
                    "time": now_iso(),
                    "event_time": None,
                    "entity": entity,
                    "route": None,
                    "model_version": None,
                    "status": e.status,
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                    "inputs": [r.raw for r in parsed.records] if parsed else None,
                    "error": {"code": e.code, "message": e.message, "detail": e.detail[:50]},
                    "pid": self.pid,
                }
            ]
        )
        return e.status, e.body(request_id)

    def log_failure(self, request_id: str, t0: float, what: str) -> None:
        """A request the service itself failed (500): in the log too, if the log works."""
        try:
            self.log.write(
                [
                    {
                        "request_id": request_id,
                        "record": None,
                        "time": now_iso(),
                        "route": None,
                        "status": 500,
                        "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                        "error": {"code": "internal_error", "message": what[:500]},
                        "pid": self.pid,
                    }
                ]
            )
        except Exception:
            log.exception("could not log the failed request %s", request_id)

    # On the event loop -------------------------------------------------------------------------
    async def accept(self, scope: dict[str, Any], receive: Any) -> Response:
        """A POST /predict (admitted by Guard): its query, request id and body, then its
        answer from the pool, where it is served with the requests queued beside it."""
        request = Request(scope, receive)
        extensions = scope.setdefault("extensions", {})
        t0 = extensions.get(ARRIVAL) or time.perf_counter()  # from the request's arrival
        given = request.headers.get("x-request-id")
        rid = given if given and REQUEST_ID_RE.match(given) else new_request_id()
        body, error, explain, top = None, None, None, self.settings.explain_top
        try:
            q = request.query_params
            explain = _flag("explain", q.get("explain"))
            top = _top(q.get("top"), self.settings.explain_top)
            body = await _read_body(request, self.settings.max_body_bytes)
        except Exception as e:  # answered (4xx, or 500 for the unexpected) on the pool
            error = e
        return await self.batcher.submit(Job(body, error, explain, top, rid, t0, extensions))

    # On the pool -------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., Response], *args: Any) -> Response:
        """`fn(*args)` on the request pool; the event loop stays free meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

    def respond(self, jobs: list[Job]) -> list[Response]:
        """A micro-batch of /predict requests' work and responses (on the pool; see
        serving.microbatch): predict, or answer the error met before a body was read; either
        way, logged. One request's failure is its own 500, not its batch's."""
        started = time.perf_counter()
        answers: list[tuple[int, dict[str, Any]] | None] = [None] * len(jobs)
        ready = []
        for k, job in enumerate(jobs):
            job.extensions[STARTED] = started
            if job.error is None:
                ready.append(k)
                continue
            try:
                raise job.error
            except BadRequest as e:
                answers[k] = self.reject(e, job.request_id, job.t0)
            except Exception as e:
                answers[k] = self.failed(job, e)
        try:
            for k, answer in zip(ready, self.predict_batch([jobs[k] for k in ready]), strict=True):
                answers[k] = answer
        except Exception as e:
            for k in ready:
                if answers[k] is None:
                    answers[k] = self.failed(jobs[k], e)
        done: list[tuple[int, dict[str, Any]]] = answers  # type: ignore[assignment]
        return [self._encode(job, answer) for job, answer in zip(jobs, done, strict=True)]

    def _encode(self, job: Job, answer: tuple[int, dict[str, Any]]) -> Response:
        """The response of one request of a batch; one that cannot be encoded is its 500."""
        try:
            return _json(answer[0], answer[1], job.request_id)
        except Exception as e:
            return _json(*self.failed(job, e), job.request_id)

    def failed(self, job: Job, e: Exception) -> tuple[int, dict[str, Any]]:
        """A request the service itself failed on: a 500, its log line, the traceback."""
        log.error("request %s failed", job.request_id, exc_info=e)
        self.log_failure(job.request_id, job.t0, f"{type(e).__name__}: {e}")
        return 500, {
            "error": "internal_error",
            "message": "the service failed on this request; see its log",
            "request_id": job.request_id,
        }

    # Feedback --------------------------------------------------------------------------------
    def feedback(self, body: bytes, request_id: str) -> Response:
        """Checked against the spec's label type, then appended durably (flushed before the
        answer); all or nothing. On the pool: it writes a file."""
        try:
            items = parse_body(self.spec, body, self.settings.max_batch)
        except FeedbackError as e:
            for p in e.problems or [{"code": "invalid_feedback"}]:
                self.metrics.rejections.labels(p["code"]).inc()
            payload = {
                "error": "invalid_feedback",
                "message": str(e),
                "detail": e.problems[:50],
                "request_id": request_id,
            }
            return _json(422 if e.problems else 400, payload, request_id)
        ids = self.feedback_log.append(items, "api")
        for it in items:
            self.metrics.feedback.labels(_label_text(it["label"])).inc()
        self.on_feedback(items)
        return _json(
            200, {"request_id": request_id, "recorded": len(ids), "feedback_ids": ids}, request_id
        )

    def on_feedback(self, items: list[dict[str, Any]]) -> None:
        """Bandit mode: the reward counts at once in this worker (the others read it from
        the files within bandit_refresh_s)."""
        if self.bandit is not None:
            self.bandit.refresh()

    # Status ----------------------------------------------------------------------------------
    def not_ready_reason(self) -> str:
        m = self.manager
        why = f"no version of {self.spec.registered_model_name}@{CHAMPION} is loaded yet"
        refused = [f"v{v}: {r}" for (a, v), r in m.refused.items() if a == CHAMPION]
        if refused:
            why += f" (refused {'; '.join(refused)})"
        retrying = [
            f"v{v} could not be loaded ({r.attempts} attempt(s), next in "
            f"{r.info(a, v)['next_retry_in_s']} s): {r.reason}"
            for (a, v), r in list(m.retrying.items())
            if a == CHAMPION
        ]
        if retrying:
            why += f" ({'; '.join(retrying)})"
        if m.last_poll_error:
            why += f" (registry: {m.last_poll_error})"
        return why

    def model_info(self) -> dict[str, Any]:
        snap, m = self.manager.snapshot, self.manager
        champ = snap.champion.info if snap.champion else None
        return {
            "name": self.spec.registered_model_name,
            "alias": CHAMPION,
            "version": snap.champion.version if snap.champion else None,
            "lineage": champ["lineage"] if champ else None,
            "mode": self.settings.mode,
            "canary_fraction": self.settings.canary_fraction
            if self.settings.mode == "canary"
            else None,
            "bandit": self.bandit.state() if self.bandit is not None else None,
            "champion": champ,
            CHALLENGER: snap.challenger.info if snap.challenger else None,
            "refused": [
                {"alias": a, "version": v, "reason": r} for (a, v), r in sorted(m.refused.items())
            ],
            "retrying": [r.info(a, v) for (a, v), r in sorted(m.retrying.items())],
            "swaps": m.events.swaps,
            "recent_events": list(m.events.recent),
            "poll_interval_s": self.settings.poll_interval_s,
            "last_poll_error": m.last_poll_error,
            "pid": self.pid,
        }


def _json(status: int, payload: dict[str, Any], request_id: str | None = None) -> Response:
    headers = {"x-request-id": request_id} if request_id else None
    return Response(_dumps(payload), status_code=status, media_type=JSON, headers=headers)


def _label_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else "value"


def _flag(name: str, value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise BadRequest(
        422,
        "invalid_request",
        f"query parameter {name} must be true or false",
        [problem(None, name, "type", f"{name}: expected true or false, got {value!r}")],
    )


def _top(value: str | None, default: int) -> int:
    if value is None:
        return default
    if value.isdigit() and 1 <= int(value) <= MAX_TOP:
        return int(value)
    raise BadRequest(
        422,
        "invalid_request",
        f"query parameter top must be an integer from 1 to {MAX_TOP}",
        [problem(None, "top", "type", f"top: expected 1..{MAX_TOP}, got {value!r}")],
    )


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise BadRequest(400, "malformed_request", "Content-Length is not a number")
        if int(length) > limit:
            raise _too_large(int(length), limit)
        return await request.body()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> BadRequest:
    return BadRequest(
        413,
        "body_too_large",
        f"the body has {size} bytes; the limit is {limit} (--max-body-bytes)",
        [
            problem(
                None, None, "body_too_large", f"body: {size} > {limit} bytes; send fewer readings"
            )
        ],
    )


class Guard:
    """Pure ASGI middleware on the event loop: bearer-token check (health stays open), the
    admission limit of /predict, POST /predict itself (Service.accept), and request
    metrics: latency from the request's arrival at the server (serving.timing), and from
    when a thread took it (the handler's own time)."""

    def __init__(self, app: Any, service: Service):
        self.app, self.service = app, service
        token = service.token
        self.expected = f"Bearer {token}".encode() if token else None
        self.limit = service.settings.max_inflight
        self.inflight = 0  # admitted /predict requests: on the loop only, so no lock

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        extensions = scope.get("extensions")
        if extensions is None:
            extensions = scope["extensions"] = {}
        # The arrival at the server (serving.timing), so queueing counts; else the app's t0.
        arrived = extensions.get(ARRIVAL, t0)
        path = scope["path"]
        status = [500]
        metrics = self.service.metrics

        def observe(code: int) -> None:
            now = time.perf_counter()
            began = extensions.get(STARTED, t0)  # a thread took it (/predict), else t0
            metrics.observe_request(path, code, now - arrived, now - began)

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.expected is not None and not path.startswith("/health/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                metrics.rejections.labels("unauthorized").inc()
                resp = _json(
                    401,
                    {
                        "error": "unauthorized",
                        "message": f"send the header Authorization: Bearer <{TOKEN_ENV}>",
                    },
                )
                resp.headers["www-authenticate"] = "Bearer"
                await resp(scope, receive, send_status)
                observe(401)
                return
        if path != "/predict":
            try:
                await self.app(scope, receive, send_status)
            finally:
                observe(status[0])
            return
        if self.inflight >= self.limit:
            await self.shed(scope, receive, send)
            return
        self.inflight += 1
        metrics.inflight.inc()
        try:
            if scope["method"] == "POST":
                # Served here rather than through FastAPI's middleware, routing and
                # dependency layers, which cost more than a micro-batched reading's own work;
                # the route exists for the OpenAPI document (and answers other methods 405).
                response = await self.service.accept(scope, receive)
                await response(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.inflight -= 1
            metrics.inflight.dec()
            observe(status[0])

    async def shed(self, scope: dict, receive: Any, send: Any) -> None:
        """503 at once: nothing read, nothing logged, counted; not in the latency histogram
        (it measures the admitted requests)."""
        self.service.metrics.shed.inc()
        self.service.metrics.count_request(scope["path"], 503)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if given and REQUEST_ID_RE.match(given) else new_request_id()
        resp = _json(
            503,
            {
                "error": "overloaded",
                "message": f"{self.limit} requests are already in progress in this worker "
                f"(--max-inflight); retry after {RETRY_AFTER_S} s",
                "detail": [],
                "request_id": rid,
            },
            rid,
        )
        resp.headers["retry-after"] = str(RETRY_AFTER_S)
        await resp(scope, receive, send)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[int, dict[str, Any]]:
    what = {
        400: "the body is not JSON (malformed_json, malformed_request)",
        401: "the bearer token is missing or wrong (when MLOPS_SERVE_TOKEN is set)",
        413: "the body or the batch is over its limit (body_too_large, too_many_records)",
        422: "field problems, each with its record, field, code and reason; or no usable "
        "feature state (unknown_entity, stale_state, out_of_order)",
        500: "the service failed on this request (internal_error); see its log",
        503: "no champion loaded (model_not_ready), the feature store is down "
        "(feature_store_unavailable), or too many requests in progress (overloaded, with "
        "Retry-After); retry later",
    }
    return {s: _content(_ref("Error"), what[s]) for s in statuses}


def response_schemas(service: Service) -> dict[str, dict[str, Any]]:
    """Component schemas of the responses (the requests' come from the spec's schema)."""
    decision = {"type": "integer", "enum": [0, 1]} if service.classify else {"type": "number"}
    routes = ["champion", "canary"]
    explanation = {
        "type": "object",
        "properties": {
            "method": {"type": "string"},
            "space": {"type": "string"},
            "base_value": {"type": "number"},
            "top": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "feature": {"type": "string"},
                        "value": {"type": ["number", "null"]},
                        "contribution": {"type": "number"},
                    },
                    "required": ["feature", "value", "contribution"],
                },
            },
            "rest": {"type": "number"},
            "reason": {"type": "string"},
        },
        "required": ["method"],
    }
    prediction = {
        "type": "object",
        "properties": {
            "record": {"type": "integer", "minimum": 0},
            "entity": {"type": "string"},
            "timestamp": {"type": "string"},
            "score": {"type": "number"},
            "decision": decision,
            "model_version": {"type": "integer"},
            "route": {"type": "string", "enum": routes},
            "request_id": {"type": "string"},
            "fallback": {
                "type": ["string", "null"],
                "description": "why the entity's state was not used (reading_only policy)",
            },
            "explanation": explanation,
        },
        "required": [
            "record", "entity", "timestamp", "score", "decision", "model_version", "route",
            "request_id", "fallback",
        ],
    }  # fmt: skip
    return {
        "Prediction": prediction,
        "PredictResponse": {
            "type": "object",
            "properties": {
                "request_id": {"type": "string"},
                "model_version": {"type": "integer"},
                "route": {"type": "string", "enum": routes},
                "predictions": {"type": "array", "items": _ref("Prediction"), "minItems": 1},
            },
            "required": ["request_id", "model_version", "route", "predictions"],
        },
    }


def _openapi_routes(settings: ServeSettings, example: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per route: the responses and the /predict request for the OpenAPI document."""
    obj = {"type": "object"}
    return {
        "predict": {
            "response_class": Response,
            "responses": {
                200: _content(_ref("PredictResponse"), "one prediction per reading"),
                **_errors(400, 401, 413, 422, 500, 503),
            },
            "openapi_extra": {
                "parameters": [
                    {
                        "name": "explain",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean"},
                        "description": "add each prediction's top feature contributions",
                    },
                    {
                        "name": "top",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP},
                        "description": f"contributions per prediction (default "
                        f"{settings.explain_top})",
                    },
                    {
                        "name": "x-request-id",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "the request id to log and answer with, when it "
                        f"matches {REQUEST_ID_RE.pattern}; otherwise the service makes one",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("PredictBody"), "example": example}},
                    "description": "one reading, a list of readings, or {records, explain}; "
                    f"at most {settings.max_batch} readings and {settings.max_body_bytes} bytes",
                },
            },
        },
        "feedback": {
            "response_class": Response,
            "responses": {
                200: _content(
                    {
                        "type": "object",
                        "properties": {
                            "request_id": {"type": "string"},
                            "recorded": {"type": "integer"},
                            "feedback_ids": {"type": "array", "items": {"type": "string"}},
                        },
                        "required": ["request_id", "recorded", "feedback_ids"],
                    },
                    "the feedback is recorded (flushed to the feedback log)",
                ),
                **_errors(400, 401, 413, 422),
            },
            "openapi_extra": {
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {"oneOf": [obj, {"type": "array", "items": obj}]},
                            "example": [
                                {"request_id": "3f2a...", "record": 0, "label": 1},
                                {"entity": "M0007", "timestamp": "2026-01-04T05:00:00", "label": 0},
                            ],
                        }
                    },
                    "description": "{request_id, record?, label} or {entity, timestamp, "
                    f"label}}; one object or a list of at most {settings.max_batch}",
                },
            },
        },
        "live": {
            "response_class": Response,
            "responses": {200: _content(obj, "the process answers")},
        },
        "ready": {
            "response_class": Response,
            "responses": {
                200: _content(
                    {
                        "type": "object",
                        "properties": {
                            "status": {"const": "ready"},
                            "model_version": {"type": "integer"},
                            "registry": {"type": "string"},
                        },
                        "required": ["status", "model_version", "registry"],
                    },
                    "a champion is loaded",
                ),
                503: _content(
                    {
                        "type": "object",
                        "properties": {
                            "status": {"const": "not_ready"},
                            "reason": {"type": "string"},
                        },
                        "required": ["status", "reason"],
                    },
                    "no champion loaded yet, and why",
                ),
            },
        },
        "model": {
            "response_class": Response,
            "responses": {
                200: _content(obj, "served versions, lineage, refusals, retries"),
                **_errors(401),
            },
        },
        "metrics": {
            "response_class": Response,
            "responses": {
                200: {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_errors(401),
            },
        },
    }


def create_app(settings: ServeSettings) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title=f"{service.spec.name} prediction service",
        description=f"Scores {service.spec.registered_model_name}@{CHAMPION} on live readings.",
        lifespan=lifespan,
        docs_url=None,  # no UI pages: /openapi.json is the machine-readable API
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.service = service
    doc = _openapi_routes(settings, example_reading(service.parser))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schemas(service.parser))
            components.update(response_schemas(service))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.post("/predict", **doc["predict"])
    async def predict(request: Request) -> Response:
        """One reading, a list of readings, or {"records": [...], "explain": bool}."""
        return await service.accept(request.scope, request.receive)

    @app.post("/feedback", **doc["feedback"])
    async def feedback(request: Request) -> Response:
        """Labels for served readings: {request_id, record?, label} or {entity, timestamp,
        label}, one object or a list."""
        given = request.headers.get("x-request-id")
        rid = given if given and REQUEST_ID_RE.match(given) else new_request_id()
        try:
            body = await _read_body(request, settings.max_body_bytes)
        except BadRequest as e:
            return _json(e.status, e.body(rid), rid)
        return await service.run(service.feedback, body, rid)

    @app.get("/health/live", **doc["live"])
    async def live() -> Response:
        """The process is up."""
        return _json(200, {"status": "live", "pid": service.pid})

    @app.get("/health/ready", **doc["ready"])
    async def ready() -> Response:
        """200 once a champion is loaded; 503 with the reason before. A registry that cannot
        be reached does not make a loaded worker unready (it only stops swaps): `registry`
        says so."""
        champion = service.manager.snapshot.champion
        if champion is None:
            return _json(503, {"status": "not_ready", "reason": service.not_ready_reason()})
        error = service.manager.last_poll_error
        registry = "ok" if error is None else f"degraded: {error}; no swap until it answers"
        return _json(
            200,
            {
                "status": "ready",
                "model_version": champion.version,
                "registry": registry,
                "pid": service.pid,
            },
        )

    @app.get("/model", **doc["model"])
    async def model() -> Response:
        """Served versions, aliases, lineage summary from the version's tags, refusals."""
        return _json(200, service.model_info())

    @app.get("/metrics", **doc["metrics"])
    async def metrics() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # The Guard goes around FastAPI's whole middleware stack (its error, telemetry and body
    # limit layers), not inside it: /predict and its refusals skip those layers, 7 % of the
    # event loop's busy time at twice a worker's capacity (py-spy).
    inner = app.build_middleware_stack
    app.build_middleware_stack = lambda: Guard(inner(), service)  # type: ignore[method-assign]
    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory every worker calls: settings from MLOPS_SERVE_SETTINGS."""
    logger = logging.getLogger("mlops")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    bound_registry_requests()  # a poll fails in seconds while the registry is down
    return create_app(ServeSettings.from_env())
