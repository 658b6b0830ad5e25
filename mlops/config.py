"""Where the project keeps things, shared by the CLI, Dagster and the service.

Defaults put everything under .mlops/ in the project root; MLOPS_* variables move each piece
(the production profile points them at real services). The values come from the one settings
model (mlops/settings.py), read at each call.
"""

from __future__ import annotations

from pathlib import Path

from mlops.settings import PROJECT_ROOT, settings

__all__ = [
    "PROJECT_ROOT",
    "lake_url",
    "mlflow_artifact_root",
    "mlflow_tracking_uri",
    "online_store_url",
    "spec_path",
    "specs_dir",
]


def specs_dir() -> Path:
    return settings().specs_dir


def lake_url() -> str:
    return settings().lake_url


def mlflow_tracking_uri() -> str:
    return settings().mlflow_tracking_uri


def mlflow_artifact_root() -> str:
    return settings().mlflow_artifact_root


def spec_path(name_or_path: str) -> Path:
    """`machine_failure` or `specs/machine_failure.yaml` -> the spec file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return specs_dir() / f"{name_or_path}.yaml"


def online_store_url() -> str:
    return settings().online_store_url
