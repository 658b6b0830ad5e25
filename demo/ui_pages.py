"""The two UIs in a real browser: `dagster dev` and `mlflow ui` on loopback, headless Chromium
rendering their pages. Shared by the browser test (tests/test_ui_browser.py), which asserts
what a user must see on each page, and `make screenshots`, which photographs the same pages
after `make demo` for the README (docs/ui/).

    .venv/bin/python -m demo.ui_pages --out docs/ui      # what `make screenshots` runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlops.config import PROJECT_ROOT

BIN = Path(sys.executable).parent
# Loopback only, never through a proxy.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LOCATION_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-proxy-server",
    # Nothing but the servers on 127.0.0.1: every other host name fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    # The asset graph zooms to fit the window and draws name-only boxes below 0.6 (the UI's
    # MINIMAL_SCALE); a large window keeps full nodes for a spec's graph of up to ~15 columns.
    "--window-size=4000,2400",
    # Virtual time waits for pending fetches, so the SPAs' API answers are rendered.
    "--virtual-time-budget=30000",
]
SCREEN = "--window-size=1600,1000"  # what a user's window shows, for the screenshots


class UiError(RuntimeError):
    """A server did not come up, or the browser failed: the message says which, with its log."""


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Browser:
    """Headless Chromium with its own profile folder."""

    executable: str
    profile: Path

    def _run(self, *args: str, flags: list[str] | None = None) -> str:
        out = subprocess.run(
            [self.executable, *(flags or CHROMIUM_FLAGS), f"--user-data-dir={self.profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise UiError(f"chromium exited with {out.returncode}: {out.stderr[-2000:]}")
        return out.stdout

    def dom(self, url: str) -> str:
        """The page's DOM once the SPA has rendered its data."""
        return self._run("--dump-dom", url)

    def screenshot(self, url: str, png: Path, large: bool = False) -> Path:
        flags = CHROMIUM_FLAGS if large else [f for f in CHROMIUM_FLAGS if "window-size" not in f]
        self._run(f"--screenshot={png}", url, flags=flags + ([] if large else [SCREEN]))
        return png


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with HTTP.open(request, timeout=30) as response:
        return json.load(response)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM lets a server stop its children; a process group still there after 20 s is
    killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def _server(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        proc = subprocess.Popen(
            args,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        _stop(proc)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else ""


@contextlib.contextmanager
def dagster_dev(
    env: dict[str, str], log: Path, timeout: float = 120, port: int | None = None
) -> Iterator[str]:
    """`dagster dev` over workspace.yaml with `env` (DAGSTER_HOME, MLOPS_*), until its code
    location has loaded; yields the UI's base URL."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    args = [str(BIN / "dagster"), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml")]
    with _server([*args, "-h", "127.0.0.1", "-p", str(port)], env, log) as proc:
        deadline = time.monotonic() + timeout
        status = "no answer from the webserver"
        while True:
            if proc.poll() is not None:
                raise UiError(f"dagster dev exited with {proc.returncode}:\n{_tail(log)}")
            try:
                entries = graphql(base, LOCATION_QUERY)["data"]["workspaceOrError"]
                entries = entries["locationEntries"]
                status = json.dumps(entries)
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    for e in entries:
                        error = e["locationOrLoadError"] or {}
                        if error.get("__typename") == "PythonError":
                            raise UiError(f"code location {e['name']}: {error['message']}")
                    break
            except (OSError, KeyError, TypeError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise UiError(
                    f"no loaded code location in {timeout:.0f}s ({status}):\n{_tail(log)}"
                )
            time.sleep(0.5)
        # The first visit to an instance opens a "Join the Dagster community" dialog over every
        # page; dismiss it as a user's first click would (DAGSTER_HOME/.nux/nux.yaml).
        graphql(base, "mutation { setNuxSeen }")
        yield base


@contextlib.contextmanager
def mlflow_ui(
    tracking_uri: str, artifacts: str, log: Path, timeout: float = 90, port: int | None = None
) -> Iterator[str]:
    """`mlflow ui` over the platform's tracking store; yields its base URL."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    args = [str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking_uri]
    args += ["--default-artifact-root", artifacts, "--host", "127.0.0.1", "--port", str(port)]
    with _server([*args, "--workers", "1"], dict(os.environ), log) as proc:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise UiError(f"mlflow ui exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(OSError), HTTP.open(f"{base}/health", timeout=2):
                break
            if time.monotonic() > deadline:
                raise UiError(f"mlflow ui did not answer in {timeout:.0f}s:\n{_tail(log)}")
            time.sleep(0.5)
        yield base


# --- the pages a user looks at -------------------------------------------------------------

SENSORS_QUERY = """{ repositoryOrError(repositorySelector: {repositoryLocationName: "mlops",
  repositoryName: "__repository__"}) { ... on Repository { sensors { name } } } }"""


def asset_url(base: str, spec: str, asset: str) -> str:
    return f"{base}/assets/{spec}/{asset}"


def job_runs_url(base: str, job: str, location: str = "mlops") -> str:
    return f"{base}/locations/{location}/jobs/{job}/runs"


def sensor_url(base: str, sensor: str, location: str = "mlops") -> str:
    return f"{base}/locations/{location}/sensors/{sensor}"


def timeline_url(base: str) -> str:
    return f"{base}/overview/activity/timeline"


def model_version_url(base: str, model: str, version: int) -> str:
    return f"{base}/#/models/{model}/versions/{version}"


def screenshots(out: Path, spec_name: str = "machine_failure") -> list[Path]:
    """The pages of README's tour, after `make demo`, as PNGs under `out`."""
    from catalog.jobs import data_job_name
    from mlops import config, registry
    from mlops.spec import load_spec

    browser_exe = find_chromium()
    if browser_exe is None:
        raise UiError("chromium not found: install Debian's chromium package")
    spec = load_spec(config.spec_path(spec_name))
    home = Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / ".mlops" / "dagster")
    if not (home / "history").exists():
        raise UiError(f"no Dagster history in {home}: run `make demo` first")
    champion = registry.alias_version(
        config.mlflow_tracking_uri(), spec.registered_model_name, registry.CHAMPION
    )
    if champion is None:
        raise UiError(f"{spec.registered_model_name} has no champion: run `make demo` first")
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="mlops-screenshots-"))
    browser = Browser(browser_exe, logs / "chromium")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    shots: list[Path] = []
    with dagster_dev(env, logs / "dagster_dev.log") as base:
        sensors = graphql(base, SENSORS_QUERY)["data"]["repositoryOrError"]["sensors"]
        drift = next(s["name"] for s in sensors if s["name"].startswith(f"{spec.name}_drift"))
        pages = {
            "overview_timeline": timeline_url(base),
            "job_runs": job_runs_url(base, data_job_name(spec)),
            "drift_sensor": sensor_url(base, drift),
            "champion_model": asset_url(base, spec.name, "champion_model"),
            "model_evaluation": asset_url(base, spec.name, "model_evaluation"),
        }
        for name, url in pages.items():
            shots.append(browser.screenshot(url, out / f"{name}.png"))
    with mlflow_ui(
        config.mlflow_tracking_uri(), config.mlflow_artifact_root(), logs / "mlflow.log"
    ) as base:
        url = model_version_url(base, spec.registered_model_name, champion)
        shots.append(browser.screenshot(url, out / "mlflow_model_version.png"))
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "ui")
    p.add_argument("--spec", default="machine_failure")
    args = p.parse_args(argv)
    try:
        for png in screenshots(args.out, args.spec):
            print(png)
    except UiError as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
