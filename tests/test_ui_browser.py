"""The Dagster UI in a real browser: `dagster dev` on loopback serves a temporary project,
headless Chromium renders the spec's asset graph, and the rendered nodes show the assets and
the runs that materialized them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import pytest

from catalog.jobs import data_job_name
from orchestration.replay import Replay, backdate
from sensors.new_data import new_data_sensor_name
from tests.conftest import REPO, Project, make_project, require_chromium, small_data

BIN = Path(sys.executable).parent
DAYS = ("2026-01-01", "2026-01-02")
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
    # Nothing but the webserver on 127.0.0.1: every other host name fails to resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    # The graph zooms to fit the window and draws name-only boxes below 0.6 (the UI's
    # MINIMAL_SCALE); a large window keeps full nodes (latest event, partitions) for a spec's
    # graph of up to ~15 columns.
    "--window-size=4000,2400",
    # Virtual time waits for pending fetches, so the SPA's GraphQL answers are rendered.
    "--virtual-time-budget=30000",
]


class GraphNodes(HTMLParser):
    """Text and links of each asset node: the lineage SVG holds one <foreignObject> per node."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[tuple[list[str], list[str]]] = []
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "foreignobject":
            self._depth += 1
            if self._depth == 1:
                self.nodes.append(([], []))
        elif tag == "a" and self._depth:
            self.nodes[-1][1].append(dict(attrs).get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "foreignobject" and self._depth:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth and data.strip():
            self.nodes[-1][0].append(data.strip())


def parse_graph(dom: str) -> dict[str, tuple[list[str], list[str]]]:
    """Asset name (the node's first text) -> (texts, links)."""
    parser = GraphNodes()
    parser.feed(dom)
    return {texts[0]: (texts, links) for texts, links in parser.nodes if texts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dev_env(p: Project, home: Path) -> dict[str, str]:
    """Point the code location in workspace.yaml at the temporary project."""
    mlops = p.root / ".mlops"
    return {
        **os.environ,
        "MLOPS_SPECS_DIR": str(p.root / "specs"),
        "MLOPS_LAKE_URL": str(mlops / "lake"),
        "MLOPS_MLFLOW_TRACKING_URI": p.tracking_uri,
        "MLOPS_MLFLOW_ARTIFACT_ROOT": str(mlops / "mlartifacts"),
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{mlops / 'online.db'}",
        "DAGSTER_HOME": str(home),
    }


def wait_for_location(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    """Until the webserver answers and the code location has loaded (or says why not)."""
    deadline = time.monotonic() + timeout
    status = "no answer from the webserver"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster dev exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with HTTP.open(f"{base}/server_info", timeout=2):
                pass
            request = urllib.request.Request(
                f"{base}/graphql",
                data=json.dumps({"query": LOCATION_QUERY}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with HTTP.open(request, timeout=10) as response:
                answer = json.load(response)
            entries = answer["data"]["workspaceOrError"]["locationEntries"]
            status = json.dumps(entries)
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                for e in entries:
                    error = e["locationOrLoadError"] or {}
                    if error.get("__typename") == "PythonError":
                        pytest.fail(f"code location {e['name']} failed to load: {error['message']}")
                return
        except (OSError, KeyError, TypeError, ValueError):
            pass
        time.sleep(0.5)
    pytest.fail(
        f"dagster dev did not serve a loaded code location in {timeout:.0f}s ({status}):\n"
        f"{log.read_text()[-3000:]}"
    )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM lets dagster dev stop its webserver, daemon and code server; if it has not
    exited after 20 s (SIGTERM is ignored where SIGINT was), its process group is killed."""
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


TICKS_QUERY = """query($sensor: String!) { sensorOrError(sensorSelector: {
  repositoryLocationName: "mlops", repositoryName: "__repository__", sensorName: $sensor }) {
  __typename ... on Sensor { sensorState { ticks(limit: 10) { status runIds } } } } }"""


def graphql(base: str, query: str, variables: dict) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with HTTP.open(request, timeout=30) as response:
        return json.load(response)


def rendered_page(browser: str, profile: Path, url: str) -> str:
    """The page's DOM once the SPA has rendered its data (Chromium's virtual time)."""
    return chromium(browser, profile, "--dump-dom", url)


def chromium(browser: str, profile: Path, *args: str) -> str:
    out = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, f"chromium exited with {out.returncode}: {out.stderr[-2000:]}"
    return out.stdout


def test_asset_graph_in_chromium_shows_the_spec_assets_and_materializations(tmp_path):
    browser = require_chromium()
    p = make_project(tmp_path)
    small_data(p, days=len(DAYS), machines=3)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # The runs go into the instance that `dagster dev` will serve, started as `make demo` and
    # `mlops backtest` start them: the new-data sensor's tick, through orchestration/replay.py.
    backdate(p.spec.landing_dir.iterdir(), p.spec.source.settle_seconds)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        replay = Replay(p.spec, p.defs, instance, p.lake, p.tracking_uri, feeds=[])
        runs = replay._sensor_round(new_data_sensor_name(p.spec))
    assert [r.partition for r in runs] == list(DAYS) and all(r.success for r in runs), runs
    last_run = runs[-1].run_id
    keys = set(p.defs.resolve_all_asset_keys())
    materialized = {k for k in keys if k.path[-1] in runs[-1].metadata}
    assert {k.path[-1] for k in materialized} >= {"raw_data", "validated_data", "features"}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dagster_dev.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [
                str(BIN / "dagster"),
                "dev",
                "-w",
                str(REPO / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO,
            env=dev_env(p, home),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_location(proc, base, log, timeout=90)
        url = f"{base}/locations/mlops/asset-groups/{p.spec.name}"
        profile = tmp_path / "chromium-profile"
        expected = {k.path[-1] for k in keys}
        # Render again (for up to 45 s) if a dump caught the page before its live data.
        deadline = time.monotonic() + 45
        while True:
            dom = chromium(browser, profile, "--dump-dom", url)
            nodes = parse_graph(dom)
            rendered = set(nodes) == expected and all(
                any(f"/runs/{last_run}" in link for link in nodes[k.path[-1]][1])
                for k in materialized
            )
            minimal = bool(nodes) and all(len(texts) == 1 for texts, _ in nodes.values())
            if rendered or minimal or time.monotonic() > deadline:
                break
        (tmp_path / "asset_graph.html").write_text(dom)
        chromium(browser, profile, f"--screenshot={tmp_path / 'asset_graph.png'}", url)
        # The job's runs and the sensor's ticks, where Dagster's own views list them.
        job, sensor = data_job_name(p.spec), new_data_sensor_name(p.spec)
        job_runs = rendered_page(browser, profile, f"{base}/locations/mlops/jobs/{job}/runs")
        ticks = graphql(base, TICKS_QUERY, {"sensor": sensor})["data"]["sensorOrError"]
        sensor_page = rendered_page(browser, profile, f"{base}/locations/mlops/sensors/{sensor}")
        timeline = rendered_page(browser, profile, f"{base}/overview/activity/timeline")
        (tmp_path / "timeline.html").write_text(timeline)
        (tmp_path / "job_runs.html").write_text(job_runs)
        (tmp_path / "sensor.html").write_text(sensor_page)
    finally:
        stop(proc)

    where = f"(pages in {tmp_path})"
    # The Overview timeline has the job's row, not "No runs or scheduled ticks".
    assert job in timeline and "No runs or scheduled ticks" not in timeline, where
    # The job's Runs tab lists each run, launched by the sensor (as the daemon's would be).
    assert "Launched by" in job_runs, where
    for r in runs:
        assert f"/runs/{r.run_id}" in job_runs, (r.run_id, f"not on the job's runs page {where}")
    assert job_runs.count(sensor) >= len(runs), where
    # The sensor's page shows the replay's tick and the runs it requested. (`dagster dev`'s
    # own daemon may tick it too: its requests' run keys have run, so it requests nothing.)
    replayed = [t for t in ticks["sensorState"]["ticks"] if t["status"] == "SUCCESS"]
    assert [sorted(t["runIds"]) for t in replayed] == [sorted(r.run_id for r in runs)], ticks
    assert "Latest tick" in sensor_page and f"{len(runs)} runs requested" in sensor_page, where

    where = f"(DOM and screenshot in {tmp_path})"
    assert not minimal, f"the graph drew name-only nodes: enlarge --window-size {where}"
    assert set(nodes) == expected, f"asset graph nodes {sorted(nodes)} {where}"
    for key in sorted(keys):
        texts, links = nodes[key.path[-1]]
        run_links = [link for link in links if "/runs/" in link]
        if key in materialized:
            # "Latest event" links to the run that materialized it, under the spec's key.
            assert any(f"/runs/{last_run}" in link for link in run_links), (key, links, where)
            assert f"/assets/{'/'.join(key.path)}" in " ".join(links), (key, links, where)
            assert "Never materialized" not in texts, (key, texts, where)
        else:
            assert not run_links, (key, links, where)
    training_set = nodes["training_set"][0]
    assert "Never materialized" in training_set, (training_set, where)
