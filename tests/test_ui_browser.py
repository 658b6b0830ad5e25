"""The Dagster UI in a real browser: `dagster dev` on loopback serves a temporary project
whose runs were started as `make demo` starts them (the new-data sensor's tick, replayed), and
headless Chromium renders the pages a user opens: the spec's asset graph, the Overview
timeline, the job's runs and the sensor's ticks. The servers and the browser are
demo/ui_pages.py's, which `make screenshots` drives over the same pages."""

from __future__ import annotations

import html
import re
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


def test_a_refused_challenger_shows_as_refused_in_both_uis(tmp_path, monkeypatch):
    """v1 becomes champion; v2, trained again on the same days, cannot improve on it and is
    refused. The champion's page shows the refusal while v1 serves, not a failed asset; the
    evaluation page links to the MLflow run, and the link opens it; MLflow's page of v2 shows
    the gate outcome and links back to the Dagster run, and that link opens it."""
    import datetime as dt

    from catalog.jobs import training_job_name
    from demo.ui_pages import free_port, mlflow_ui, model_version_url
    from mlops import registry
    from mlops.monitoring import RetrainDecision
    from tests.conftest import QUICK_TRAINING, embedded_spec_text

    exe = require_chromium()
    # Each UI's address is known before the runs, which record links to the other UI.
    dagster_port, mlflow_port = free_port(), free_port()
    dagster_base, mlflow_base = (f"http://127.0.0.1:{n}" for n in (dagster_port, mlflow_port))
    monkeypatch.setenv("MLOPS_DAGSTER_UI_URL", dagster_base)
    monkeypatch.setenv("MLOPS_MLFLOW_UI_URL", mlflow_base)
    text = embedded_spec_text(*QUICK_TRAINING)
    p = make_project(tmp_path, text, with_mlflow=True)
    spec = p.spec
    small_data(p, days=8, machines=24)
    for folder in (spec.landing_dir, spec.resolve(spec.labels.events.path)):
        backdate(folder.iterdir(), spec.source.settle_seconds)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    last = (spec.source.start_date + dt.timedelta(days=4)).isoformat()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        replay = Replay(spec, p.defs, instance, p.lake, p.tracking_uri, feeds=[])
        assert all(r.success for r in replay.ingest_round())
        first = RetrainDecision("initial", True, last, None, "first champion", {})
        runs = [replay.run_job(training_job_name(spec), tags=first.tags(spec)) for _ in "ab"]
    assert all(r.success for r in runs), [r.error for r in runs]
    model = spec.registered_model_name
    assert registry.alias_version(p.tracking_uri, model, registry.CHAMPION) == 1
    refused = runs[1]
    assert refused.metadata["champion_model"]["promoted"] is False
    mlflow_run = refused.metadata["model_evaluation"]["mlflow_run_id"]

    browser = Browser(exe, tmp_path / "chromium-profile")
    artifacts = str(p.root / ".mlops" / "mlartifacts")
    try:
        with (
            mlflow_ui(p.tracking_uri, artifacts, tmp_path / "mlflow.log", port=mlflow_port),
            dagster_dev(dev_env(p, home), tmp_path / "dagster.log", port=dagster_port) as base,
        ):
            pages = {
                "champion": browser.dom(asset_url(base, spec.name, "champion_model")),
                "evaluation": browser.dom(asset_url(base, spec.name, "model_evaluation")),
                "mlflow_v2": browser.dom(model_version_url(mlflow_base, model, 2)),
            }
            # Follow each UI's link to the other, as a user clicks it.
            to_mlflow = next(
                link
                for link in re.findall(r'href="([^"]+)"', pages["evaluation"])
                if link.startswith(mlflow_base) and link.endswith(f"/runs/{mlflow_run}")
            )
            pages["mlflow_run"] = browser.dom(html.unescape(to_mlflow))
            to_dagster = f"{dagster_base}/runs/{refused.run_id}"
            assert f'href="{to_dagster}"' in pages["mlflow_v2"], "no link to the Dagster run"
            pages["dagster_run"] = browser.dom(to_dagster)
    except UiError as e:
        pytest.fail(str(e))
    for name, dom in pages.items():
        (tmp_path / f"{name}.html").write_text(dom)
    where = f"(pages in {tmp_path})"
    champion, v2 = text_of(pages["champion"]), text_of(pages["mlflow_v2"])
    # A refusal is an outcome: recorded on the champion's page, v1 still serving.
    assert "refused 1 2 improvement:" in champion, where
    # Metadata rows read "<key> <when> <value>".
    when = r"[A-Z][a-z]{2} \d+, [\d:]+ [AP]M"
    assert re.search(rf"promoted {when} false", champion), where
    assert re.search(rf"champion_version {when} 1 ", champion), where
    assert "Failed" not in champion, where
    # MLflow's version page: the gate outcome, and the way back to Dagster.
    assert "Refused by the promotion gate" in v2 and "improvement FAILED" in v2, where
    # The links open the pages they name.
    assert "initial" in text_of(pages["mlflow_run"]), where
    assert refused.run_id[:8] in text_of(pages["dagster_run"]), where


def text_of(dom: str) -> str:
    """A page's visible text, one space between words."""
    dom = re.sub(r"<style.*?</style>|<script.*?</script>", "", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
