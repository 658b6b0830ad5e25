"""Where the project keeps things, shared by the CLI, Dagster and the service.

Defaults put everything under .mlops/ in the project root; environment variables move each
piece (the production profile points them at real services).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def specs_dir() -> Path:
    return Path(os.environ.get("MLOPS_SPECS_DIR", PROJECT_ROOT / "specs"))


def lake_url() -> str:
    return os.environ.get("MLOPS_LAKE_URL", str(PROJECT_ROOT / ".mlops" / "lake"))


def mlflow_tracking_uri() -> str:
    default = f"sqlite:///{PROJECT_ROOT / '.mlops' / 'mlflow.db'}"
    return os.environ.get("MLOPS_MLFLOW_TRACKING_URI", default)


def mlflow_artifact_root() -> str:
    return os.environ.get(
        "MLOPS_MLFLOW_ARTIFACT_ROOT", str(PROJECT_ROOT / ".mlops" / "mlartifacts")
    )


def spec_path(name_or_path: str) -> Path:
    """`machine_failure` or `specs/machine_failure.yaml` -> the spec file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return specs_dir() / f"{name_or_path}.yaml"


def online_store_url() -> str:
    default = f"sqlite:///{PROJECT_ROOT / '.mlops' / 'online.db'}"
    return os.environ.get("MLOPS_ONLINE_STORE_URL", default)
