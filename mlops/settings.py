"""The platform's settings: every MLOPS_* variable, in one pydantic-settings model.

`settings()` reads the environment each time it is called (a fresh model, about a tenth of a
millisecond), so a value set between two calls (a test's monkeypatch, the backtest's isolated
state) is seen by the next one. An empty variable counts as unset. A wrong value fails with the
variable's name, the value and what to use (`SettingsError`, a ValueError).

The production profile passes its env file (deploy/prod.env or deploy/prod.env.example) as
`env_file`; without one nothing but the environment is read (every Dagster process builds the
code location, which opens no file but the specs).

Not here, on purpose: DAGSTER_HOME (Dagster's own), the server's hand-over to its worker
processes (MLOPS_SERVE_SETTINGS, PROMETHEUS_MULTIPROC_DIR: serving/), the test-only fault hooks
of mlops/training.py, and the `${VAR}` a user writes into a SQL source's URL.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "MLOPS_"
_STATE = PROJECT_ROOT / ".mlops"

Executor = Literal["in_process", "multiprocess", "celery"]
StartMethod = Literal["spawn", "forkserver"]


class SettingsError(ValueError):
    """One or more MLOPS_* variables hold a value the platform cannot use."""


class Settings(BaseSettings):
    """Every MLOPS_* variable the platform reads; the field `x` is the variable MLOPS_X."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        extra="ignore",  # an env file's other lines (DAGSTER_HOME, AWS_*): see unknown()
        frozen=True,
    )

    # --- where things live (defaults: under .mlops/ in the project root) ---------------------
    specs_dir: Path = Field(
        PROJECT_ROOT / "specs",
        description="Folder of the spec YAML files the code location builds (one graph each).",
    )
    lake_url: str = Field(
        str(_STATE / "lake"),
        description="Base of the lake: a folder or any fsspec URL (s3://bucket/lake).",
    )
    mlflow_tracking_uri: str = Field(
        f"sqlite:///{_STATE / 'mlflow.db'}",
        description="MLflow tracking and registry URI: a sqlite:/// file or the server's URL.",
    )
    mlflow_artifact_root: str = Field(
        str(_STATE / "mlartifacts"),
        description="Artifact root of the experiments the platform creates "
        "(mlflow-artifacts:/// when a tracking server serves them).",
    )
    mlflow_ui_url: str = Field(
        "http://127.0.0.1:5000",
        description="Where people open the MLflow UI: links in asset metadata and the demo.",
    )
    online_store_url: str = Field(
        f"sqlite:///{_STATE / 'online.db'}",
        description="Online feature store: sqlite:///file or redis://host:6379/0.",
    )
    optuna_storage: str | None = Field(
        None,
        description="SQLAlchemy URL of a shared Optuna storage; unset: trials in memory.",
    )
    inference_log_dir: Path = Field(
        _STATE / "inference_log",
        description="Base folder of the service's request logs (<base>/<spec>/), which the "
        "inference_log asset ingests.",
    )

    # --- how steps execute (orchestration/executors.py) --------------------------------------
    executor: Executor = Field(
        "in_process",
        description="Step executor of every job: in_process (every step in the run's "
        "process), multiprocess (a process per step) or celery (dagster-celery workers).",
    )
    multiprocess_start_method: StartMethod = Field(
        "spawn",
        description="With executor=multiprocess: spawn (a fresh interpreter per step) or "
        "forkserver (steps fork from a process that imported the code once per run).",
    )
    celery_broker: str = Field(
        "redis://127.0.0.1:6379/1", description="Celery broker URL (redis:// or amqp://)."
    )
    celery_backend: str = Field(
        "redis://127.0.0.1:6379/2", description="Celery result backend URL."
    )
    celery_key_prefix: str = Field(
        "",
        description="Prefix of every broker key, so deployments (or test runs) can share a "
        "Redis; workers must use the same one.",
    )
    celery_poll_seconds: float = Field(
        0.2, gt=0, le=10, description="How often a run checks its celery steps' results."
    )
    celery_workers: int = Field(
        2, ge=1, description="Production profile: celery workers `make prod-up` starts here."
    )

    # --- people and alerts -------------------------------------------------------------------
    alert_webhook_url: str = Field(
        "", description="URL that failed-run alerts are POSTed to as JSON; empty: log only."
    )
    dagster_ui_host: str = Field("127.0.0.1", description="Host of the Dagster UI.")
    dagster_ui_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the Dagster UI; unset: `make ui`'s 3000 (the demo says so).",
    )
    dagster_ui_url: str | None = Field(
        None,
        description="Where people open the Dagster UI: the Dagster run link tagged on every "
        "MLflow run and model version; unset: http://<MLOPS_DAGSTER_UI_HOST>:"
        "<MLOPS_DAGSTER_UI_PORT, or 3000>.",
    )
    serve_token: SecretStr | None = Field(
        None,
        description="Bearer token the prediction service wants on every endpoint but "
        "/health/*; unset: no authentication.",
    )

    # --- production profile only (deploy/prod.py; deploy/dagster.yaml reads MLOPS_PG_*) -----
    pg_host: str | None = Field(None, description="PostgreSQL host of the Dagster instance.")
    pg_port: int | None = Field(None, ge=1, le=65535, description="Its port.")
    pg_user: str | None = Field(None, description="Its user.")
    pg_password: SecretStr | None = Field(None, description="Its password; unset: none.")
    pg_db: str | None = Field(None, description="The Dagster instance's database.")
    mlflow_backend_uri: str | None = Field(
        None, description="The MLflow server's backend store (a SQLAlchemy URL)."
    )
    mlflow_artifacts_destination: str | None = Field(
        None, description="Where the MLflow server keeps artifacts: a folder or s3://..."
    )
    mlflow_host: str | None = Field(None, description="Host the MLflow server listens on.")
    mlflow_port: int | None = Field(
        None, ge=1, le=65535, description="Port the MLflow server listens on."
    )

    @property
    def dagster_url(self) -> str:
        """The Dagster UI's base URL (dagster_ui_url, else the host and port it listens on)."""
        if self.dagster_ui_url:
            return self.dagster_ui_url.rstrip("/")
        return f"http://{self.dagster_ui_host}:{self.dagster_ui_port or 3000}"

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """`MLOPS_X=` (in a file or the shell) means the default, and wins as a value does."""
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value

    @field_validator("executor", "multiprocess_start_method", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # An env file, when given, wins over the environment: the production profile's
        # processes get the same values whatever the calling shell has set (deploy/prod.py).
        return init_settings, dotenv_settings, env_settings


def variable(field: str) -> str:
    """`celery_poll_seconds` -> `MLOPS_CELERY_POLL_SECONDS`."""
    return f"{PREFIX}{field.upper()}"


HINTS = {
    "executor": "use in_process (the default: every step in the run's process), multiprocess "
    "(a process per step) or celery (with MLOPS_CELERY_BROKER pointing at the broker)",
    "multiprocess_start_method": "use spawn (the default) or forkserver (steps fork from a "
    "process that imported the code once per run)",
    "celery_poll_seconds": "give seconds, more than 0 and at most 10",
}


def settings(env_file: str | Path | None = None) -> Settings:
    """The settings as the environment (and `env_file`, which wins) has them now.

    Built again whenever an MLOPS_* variable (or the file's text) changed since the last call,
    else the same frozen model: a call costs a scan of the environment, not a validation.
    """
    ours = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(PREFIX)))
    stamp = None
    if env_file is not None:
        path = Path(env_file)
        stamp = (str(path), path.read_bytes() if path.exists() else None)  # small: a key
    return _build(ours, stamp)


@lru_cache(maxsize=8)
def _build(_ours: tuple, stamp: tuple | None) -> Settings:
    env_file = stamp[0] if stamp else None
    try:
        return Settings(_env_file=env_file)  # type: ignore[call-arg]
    except ValidationError as e:
        raise SettingsError(_explain(e, env_file)) from None


def unknown(names: Any) -> list[str]:
    """The MLOPS_* names among `names` that are no setting (a typo in an env file)."""
    known = {variable(f) for f in Settings.model_fields}
    return sorted(n for n in names if n.upper().startswith(PREFIX) and n.upper() not in known)


def _explain(error: ValidationError, env_file: str | Path | None) -> str:
    where = f" (environment or {env_file})" if env_file else ""
    lines = []
    for err in error.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        hint = HINTS.get(field) or err["msg"].removeprefix("Value error, ")
        lines.append(f"{variable(field)}={err['input']!r}: {hint}")
    return f"invalid setting{'s' if len(lines) > 1 else ''}{where}: " + "; ".join(lines)
