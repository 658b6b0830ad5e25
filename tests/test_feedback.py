"""Labels from the field: POST /feedback -> label_feedback -> labels -> realized performance,
the feedback sensor, `mlops labels export/import`, and feedback overriding another source."""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from catalog.jobs import labels_job_name
from cli.main import main as cli
from mlops import evaluation, feedback, labels, model_evaluation, modeling, registry, training
from mlops.lake import Lake, read_json
from mlops.spec import SpecError, load_spec
from orchestration.definitions import build_definitions
from orchestration.jobs import QUIET
from resources.clock import ClockResource
from resources.lake import LakeResource
from sensors.feedback import feedback_sensor_name
from serving.app import create_app
from serving.settings import ServeSettings
from tests.conftest import embedded_spec_text
from tests.serving_support import reading, served_world, training_frame, variant, wait

NAME = "machine_failure"
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
DAY = "2026-01-04"  # served only: readings after every machine's state (day 3's end)
AFTER = dt.datetime(2026, 1, 4, 0, 30)
EVENT_LABELS = """labels:
  kind: event_feed
  name: failure_24h
  horizon: 24h
  maturity: 72h            # horizon + the feed's 48 h lateness
  events:
    path: .mlops/landing/machine_failure/events
    format: csv
    file_pattern: "failures_{date}.csv"   # {date} = the day the file arrived
    timestamp_column: failure_time
    entity_column: machine_id
"""
FEEDBACK_LABELS = """labels:
  kind: feedback
  name: failure_24h
  maturity: 0h
"""


@dataclass
class World:
    root: Path
    spec_path: Path
    lake: Lake
    defs: dg.Definitions
    uri: str
    logs: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    served = served_world(tmp_path_factory.mktemp("feedback"))
    root = served.root
    # From here on the project's labels are field feedback only.
    path = root / "specs" / f"{NAME}.yaml"
    path.write_text(embedded_spec_text((EVENT_LABELS, FEEDBACK_LABELS)))
    lake_url = str(root / ".mlops" / "lake")
    defs = build_definitions(
        root / "specs",
        lake_url,
        served.uri,
        str(root / ".mlops" / "mlartifacts"),
        f"sqlite:///{root / '.mlops' / 'online.db'}",
    )
    return World(root, path, Lake(lake_url), defs, served.uri, root / "logs")


def _client(world: World, monkeypatch, log_dir: Path | None = None, **kw: Any) -> TestClient:
    store = world.root / "stores" / f"online-{len(list(world.root.glob('stores/*')))}.db"
    store.parent.mkdir(exist_ok=True)
    shutil.copy(world.root / ".mlops" / "online.db", store)
    s = ServeSettings(
        spec_path=str(world.spec_path),
        tracking_uri=world.uri,
        store_url=f"sqlite:///{store}",
        log_dir=str((log_dir or world.logs) / NAME),
        poll_interval_s=0.2,
        **kw,
    )
    monkeypatch.delenv("MLOPS_SERVE_TOKEN", raising=False)
    client = TestClient(create_app(s), raise_server_exceptions=False)
    client.__enter__()
    wait(lambda: client.get("/health/ready").status_code == 200, 60, "the champion to load")
    return client


@pytest.fixture(scope="module")
def served(world: World) -> dict[str, Any]:
    """Day 4 served through the real app, then labelled through POST /feedback: single
    readings by request id, some by entity and timestamp, one record of a batch, one
    correction, and two that cannot be used (an unknown request, an ambiguous batch)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_INFERENCE_LOG_DIR", str(world.logs))
    client = _client(world, mp)
    try:
        singles = []
        for k in range(10):
            r = reading(
                f"M000{1 + k % 4}", AFTER + dt.timedelta(minutes=7 * k), vibration=1.0 + k / 5
            )
            resp = client.post("/predict", json=r)
            assert resp.status_code == 200, resp.text
            singles.append((r, resp.json()))
        batch_readings = [
            reading(f"M000{1 + k}", AFTER + dt.timedelta(hours=3, minutes=k)) for k in range(3)
        ]
        resp = client.post("/predict", json=batch_readings)
        assert resp.status_code == 200, resp.text
        batch = resp.json()
        truth: dict[tuple[str, str], int] = {}
        items = []
        for k, (r, out) in enumerate(singles[:6]):
            items.append({"request_id": out["request_id"], "label": k % 2})
            truth[(r["machine_id"], r["timestamp"])] = k % 2
        for k, (r, _) in enumerate(singles[6:9]):
            label = bool(k % 2 == 0)
            items.append({"entity": r["machine_id"], "timestamp": r["timestamp"], "label": label})
            truth[(r["machine_id"], r["timestamp"])] = int(label)
        items.append({"request_id": batch["request_id"], "record": 1, "label": "1"})
        truth[(batch_readings[1]["machine_id"], batch_readings[1]["timestamp"])] = 1
        ok = client.post("/feedback", json=items)
        assert ok.status_code == 200, ok.text
        assert ok.json()["recorded"] == len(items)
        # A correction of the first one (newest wins), and two unusable lines.
        first = singles[0]
        fix = client.post("/feedback", json={"request_id": first[1]["request_id"], "label": 1})
        assert fix.status_code == 200
        truth[(first[0]["machine_id"], first[0]["timestamp"])] = 1
        odd = [
            {"request_id": "never-served-1", "label": 0},
            {"request_id": batch["request_id"], "label": 0},  # 3 readings: which one?
        ]
        assert client.post("/feedback", json=odd).status_code == 200
        # Refused outright, all or nothing: nothing of these lands.
        bad = client.post(
            "/feedback",
            json=[
                {"request_id": first[1]["request_id"], "label": 1},
                {"request_id": "x", "label": 2},
                {
                    "request_id": "x",
                    "entity": "M0001",
                    "timestamp": "2026-01-04T00:00:00",
                    "label": 1,
                },
                {"entity": "M0001", "label": 1, "note": "?"},
            ],
        )
        metrics = client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)
        mp.undo()
    return {
        "singles": singles,
        "batch": batch,
        "truth": truth,
        "bad": bad,
        "metrics": metrics,
    }


def test_bad_feedback_is_refused_with_every_field_and_nothing_is_written(world, served):
    bad = served["bad"]
    assert bad.status_code == 422
    detail = bad.json()["detail"]
    got = {(p["record"], p["field"], p["code"]) for p in detail}
    assert (1, "label", "type") in got
    assert (2, "request_id", "form") in got
    assert (3, "note", "extra") in got and (3, "timestamp", "missing") in got
    lines, _ = feedback.read_lines(feedback.log_files(world.logs / NAME, prefix=feedback.PREFIX))
    # 10 good items + 1 correction + 2 odd ones; the refused body's valid first item is not there.
    assert len(lines) == 13
    assert {ln["source"] for ln in lines} == {"api"}
    assert 'mlops_serving_feedback_total{label="1"}' in served["metrics"]


@pytest.fixture(scope="module")
def ingested(world: World, served: dict[str, Any]) -> dg.ExecuteInProcessResult:
    """Day 4's request log into the lake, then the labels job: label_feedback -> labels ->
    model_performance (what the feedback sensor requests)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_INFERENCE_LOG_DIR", str(world.logs))
    try:
        return _ingest(world, DAY, dg.DagsterInstance.ephemeral())
    finally:
        mp.undo()


def _ingest(world: World, day: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    """The day's request log (MLOPS_INFERENCE_LOG_DIR) into the lake, then the labels job."""
    resources = {"lake": LakeResource(base_url=str(world.lake.base_url))}
    log_asset = world.defs.get_assets_def(dg.AssetKey([NAME, "inference_log"]))
    assert dg.materialize(
        [log_asset], partition_key=day, resources=resources, instance=instance
    ).success
    job = world.defs.resolve_job_def(labels_job_name(load_spec(world.spec_path)))
    return job.execute_in_process(partition_key=day, instance=instance, run_config=QUIET)


def test_feedback_round_trips_into_labels_and_realized_performance(world, served, ingested):
    spec = load_spec(world.spec_path)
    assert ingested.success
    truth = served["truth"]
    fed = world.lake.read(NAME, "label_feedback", DAY)
    assert fed.height == len(truth) == 10
    got = {
        (e, t.isoformat()): int(v)
        for e, t, v in fed.select("entity", "event_time", "label").iter_rows()
    }
    assert got == truth
    assert set(fed["source"].to_list()) == {"api"}
    assert fed["model_version"].null_count() == 0  # every labelled reading was served
    rejected = world.lake.read(NAME, "label_feedback_rejected", DAY)
    assert rejected["reason"].to_list() == [
        f"request {served['batch']['request_id']} has 3 readings that day: give 'record'"
    ]
    rows = world.lake.read(NAME, "labels", DAY)
    assert rows.height == 10 and rows[labels.MATURE].all()
    # Realized performance: what was served against what the technicians said.
    doc = read_json(world.lake, NAME, "model_performance", DAY)
    assert doc["source"] == "served" and doc["rows_labelled"] == 10
    scores = {}
    for r, out in served["singles"]:
        scores[(r["machine_id"], r["timestamp"])] = out["predictions"][0]["score"]
    b = served["batch"]["predictions"][1]
    scores[(b["entity"], b["timestamp"])] = b["score"]
    keys = sorted(truth)
    expected = evaluation.metrics(
        spec.model.task,
        __import__("numpy").array([truth[k] for k in keys]),
        __import__("numpy").array([scores[k] for k in keys]),
        None,
    )
    metric = modeling.primary_metric(spec)
    assert doc["realized"] == pytest.approx(expected[metric])


def test_feedback_that_contradicts_the_champion_requests_a_retraining(world, monkeypatch):
    """The loop closed by the field: day 5 served, every technician's label the reverse of
    the champion's ranking, through label_feedback -> labels -> model_performance; the
    metric-decline sensor then requests a retraining of the champion, with its evidence."""
    day5, logs = "2026-01-05", world.root / "logs_decline"
    monkeypatch.setenv("MLOPS_INFERENCE_LOG_DIR", str(logs))
    client = _client(world, monkeypatch, log_dir=logs)
    try:
        for m in range(1, 5):  # day 4's last readings: the states are a day old otherwise
            r = reading(f"M000{m}", dt.datetime(2026, 1, 4, 23))
            assert client.post("/predict", json=r).status_code == 200
        served = []
        for k in range(40):
            when = dt.datetime(2026, 1, 5, 0, 30) + dt.timedelta(minutes=9 * k)
            r = reading(f"M000{1 + k % 4}", when, vibration=1.0 + (k * 7 % 40) / 5)
            resp = client.post("/predict", json=r)
            assert resp.status_code == 200, resp.text
            served.append(resp.json())
        scores = sorted(out["predictions"][0]["score"] for out in served)
        middle = scores[len(scores) // 2]
        items = [
            {
                "request_id": out["request_id"],
                "label": int(out["predictions"][0]["score"] < middle),  # the reverse
            }
            for out in served
        ]
        assert client.post("/feedback", json=items).status_code == 200
    finally:
        client.__exit__(None, None, None)
    spec = load_spec(world.spec_path)
    # The champion's evaluation on its test split (what its promotion gate records): the
    # baseline its realized metric is held to.
    world.lake.write(NAME, "training_set", training_frame(world.lake, DAYS), "0" * 16)
    model_evaluation.save_evaluation(
        world.lake, spec, model_evaluation.evaluate_version(spec, world.lake, world.uri, 1)
    )
    instance = dg.DagsterInstance.ephemeral()
    assert _ingest(world, day5, instance).success
    doc = read_json(world.lake, NAME, "model_performance", day5)
    assert doc["source"] == "served" and doc["rows_labelled"] == 40
    assert doc["baseline"] is not None, doc
    assert doc["realized"] < doc["baseline"] - spec.monitoring.metric_decline_tolerance, doc
    sensor = world.defs.get_repository_def().get_sensor_def(f"{NAME}_metric_decline_sensor")
    ctx = dg.build_sensor_context(
        instance=instance,
        resources={"lake": LakeResource(base_url=str(world.lake.base_url))},
        definitions=world.defs,
        sensor_name=sensor.name,
    )
    data = sensor.evaluate_tick(ctx)
    assert len(data.run_requests or []) == 1, data.skip_message
    tags = data.run_requests[0].tags
    assert any(v == "metric_decline" for v in tags.values()), tags
    assert any(day5 in v for v in tags.values()), tags


def test_unknown_request_ids_are_kept_with_their_reason_on_their_arrival_day(world, served):
    spec = load_spec(world.spec_path)
    today = dt.datetime.now(dt.UTC).date()
    got = feedback.ingest_day(spec, world.logs / NAME, today)
    reasons = got.rejected.filter(pl.col("request_id") == "never-served-1")["reason"].to_list()
    assert len(reasons) == 1 and "not in the request log" in reasons[0]


def test_the_sensor_relabels_the_days_new_feedback_names_once(world, ingested, served, monkeypatch):
    monkeypatch.setenv("MLOPS_INFERENCE_LOG_DIR", str(world.logs))
    sensor = world.defs.get_repository_def().get_sensor_def(f"{NAME}_feedback_sensor")
    assert sensor.name == feedback_sensor_name(load_spec(world.spec_path))
    resources = {"lake": LakeResource(base_url=str(world.lake.base_url)), "clock": ClockResource()}

    def tick(cursor: str | None):
        ctx = dg.build_sensor_context(
            instance=dg.DagsterInstance.ephemeral(),
            cursor=cursor,
            resources=resources,
            definitions=world.defs,
            sensor_name=sensor.name,
        )
        data = sensor.evaluate_tick(ctx)
        return data.run_requests or [], data.cursor, data.skip_message

    requests, cursor, _ = tick(None)
    assert [r.partition_key for r in requests] == [DAY]
    assert {k.path[-1] for k in requests[0].asset_selection} == {
        "label_feedback",
        "labels",
        "model_performance",
    }
    # Nothing new: nothing requested; the unknown request's arrival day (today) waits.
    again, cursor2, skip = tick(cursor)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert again == [] and f"waits for its day's partition: {today}" in skip
    # One more line for day 4 (a CLI import) -> day 4 again, under a new run key.
    writer = feedback.FeedbackWriter(world.logs / NAME)
    r, _ = served["singles"][9]
    writer.append(
        [{"request_id": None, "record": None, "entity": r["machine_id"],
          "event_time": r["timestamp"], "label": 1.0}],
        "import",
    )  # fmt: skip
    writer.close()
    third, _, _ = tick(cursor2)
    assert [x.partition_key for x in third] == [DAY]
    assert third[0].run_key != requests[0].run_key


def test_labels_export_picks_the_uncertain_unlabelled_and_import_lands_them(
    world, served, ingested, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLOPS_INFERENCE_LOG_DIR", str(world.logs))
    monkeypatch.setenv("MLOPS_LAKE_URL", str(world.lake.base_url))
    monkeypatch.setenv("MLOPS_MLFLOW_TRACKING_URI", world.uri)
    out = tmp_path / "to_label.csv"
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "labels",
            "export",
            "--spec",
            str(world.spec_path),
            "--day",
            DAY,
            "--n",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    frame = pl.read_csv(out, infer_schema=False)
    assert frame.height == 2 and frame["label"].null_count() == 2
    assert {"entity", "timestamp", "score", "vibration", "spec"} <= set(frame.columns)
    labelled = {
        (e, t.isoformat())
        for e, t in world.lake.read(NAME, "label_feedback", DAY)
        .select("entity", "event_time")
        .iter_rows()
    }
    picked = {
        (e, dt.datetime.fromisoformat(t).isoformat())
        for e, t in frame.select("entity", "timestamp").iter_rows()
    }
    assert not picked & labelled  # only readings without feedback yet
    # The two nearest the threshold among the unlabelled served readings.
    answers = [p for _, out_ in served["singles"] for p in out_["predictions"]]
    answers += served["batch"]["predictions"]
    unlabelled = [
        p["score"]
        for p in answers
        if (p["entity"], dt.datetime.fromisoformat(p["timestamp"]).isoformat()) not in labelled
    ]
    assert len(unlabelled) == 3  # singles[9] and the batch's records 0 and 2
    scores = sorted(float(s) for s in frame["score"])
    assert max(abs(s - 0.5) for s in scores) <= sorted(abs(s - 0.5) for s in unlabelled)[1] + 1e-12
    filled = frame.with_columns(pl.Series("label", ["1", ""]))
    filled.write_csv(out)
    res = runner.invoke(cli, ["labels", "import", str(out)])
    assert res.exit_code == 0, res.output
    assert "recorded 1 label(s)" in res.output and "1 row(s) without a label skipped" in res.output
    got = feedback.ingest_day(load_spec(world.spec_path), world.logs / NAME, DAY)
    imported = got.accepted.filter(pl.col("source") == "import")
    assert imported.height >= 1
    # A bad label names its CSV row; nothing is recorded.
    filled.with_columns(pl.Series("label", ["1", "maybe"])).write_csv(out)
    res = runner.invoke(cli, ["labels", "import", str(out)])
    assert res.exit_code == 1 and "row 2: label" in res.output


def test_feedback_overrides_the_labels_it_names():
    spec = load_spec(
        _spec_file(embedded_spec_text((EVENT_LABELS, EVENT_LABELS + "  feedback: override\n")))
    )
    assert spec.labels.uses_feedback
    base = pl.DataFrame(
        {
            "machine_id": ["A", "A", "B"],
            "timestamp": [dt.datetime(2026, 1, 4, h) for h in (1, 2, 3)],
            "failure_24h": pl.Series([0, 0, 1], dtype=pl.Int8),
        }
    )
    fb = feedback._frame(
        [
            {"entity": "A", "event_time": "2026-01-04T02:00:00", "label": 1.0},
            {"entity": "C", "event_time": "2026-01-04T02:00:00", "label": 1.0},
        ],
        feedback.feedback_schema(),
    )
    out, n, unmatched = labels.override(spec, base, fb)
    assert out["failure_24h"].to_list() == [0, 1, 1] and out.schema["failure_24h"] == pl.Int8
    assert (n, unmatched) == (1, 1)


def test_feedback_items_are_checked_against_the_label_type():
    spec = load_spec(_spec_file(embedded_spec_text((EVENT_LABELS, FEEDBACK_LABELS))))
    ok = feedback.check_items(
        spec,
        [
            {"request_id": "r1", "label": True},
            {"entity": 7, "timestamp": "2026-01-04T01:00:00+01:00", "label": "0"},
        ],
    )
    assert ok[0]["label"] == 1.0 and ok[1] == {
        "request_id": None,
        "record": None,
        "entity": "7",
        "event_time": "2026-01-04T00:00:00",
        "label": 0.0,
    }
    with pytest.raises(feedback.FeedbackError) as e:
        feedback.check_items(spec, [{"request_id": "r1", "label": 0.5}, {"label": 1}, "x"])
    assert [(p["record"], p["field"]) for p in e.value.problems] == [
        (0, "label"),
        (1, "timestamp"),
        (1, "entity"),
        (2, None),
    ]
    regression = spec.model_copy(
        update={"model": spec.model.model_copy(update={"task": "regression"})}
    )
    assert feedback.check_items(regression, [{"request_id": "r", "label": 2.5}])[0]["label"] == 2.5
    for bad in (float("nan"), True, "high"):
        with pytest.raises(feedback.FeedbackError):
            feedback.check_items(regression, [{"request_id": "r", "label": bad}])


def test_a_feedback_spec_names_no_other_label_source():
    text = embedded_spec_text((EVENT_LABELS, FEEDBACK_LABELS + "  column: failure\n"))
    with pytest.raises(SpecError, match="labels"):
        load_spec(_spec_file(text))


def _spec_file(text: str) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="feedback-spec-"))
    (folder / "specs").mkdir()
    path = folder / "specs" / f"{NAME}.yaml"
    path.write_text(text)
    return path


def test_bandit_mode_routes_logs_its_decision_and_learns_from_feedback(world, monkeypatch):
    """The wiring of serving.bandit (its convergence: tests/test_bandit.py): each request is
    routed to an arm, its log lines carry the decision, and POST /feedback moves the
    posteriors /model reports at once."""
    spec = load_spec(variant(world.root / "v2", "xgboost", {"n_estimators": 5, "max_depth": 2}))
    lineage = {"training_set_hash": "1" * 64, "training_partitions": [DAYS[0], DAYS[-1]]}
    lake = Lake(str(world.root / ".mlops" / "lake"))
    v2 = training.train_candidate(
        spec, training_frame(lake, DAYS), lineage, world.uri,
        str(world.root / ".mlops" / "mlartifacts"), trials=1,
    )  # fmt: skip
    registry.set_alias(world.uri, NAME, registry.CHALLENGER, v2.version)
    champion = registry.alias_version(world.uri, NAME, registry.CHAMPION)
    logs = world.root / "bandit-logs"
    client = _client(world, monkeypatch, log_dir=logs, mode="bandit", bandit_floor=0.5)
    try:
        wait(
            lambda: (
                (client.get("/model").json().get("challenger") or {}).get("version") == v2.version
            ),
            60,
            "the challenger to load",
        )
        answers = []
        for k in range(20):
            r = reading(f"M000{1 + k % 4}", AFTER + dt.timedelta(hours=6, minutes=5 * k))
            resp = client.post("/predict", json=r)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())
        by_route = {a["route"] for a in answers}
        assert by_route == {"champion", "canary"}
        for a in answers:
            p = a["predictions"][0]
            right = a["route"] == "champion"  # the champion is always right, the challenger never
            label = p["decision"] if right else 1 - p["decision"]
            ok = client.post("/feedback", json={"request_id": a["request_id"], "label": label})
            assert ok.status_code == 200, ok.text
        arms = client.get("/model").json()["bandit"]["arms"]
    finally:
        client.__exit__(None, None, None)
    n_champion = sum(a["route"] == "champion" for a in answers)
    assert arms[str(champion)]["alpha"] == 1 + n_champion and arms[str(champion)]["beta"] == 1
    assert arms[str(v2.version)]["alpha"] == 1
    assert arms[str(v2.version)]["beta"] == 1 + 20 - n_champion
    lines, _ = feedback.read_lines(feedback.log_files(logs / NAME))
    routed = [ln for ln in lines if ln.get("status") == 200]
    assert len(routed) == 20 and all("bandit" in ln for ln in routed)
    assert {ln["model_version"] for ln in routed} == {champion, v2.version}


NO_ENTITY_SPEC = """
name: meter
source: {path: incoming, format: csv, file_pattern: "m_{date}.csv", timestamp_column: ts,
  start_date: 2026-05-01}
schema:
  columns:
    - {name: ts, type: timestamp}
    - {name: load, type: float}
    - {name: y, type: int}
labels: {kind: column, column: y, name: target, maturity: 0h, feedback: override}
features:
  lookback_days: 1
  passthrough: [load]
model:
  candidates: [{estimator: logistic_regression}]
"""


def test_a_spec_with_column_labels_and_no_entity_takes_feedback_by_request_or_time(tmp_path):
    """No entity key (one series, entity 'all'), column labels overridden by feedback: a
    request id resolves through the log, a bare timestamp (the spec's `ts`) names a reading."""
    (tmp_path / "meter.yaml").write_text(NO_ENTITY_SPEC)
    spec = load_spec(tmp_path / "meter.yaml")
    day = dt.datetime(2026, 5, 3)
    log = feedback.InferenceLogWriter(tmp_path / "logs")
    log.write(
        [
            {"request_id": "q1", "record": 0, "time": "2026-05-03T10:00:01+00:00",
             "event_time": (day + dt.timedelta(hours=h)).isoformat(), "entity": "all",
             "route": "champion", "model_version": 1, "status": 200,
             "outputs": {"score": 0.4, "decision": 0}}
            for h in (1,)
        ]
    )  # fmt: skip
    log.close()
    items = feedback.check_items(
        spec,
        [{"request_id": "q1", "label": 1}, {"ts": "2026-05-03T02:00:00", "label": 0}],
    )
    assert [it["entity"] for it in items] == [None, "all"]
    writer = feedback.FeedbackWriter(tmp_path / "logs")
    writer.append(items, "api")
    writer.close()
    got = feedback.ingest_day(spec, tmp_path / "logs", day.date())
    assert got.rejected.height == 0
    assert sorted(got.accepted.select("entity", "event_time", "label").iter_rows()) == [
        ("all", day + dt.timedelta(hours=1), 1.0),
        ("all", day + dt.timedelta(hours=2), 0.0),
    ]
    valid = pl.DataFrame(
        {"ts": [day + dt.timedelta(hours=h) for h in (1, 2, 3)], "load": [1.0, 2.0, 3.0],
         "y": [0, 1, 1]}
    )  # fmt: skip
    rows, info = labels.build_labels(spec, valid, day.date(), feedback=got.accepted)
    assert rows["target"].to_list() == [1, 0, 1] and rows[labels.MATURE].all()
    assert (info["feedback_overrides"], info["feedback_unmatched"]) == (2, 0)
