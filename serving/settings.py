"""What one server needs to know, passed to every worker process through one env variable."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Literal

SETTINGS_ENV = "MLOPS_SERVE_SETTINGS"
TOKEN_ENV = "MLOPS_SERVE_TOKEN"
Mode = Literal["champion", "shadow", "canary"]
MODES = ("champion", "shadow", "canary")


@dataclass(frozen=True)
class ServeSettings:
    spec_path: str
    tracking_uri: str
    store_url: str
    log_dir: str  # this spec's folder: <base>/<spec>
    mode: Mode = "champion"
    canary_fraction: float = 0.1
    poll_interval_s: float = 10.0
    max_body_bytes: int = 1_000_000
    max_batch: int = 1000
    log_max_bytes: int = 128 * 1024 * 1024
    explain_top: int = 5
    # A reading more than this far ahead of the server's clock is refused (None: no limit).
    max_future_s: float | None = 86_400.0
    # A version that could not be loaded for a transient cause (registry or artifact store
    # unreachable, artifacts missing) is tried again after load_retry_s, doubling up to
    # load_retry_max_s; a version refused for its content is never retried.
    load_retry_s: float = 1.0
    load_retry_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not 0.0 <= self.canary_fraction <= 1.0:
            raise ValueError(f"canary_fraction {self.canary_fraction}: must be in [0, 1]")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        if self.max_body_bytes < 1 or self.max_batch < 1:
            raise ValueError("max_body_bytes and max_batch must be at least 1")
        if self.max_future_s is not None and self.max_future_s < 0:
            raise ValueError("max_future_s must be at least 0 (or None for no limit)")
        if not 0 < self.load_retry_s <= self.load_retry_max_s:
            raise ValueError("load_retry_s must be positive and at most load_retry_max_s")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise RuntimeError(
                f"{SETTINGS_ENV} is not set: start the service with `mlops serve --spec ...`"
            )
        return cls(**json.loads(text))
