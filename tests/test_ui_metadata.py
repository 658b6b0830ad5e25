"""What the two UIs show of the loop, checked where it is built: asset attributes (owners,
lifecycle stage), gate check descriptions, the Markdown tables, the links between the Dagster
and the MLflow UI, rounded numeric metadata and the backtest's timeline plot. The model half's
metadata and tags on a real registry are in tests/test_model_lifecycle.py."""

from __future__ import annotations

import math

import dagster as dg
import polars as pl
import pytest

from assets.metadata import STAGES, column_schema, md_table, rounded
from assets.model import GATE_CHECKS, build_model_assets
from mlops import links, timeline
from mlops.settings import Settings
from mlops.spec import SpecError, load_spec
from resources.mlflow import MlflowResource
from tests.conftest import REPO

SPEC = REPO / "specs" / "machine_failure.yaml"
MLFLOW_UI = "http://mlflow.example:5000"


@pytest.fixture(scope="module")
def defs() -> dg.Definitions:
    from orchestration.definitions import build_definitions

    return build_definitions(SPEC.parent)


# Tables and numbers ------------------------------------------------------------------------------


def test_md_table_shows_every_row_it_is_asked_for():
    df = pl.DataFrame(
        {"name": [f"c{i:02d}" for i in range(12)], "score": [i / 7 for i in range(12)]}
    )
    text = md_table(df, 12).value
    body = [line for line in text.splitlines() if line.startswith("| c")]
    assert [line.split("|")[1].strip() for line in body] == [f"c{i:02d}" for i in range(12)]
    assert "…" not in text
    assert "0.1429" in text and "0.142857" not in text  # 4 decimals
    assert len([ln for ln in md_table(df, 5).value.splitlines() if ln.startswith("| c")]) == 5


def test_rounded_keeps_numbers_numeric():
    assert rounded(0.123456789) == 0.1235 and isinstance(rounded(0.123456789), float)
    assert rounded(None) is None and math.isnan(rounded(float("nan")))
    assert rounded(3) == 3.0


def test_column_schema_lists_the_table_columns_and_types():
    df = pl.DataFrame({"machine_id": ["m1"], "temperature": [1.5], "n": [3]})
    schema = column_schema(df)["dagster/column_schema"]
    assert isinstance(schema, dg.TableSchema)
    assert [(c.name, c.type) for c in schema.columns] == [
        ("machine_id", "String"),
        ("temperature", "Float64"),
        ("n", "Int64"),
    ]


# Definitions: owners, stages, check descriptions -------------------------------------------------


def test_every_asset_has_the_specs_owners_and_its_lifecycle_stage(defs):
    spec = load_spec(SPEC)
    graph = defs.resolve_asset_graph()
    seen = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners == spec.owners == ["team:ml-platform"], key
        seen[key.path[-1]] = node.tags.get("stage")
    assert seen == {a: STAGES[a] for a in seen}
    assert set(seen.values()) == {"data", "features", "model", "serving", "monitoring"}
    assert seen["drift_report"] == "monitoring" and seen["champion_model"] == "model"


def test_owners_come_from_the_spec_and_must_be_an_email_or_a_team(tmp_path):
    text = SPEC.read_text().replace(
        "description:", "owners: [ana@example.com, 'team:fleet ml']\ndescription:", 1
    )
    (tmp_path / "machine_failure.yaml").write_text(text)
    spec = load_spec(tmp_path / "machine_failure.yaml")
    assert spec.owners == ["ana@example.com", "team:fleet ml"]
    assets = build_model_assets(spec)
    champion = next(a for a in assets if isinstance(a, dg.AssetsDefinition) and not isinstance(a, dg.AssetChecksDefinition) and a.key.path[-1] == "champion_model")  # fmt: skip
    assert champion.specs_by_key[champion.key].owners == ["ana@example.com", "team:fleet ml"]
    (tmp_path / "machine_failure.yaml").write_text(text.replace("ana@example.com", "ana"))
    with pytest.raises(SpecError, match="owners"):
        load_spec(tmp_path / "machine_failure.yaml")


def test_gate_checks_have_a_description(defs):
    specs = {
        s.name: s
        for d in build_model_assets(load_spec(SPEC))
        if isinstance(d, dg.AssetChecksDefinition)
        for s in d.check_specs
    }
    assert set(specs) == set(GATE_CHECKS.values())
    for name, s in specs.items():
        assert s.description and s.description.startswith("Promotion gate"), name
        assert s.blocking
    assert "gates.min_improvement" in specs["improvement_gate_check"].description
    assert "latency_budget_ms" in specs["serving_smoke_gate_check"].description


# Links between the UIs ---------------------------------------------------------------------------


def test_links_point_at_the_mlflow_and_dagster_pages():
    assert (
        links.mlflow_run_url(MLFLOW_UI + "/", "abc", "7") == f"{MLFLOW_UI}/#/experiments/7/runs/abc"
    )
    assert links.mlflow_run_url(MLFLOW_UI, "abc") == f"{MLFLOW_UI}/#/runs/abc"
    assert (
        links.mlflow_artifact_url(MLFLOW_UI, "7", "abc", "/evaluation/evidently_report.html")
        == f"{MLFLOW_UI}/#/experiments/7/runs/abc/artifacts/evaluation/evidently_report.html"
    )
    assert (
        links.mlflow_model_version_url(MLFLOW_UI, "machine failure", 3)
        == f"{MLFLOW_UI}/#/models/machine%20failure/versions/3"
    )
    assert links.dagster_run_url("http://dagster:3000/", "r1") == "http://dagster:3000/runs/r1"
    assert links.dagster_run_url("", "r1") == ""


def test_the_resource_gives_url_metadata_when_a_ui_is_configured():
    on = MlflowResource(tracking_uri="sqlite:///x", artifact_root="/a", ui_url=MLFLOW_UI)
    off = MlflowResource(tracking_uri="sqlite:///x", artifact_root="/a")
    assert isinstance(on.run_link("abc", "7"), dg.UrlMetadataValue)
    assert on.run_link("abc", "7").value == f"{MLFLOW_UI}/#/experiments/7/runs/abc"
    assert on.model_version_link("m", 2).value == f"{MLFLOW_UI}/#/models/m/versions/2"
    assert isinstance(off.run_link("abc"), dg.TextMetadataValue)
    assert off.artifact_link("7", "abc", "evaluation/x.html").value == "runs:/abc/evaluation/x.html"


def test_the_dagster_ui_url_defaults_to_the_host_and_port(monkeypatch):
    for name in ("MLOPS_DAGSTER_UI_URL", "MLOPS_DAGSTER_UI_PORT", "MLOPS_DAGSTER_UI_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().dagster_url == "http://127.0.0.1:3000"
    assert Settings(dagster_ui_port=3030).dagster_url == "http://127.0.0.1:3030"
    assert Settings(dagster_ui_url="https://dagster.corp/").dagster_url == "https://dagster.corp"


def test_definitions_wire_both_ui_addresses(monkeypatch):
    from orchestration.definitions import build_definitions

    monkeypatch.setenv("MLOPS_MLFLOW_UI_URL", MLFLOW_UI)
    monkeypatch.setenv("MLOPS_DAGSTER_UI_URL", "https://dagster.corp")
    res = build_definitions(SPEC.parent).resources["mlflow"]
    assert (res.ui_url, res.dagster_ui_url) == (MLFLOW_UI, "https://dagster.corp")
    assert res.dagster_run_url("r1") == "https://dagster.corp/runs/r1"


# The timeline plot -------------------------------------------------------------------------------


def _row(n: int, **kw) -> dict:
    day = f"2026-02-{n:02d}"
    row = {
        "n": n,
        "day": day,
        "drift_share": 0.1,
        "drifted": False,
        "champion": 1,
        "realized": None,
        "realized_day": None,
        "metric": "roc_auc",
        "events": [],
        "retrainings": [],
    }
    row.update(kw)
    return row


def test_the_timeline_labels_retrainings_by_trigger_and_draws_the_decline_threshold():
    spec = load_spec(SPEC)
    tol = spec.monitoring.metric_decline_tolerance
    rows = [
        _row(1),
        _row(3, realized=0.90, realized_day="2026-02-01", baseline=0.91),
        _row(4, realized=0.80, realized_day="2026-02-02", baseline=0.91),
        _row(
            5,
            realized=0.78,
            realized_day="2026-02-03",
            baseline=0.91,
            retrainings=[
                {"trigger": "metric_decline", "attempt": 1, "version": 2, "outcome": "refused"}
            ],
        ),
        _row(
            6,
            realized=0.92,
            realized_day="2026-02-04",
            baseline=0.93,
            champion=3,
            retrainings=[
                {"trigger": "drift_retrain", "attempt": 2, "version": 3, "outcome": "promoted"}
            ],
        ),
    ]
    fig = timeline.timeline_figure(spec, rows)
    try:
        ax1, ax2, _ = fig.axes
        texts = [t.get_text() for t in ax1.texts]
        assert "metric_decline\nv2 refused" in texts
        assert "drift_retrain (retry 1)\nv3 promoted" in texts
        (limit,) = [ln for ln in ax2.lines if ln.get_label() == timeline.THRESHOLD_LABEL]
        assert list(limit.get_xdata()) == [1, 2, 3, 4]  # at each labelled day
        expected = [0.91 - tol] * 3 + [0.93 - tol]
        assert list(limit.get_ydata()) == pytest.approx(expected)
        legend = [t.get_text() for t in ax2.get_legend().get_texts()]
        assert timeline.THRESHOLD_LABEL in legend
        colors = {ln.get_color() for ln in ax1.lines if list(ln.get_xdata()) in ([5, 5], [6, 6])}
        assert colors == {"tab:orange", "tab:green"}
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_the_decline_threshold_is_above_the_baseline_for_error_metrics():
    from mlops.monitoring import decline_threshold

    assert decline_threshold("rmse", 2.0, 0.5) == 2.5
    assert decline_threshold("roc_auc", 0.9, 0.05) == pytest.approx(0.85)
    assert decline_threshold("roc_auc", None, 0.05) is None


def test_the_timeline_png_is_written(tmp_path):
    spec = load_spec(SPEC)
    rows = [_row(1), _row(2, realized=0.9, realized_day="2026-02-01", baseline=0.9)]
    out = timeline.write_timeline(spec, rows, tmp_path / "t" / "timeline.png", marker=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
