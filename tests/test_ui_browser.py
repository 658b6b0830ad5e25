"""The Dagster UI in a real browser: `dagster dev` on loopback serves a temporary project
whose runs were started as `make demo` starts them (the new-data sensor's tick, replayed), and
headless Chromium renders the pages a user opens: the spec's asset graph, the Overview
timeline, the job's runs and the sensor's ticks. The servers and the browser are
demo/ui_pages.py's, which `make screenshots` drives over the same pages."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import pytest

from catalog.jobs import data_job_name
from demo.ui_pages import (
    Browser,
    UiError,
    asset_url,
    dagster_dev,
    graphql,
    job_runs_url,
    sensor_url,
    timeline_url,
)
from orchestration.replay import Replay, backdate
from sensors.new_data import new_data_sensor_name
from tests.conftest import Project, make_project, require_chromium, small_data

DAYS = ("2026-01-01", "2026-01-02")
TICKS_QUERY = """query($sensor: String!) { sensorOrError(sensorSelector: {
  repositoryLocationName: "mlops", repositoryName: "__repository__", sensorName: $sensor }) {
  __typename ... on Sensor { sensorState { ticks(limit: 10) { status runIds } } } } }"""


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


def dev_env(p: Project, home: Path) -> dict[str, str]:
    """Point the code location in workspace.yaml at the temporary project."""
    import os

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

    browser = Browser(browser, tmp_path / "chromium-profile")
    job, sensor = data_job_name(p.spec), new_data_sensor_name(p.spec)
    try:
        with dagster_dev(dev_env(p, home), tmp_path / "dagster_dev.log") as base:
            url = f"{base}/locations/mlops/asset-groups/{p.spec.name}"
            expected = {k.path[-1] for k in keys}
            # Render again (for up to 45 s) if a dump caught the page before its live data.
            deadline = time.monotonic() + 45
            while True:
                dom = browser.dom(url)
                nodes = parse_graph(dom)
                rendered = set(nodes) == expected and all(
                    any(f"/runs/{last_run}" in link for link in nodes[k.path[-1]][1])
                    for k in materialized
                )
                minimal = bool(nodes) and all(len(texts) == 1 for texts, _ in nodes.values())
                if rendered or minimal or time.monotonic() > deadline:
                    break
            (tmp_path / "asset_graph.html").write_text(dom)
            browser.screenshot(url, tmp_path / "asset_graph.png", large=True)
            # The job's runs and the sensor's ticks, where Dagster's own views list them.
            pages = {
                "timeline": browser.dom(timeline_url(base)),
                "job_runs": browser.dom(job_runs_url(base, job)),
                "sensor": browser.dom(sensor_url(base, sensor)),
                "features": browser.dom(asset_url(base, p.spec.name, "features")),
            }
            ticks = graphql(base, TICKS_QUERY, {"sensor": sensor})["data"]["sensorOrError"]
    except UiError as e:
        pytest.fail(str(e))
    for name, dom in pages.items():
        (tmp_path / f"{name}.html").write_text(dom)
    timeline, job_runs, sensor_page = pages["timeline"], pages["job_runs"], pages["sensor"]

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
