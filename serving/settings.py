"""What one server needs to know, passed to every worker process through one env variable.

`mlops serve` builds a ServeSettings (validated by pydantic: a wrong value fails with the field,
the value and what it must be) and hands it to uvicorn's worker processes as JSON in
MLOPS_SERVE_SETTINGS. That variable is a hand-over between the server and its own workers, not
a setting anyone sets, so it is read here and not through mlops/settings.py.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SETTINGS_ENV = "MLOPS_SERVE_SETTINGS"
TOKEN_ENV = "MLOPS_SERVE_TOKEN"  # read through mlops.settings (serve_token); named in 401s
Mode = Literal["champion", "shadow", "canary", "bandit"]
MODES = ("champion", "shadow", "canary", "bandit")


class ServeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec_path: str
    tracking_uri: str
    store_url: str
    log_dir: str = Field(description="this spec's folder: <base>/<spec>")
    mode: Mode = Field("champion", description="champion, shadow, canary or bandit")
    canary_fraction: float = Field(0.1, ge=0.0, le=1.0)
    # Bandit mode (serving.bandit): Thompson sampling between champion and challenger on the
    # feedback reward; each arm keeps at least bandit_floor of the traffic. The reward of a
    # labelled decision (binary: true/false positive/negative) is in [0, 1]; regression
    # rewards |score - label| <= bandit_tolerance. Posteriors are read from the request log
    # and the feedback files of the last bandit_window_days, every bandit_refresh_s.
    bandit_floor: float = Field(0.05, ge=0.0, le=0.5)
    bandit_reward_tp: float = Field(1.0, ge=0.0, le=1.0)
    bandit_reward_tn: float = Field(1.0, ge=0.0, le=1.0)
    bandit_reward_fp: float = Field(0.0, ge=0.0, le=1.0)
    bandit_reward_fn: float = Field(0.0, ge=0.0, le=1.0)
    bandit_tolerance: float | None = Field(None, gt=0)
    bandit_window_days: int = Field(7, ge=1)
    bandit_refresh_s: float = Field(1.0, gt=0)
    poll_interval_s: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(1_000_000, ge=1)
    max_batch: int = Field(1000, ge=1)
    log_max_bytes: int = Field(128 * 1024 * 1024, ge=1)
    explain_top: int = Field(5, ge=0)
    # A reading more than this far ahead of the server's clock is refused (None: no limit).
    max_future_s: float | None = Field(86_400.0, ge=0)
    # A version that could not be loaded for a transient cause (registry or artifact store
    # unreachable, artifacts missing) is tried again after load_retry_s, doubling up to
    # load_retry_max_s; a version refused for its content is never retried.
    load_retry_s: float = Field(1.0, gt=0)
    load_retry_max_s: float = Field(60.0, gt=0)
    # Per worker: threads that run the requests' work (the event loop never does), and the
    # /predict requests admitted at once (running or waiting for a thread); one more is
    # answered 503 with Retry-After at once. 64: micro-batched, an admitted single reading
    # costs ~0.35 ms of a 2-core machine, so 64 waiting is ~25 ms, and 64 connections
    # (bench/serve.py's c=64) are all admitted.
    threads: int = Field(1, ge=1, le=64)
    max_inflight: int = Field(64, ge=1)
    # Micro-batching (serving.microbatch): /predict requests that wait for a thread are
    # served together as one vectorized batch of at most microbatch_max_size requests; a
    # thread that finds fewer than the last batches held waits up to microbatch_max_wait_ms
    # (from the first one's arrival) for more. microbatch_max_size 1 turns it off: one
    # request at a time. On by default: bench/serve.py, 1 worker on 2 cores, 3.1x the
    # single-row req/s at 8 connections and 4.6x at 64, the same at 1 and at 200 req/s.
    microbatch_max_size: int = Field(32, ge=1, le=1000)
    microbatch_max_wait_ms: float = Field(2.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _retry_order(self) -> ServeSettings:
        if self.load_retry_s > self.load_retry_max_s:
            raise ValueError(
                f"load_retry_s {self.load_retry_s} is more than load_retry_max_s "
                f"{self.load_retry_max_s}: make the first delay at most the longest one"
            )
        return self

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> ServeSettings:
        text = os.environ.get(SETTINGS_ENV)  # the server's hand-over (module docstring)
        if not text:
            raise RuntimeError(
                f"{SETTINGS_ENV} is not set: start the service with `mlops serve --spec ...`"
            )
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise RuntimeError(
                f"{SETTINGS_ENV} does not hold a server's settings ({e}): start the service "
                "with `mlops serve --spec ...`"
            ) from None
