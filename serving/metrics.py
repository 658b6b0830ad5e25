"""Prometheus metrics of the service.

With several uvicorn workers, `mlops serve` runs prometheus_client in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR set before any worker imports it): every worker writes its
samples to memory-mapped files in that folder and `/metrics`, whichever worker answers,
adds up counters and histograms over all workers. Gauges are reported per live worker
(a `pid` label). Without the variable (one process, e.g. tests) each app has its own
registry.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as mp

disable_created_metrics()  # no *_created series: they double the output and say little

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
ENDPOINTS = frozenset(
    ["/predict", "/model", "/metrics", "/health/live", "/health/ready", "/openapi.json"]
)


def multiprocess_mode() -> bool:
    # prometheus_client's variable, set by serving/server.py for its workers: not a setting.
    return bool(os.environ.get(MULTIPROC_ENV))


class ServingMetrics:
    def __init__(self, task: str):
        self.multiprocess = multiprocess_mode()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mlops_serving_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mlops_serving_request_duration_seconds",
            "Time from the request's arrival at the server (its socket readable) to its "
            "response, by endpoint: what clients wait, queueing for the event loop and for a "
            "thread included; admitted requests only (see mlops_serving_shed).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handler_latency = Histogram(
            "mlops_serving_handler_duration_seconds",
            "Time from when the app starts handling a request (for /predict: when a thread "
            "takes it) to its response, by endpoint: the request's own work, without the "
            "time it queued (compare with mlops_serving_request_duration_seconds).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge(
            "mlops_serving_model_version",
            "Registered model version each alias is served by (per worker).",
            ["alias"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.predictions = Counter(
            "mlops_serving_predictions",
            "Scored records by route, model version and decision.",
            ["route", "model_version", "decision"],
            registry=r,
        )
        self.scores = Histogram(
            "mlops_serving_prediction_score",
            "Distribution of the scores returned or shadowed, by route.",
            ["route"],
            buckets=SCORE_BUCKETS if task == "binary_classification" else Histogram.DEFAULT_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "mlops_serving_rejections",
            "Problems that made the service refuse a request, by reason (missing, extra, type, "
            "not_null, min, max, category, malformed_json, body_too_large, too_many_records, "
            "unknown_entity, stale_state, out_of_order, unauthorized).",
            ["reason"],
            registry=r,
        )
        self.feedback = Counter(
            "mlops_serving_feedback",
            "Field feedback items recorded (POST /feedback), by label.",
            ["label"],
            registry=r,
        )
        self.fallbacks = Counter(
            "mlops_serving_feature_fallbacks",
            "Readings scored without the entity's stored state (reading_only policy), by reason.",
            ["reason"],
            registry=r,
        )
        self.store_unavailable = Counter(
            "mlops_serving_feature_store_unavailable",
            "Requests answered 503 because the online feature store could not be reached.",
            registry=r,
        )
        self.swaps = Counter(
            "mlops_serving_model_swaps",
            "New versions published after a successful load and smoke test, by alias.",
            ["alias"],
            registry=r,
        )
        self.refusals = Counter(
            "mlops_serving_swap_refusals",
            "Versions refused (did not load or score their input example), by alias.",
            ["alias"],
            registry=r,
        )
        self.load_retries = Counter(
            "mlops_serving_model_load_retries",
            "Loads of a version that failed for a transient cause (registry or artifact store "
            "unreachable, artifacts missing) and will be tried again with backoff, by alias.",
            ["alias"],
            registry=r,
        )
        self.shed = Counter(
            "mlops_serving_shed",
            "Requests to /predict answered 503 at once, with Retry-After, because the worker "
            "already had --max-inflight requests in progress (load shed; not in the latency "
            "histograms, not in the request log).",
            registry=r,
        )
        self.inflight = Gauge(
            "mlops_serving_inflight",
            "/predict requests admitted and not yet answered (running or waiting for a "
            "thread), summed over the workers.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.shadow_errors = Counter(
            "mlops_serving_shadow_errors",
            "Records the challenger failed to score in shadow mode (the champion answered).",
            registry=r,
        )
        # Known label values start at 0, so a series exists before its first event.
        for alias in ("champion", "challenger"):
            self.swaps.labels(alias)
            self.refusals.labels(alias)
            self.load_retries.labels(alias)
        for reason in ("unknown_entity", "stale_state", "out_of_order"):
            self.fallbacks.labels(reason)
        self._req: dict[tuple[str, int], Counter] = {}
        self._lat: dict[str, Histogram] = {}
        self._hlat: dict[str, Histogram] = {}

    def observe_request(
        self, path: str, status: int, seconds: float, handler_seconds: float | None = None
    ) -> None:
        """`seconds` since the request arrived; `handler_seconds` since the app began on it
        (the same when the server gives no arrival time)."""
        endpoint = self.count_request(path, status)
        lat = self._lat.get(endpoint)
        if lat is None:
            lat = self._lat[endpoint] = self.latency.labels(endpoint)
        lat.observe(seconds)
        hl = self._hlat.get(endpoint)
        if hl is None:
            hl = self._hlat[endpoint] = self.handler_latency.labels(endpoint)
        hl.observe(seconds if handler_seconds is None else handler_seconds)

    def count_request(self, path: str, status: int) -> str:
        """Count one answered request in requests_total; returns its endpoint label."""
        endpoint = path if path in ENDPOINTS else "other"
        key = (endpoint, status)
        child = self._req.get(key)
        if child is None:
            child = self._req[key] = self.requests.labels(endpoint, str(status))
        child.inc()
        return endpoint

    def render(self) -> bytes:
        if self.multiprocess:
            r = CollectorRegistry()
            mp.MultiProcessCollector(r)
            return generate_latest(r)
        return generate_latest(self.registry)

    @staticmethod
    def worker_exit() -> None:
        """Drop this worker's live gauges (multiprocess mode)."""
        if multiprocess_mode():
            mp.mark_process_dead(os.getpid())
