"""Sensors and schedules through dg.build_sensor_context / build_schedule_context: asserted run
requests and cursors, tick by tick."""

import datetime as dt
import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.utils import make_new_run_id

from catalog.jobs import data_job_name, labels_job_name, scoring_job_name, training_job_name
from mlops import monitoring
from mlops.lake import write_json
from orchestration.jobs import QUIET
from orchestration.replay import backdate, land_file
from orchestration.schedules import retraining_schedule_name, scoring_schedule_name
from resources.clock import ClockResource
from resources.lake import LakeResource
from sensors.new_data import new_data_sensor_name
from sensors.retrain import drift_retrain_sensor_name, metric_decline_sensor_name
from tests.conftest import REPO, Project, embedded_spec_text, make_project, small_data

START = dt.date(2026, 1, 1)


def _day(i: int) -> str:
    return (START + dt.timedelta(days=i)).isoformat()


def _tick(p: Project, sensor: str, cursor: str | None, instance=None):
    ctx = dg.build_sensor_context(
        instance=instance or p.instance,
        cursor=cursor,
        resources={"lake": LakeResource(base_url=str(p.lake.root)), "clock": ClockResource()},
        definitions=p.defs,
    )
    data = p.defs.get_repository_def().get_sensor_def(sensor).evaluate_tick(ctx)
    return list(data.run_requests or []), data.cursor or cursor, data.skip_message


def _persistent(root: Path) -> Project:
    """Schedules read the instance through its ref: it must be persistent, as in production."""
    p = make_project(root)
    (root / "dagster").mkdir()
    p.instance = dg.DagsterInstance.local_temp(str(root / "dagster"))
    return p


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return _persistent(tmp_path)


@pytest.fixture
def staged(tmp_path: Path) -> tuple[Project, Path, Path]:
    """A project whose generated files sit in a staging folder, landed by the test."""
    p = _persistent(tmp_path)
    small_data(p, days=8, machines=4)
    readings, events = p.spec.landing_dir, p.spec.resolve(p.spec.labels.events.path)
    stage_r, stage_e = tmp_path / "stage_r", tmp_path / "stage_e"
    shutil.move(readings, stage_r)
    shutil.move(events, stage_e)
    readings.mkdir(parents=True)
    events.mkdir(parents=True)
    return p, stage_r, stage_e


def _land(p: Project, stage_r: Path, stage_e: Path, i: int) -> None:
    """Day i's files, whole and settled (mtime past settle_seconds), as the replay lands them."""
    day = START + dt.timedelta(days=i)
    for f in stage_r.glob(f"*{day.isoformat()}*"):
        land_file(f, p.spec.landing_dir, p.spec.source.settle_seconds)
    for f in stage_e.glob(f"*{day.isoformat()}*"):
        events = p.spec.labels.events
        land_file(f, p.spec.resolve(events.path), events.settle_seconds)


# --- new_data_sensor -----------------------------------------------------------------------


def test_new_day_requests_one_data_run_and_identical_redelivery_starts_nothing(staged):
    p, sr, se = staged
    name = new_data_sensor_name(p.spec)
    _land(p, sr, se, 0)
    reqs, cursor, _ = _tick(p, name, None)
    assert [(r.job_name, r.partition_key) for r in reqs] == [(data_job_name(p.spec), _day(0))]
    assert reqs[0].run_key.startswith(f"data:{_day(0)}:")

    # Re-delivered: same bytes, new (settled) mtime -> nothing, and the cursor records the
    # new signature.
    f = next(p.spec.landing_dir.glob("*"))
    shutil.copy(sr / f.name, f)
    backdate([f], p.spec.source.settle_seconds + 10)
    reqs2, cursor2, skip = _tick(p, name, cursor)
    assert reqs2 == [] and "no new or corrected data" in skip
    reqs3, _, _ = _tick(p, name, cursor2)
    assert reqs3 == []


def test_corrected_file_reruns_its_day_then_its_downstream(staged):
    p, sr, se = staged
    name = new_data_sensor_name(p.spec)
    for i in range(3):
        _land(p, sr, se, i)
    reqs, cursor, _ = _tick(p, name, None)
    for r in reqs:
        p.run_day(r.partition_key)
    # Pretend day 1 was scored: a correction must re-score it.
    p.lake.write(p.spec.name, "batch_predictions", pl.DataFrame({"x": [1]}), _day(1))

    f = p.spec.landing_dir / f"readings_{_day(1)}.csv"
    lines = f.read_text().splitlines()
    lines[1] = lines[1].replace(",", ", ", 1)  # one changed byte: a corrected delivery
    f.write_text("\n".join(lines) + "\n")
    backdate([f], p.spec.source.settle_seconds)
    reqs, cursor, _ = _tick(p, name, cursor)
    assert [(r.job_name, r.partition_key) for r in reqs] == [(data_job_name(p.spec), _day(1))]
    assert reqs[0].tags["mlops/change"] == "corrected"
    fix_key = reqs[0].run_key

    # The cascade waits for the correction's run to succeed...
    reqs_wait, cursor, _ = _tick(p, name, cursor)
    assert reqs_wait == []
    p.defs.resolve_job_def(data_job_name(p.spec)).execute_in_process(
        partition_key=_day(1),
        instance=p.instance,
        tags={"dagster/run_key": fix_key, "mlops/spec": p.spec.name},
        run_config=QUIET,
    )
    reqs, cursor, _ = _tick(p, name, cursor)
    got = sorted(
        (r.job_name, r.partition_key, tuple(a.path[-1] for a in r.asset_selection or []))
        for r in reqs
    )
    assert got == sorted(
        [
            (data_job_name(p.spec), _day(2), ("features",)),  # day 2 looks back at day 1
            (scoring_job_name(p.spec), _day(1), ()),
        ]
    )
    # ...and happens once.
    assert _tick(p, name, cursor)[0] == []


def test_a_day_landing_after_the_next_one_rebuilds_what_looked_back_at_it(staged):
    p, sr, se = staged
    name = new_data_sensor_name(p.spec)
    for i in (0, 2):  # day 1 is late: day 2 is built without it (a gap, not a failure)
        _land(p, sr, se, i)
    reqs, cursor, _ = _tick(p, name, None)
    for r in reqs:
        assert p.run_day(r.partition_key).success
    p.lake.write(p.spec.name, "batch_predictions", pl.DataFrame({"x": [1]}), _day(2))
    _land(p, sr, se, 1)
    reqs, cursor, _ = _tick(p, name, cursor)
    assert [(r.partition_key, r.tags["mlops/change"]) for r in reqs] == [(_day(1), "new")]
    p.defs.resolve_job_def(data_job_name(p.spec)).execute_in_process(
        partition_key=_day(1),
        instance=p.instance,
        tags={"dagster/run_key": reqs[0].run_key, "mlops/spec": p.spec.name},
        run_config=QUIET,
    )
    reqs, cursor, _ = _tick(p, name, cursor)
    got = sorted(
        (r.job_name, r.partition_key, tuple(a.path[-1] for a in r.asset_selection or []))
        for r in reqs
    )
    assert got == [
        (data_job_name(p.spec), _day(2), ("features",)),  # day 2 looks back at day 1
        (scoring_job_name(p.spec), _day(2), ()),
    ]


def test_labels_run_once_the_feed_has_arrived(staged):
    p, sr, se = staged
    name = new_data_sensor_name(p.spec)
    # maturity 72h: day 0's labels read event files of arrival days 0..3.
    cursor = None
    seen = []
    for i in range(6):
        _land(p, sr, se, i)
        reqs, cursor, _ = _tick(p, name, cursor)
        for r in reqs:
            if r.job_name == data_job_name(p.spec):
                p.run_day(r.partition_key)
        reqs2, cursor, _ = _tick(p, name, cursor)
        seen += [
            (i, r.partition_key) for r in reqs + reqs2 if r.job_name == labels_job_name(p.spec)
        ]
    assert seen == [(3, _day(0)), (4, _day(1)), (5, _day(2))]


def test_restart_neither_loses_nor_repeats_a_file(staged):
    p, sr, se = staged
    name = new_data_sensor_name(p.spec)
    _land(p, sr, se, 0)
    _land(p, sr, se, 1)
    first, cursor, _ = _tick(p, name, None)
    # The sensor process restarts: Dagster gives it back its stored cursor.
    _land(p, sr, se, 2)
    after, cursor2, _ = _tick(p, name, cursor, instance=dg.DagsterInstance.ephemeral())
    data = lambda rs: [r.partition_key for r in rs if r.job_name == data_job_name(p.spec)]  # noqa: E731
    assert data(first) == [_day(0), _day(1)]
    assert data(after) == [_day(2)]
    assert data(_tick(p, name, cursor2)[0]) == []  # and nothing twice
    # A lost cursor re-requests with the same run keys, which Dagster never runs twice.
    again, _, _ = _tick(p, name, None)
    assert {r.run_key for r in again if r.job_name == data_job_name(p.spec)} == {
        r.run_key for r in first + after if r.job_name == data_job_name(p.spec)
    }


def test_cursor_is_compact_for_many_files(tmp_path):
    from mlops import watch

    state = {"r": {_day(i): ["a" * 16, "b" * 32] for i in range(10_000)}}
    assert len(watch.encode(state)) < 1_000_000
    assert watch.decode(watch.encode(state)) == state
    with pytest.raises(ValueError, match="reset the sensor"):
        watch.decode("not a cursor")


# --- drift and metric-decline sensors ----------------------------------------------------------


def _drift_day(p: Project, i: int, share: float, champion: int = 1) -> None:
    day = _day(i)
    p.lake.write(p.spec.name, monitoring.DRIFT_REPORT, pl.DataFrame({"column": ["x"]}), day)
    write_json(
        p.lake,
        p.spec.name,
        monitoring.DRIFT_REPORT,
        day,
        {"partition": day, "drift_share": share, "champion_version": champion},
    )


def _perf_day(p: Project, i: int, realized: float, baseline: float = 0.85, champion: int = 1):
    day = _day(i)
    p.lake.write(p.spec.name, monitoring.MODEL_PERFORMANCE, pl.DataFrame({"x": [1]}), day)
    write_json(
        p.lake,
        p.spec.name,
        monitoring.MODEL_PERFORMANCE,
        day,
        {
            "partition": day,
            "realized": realized,
            "baseline": baseline,
            "champion_version": champion,
        },
    )


def _launch(p: Project, req: dg.RunRequest) -> None:
    """What the daemon does with a request: a run with its tags exists from then on."""
    p.instance.add_run(
        dg.DagsterRun(
            job_name=training_job_name(p.spec),
            run_id=make_new_run_id(),
            tags={**req.tags, "dagster/run_key": req.run_key},
            status=dg.DagsterRunStatus.SUCCESS,
        )
    )


def _replay_ticks(p: Project, sensor: str, add_day, values: list[float], start: int = 10):
    """One tick per new monitored day; returns (day index, request) for each retraining."""
    cursor, started = None, []
    for k, v in enumerate(values):
        add_day(p, start + k, v)
        reqs, cursor, _ = _tick(p, sensor, cursor)
        for r in reqs:
            _launch(p, r)
            started.append((start + k, r))
    return started


def _drift_and_labels_day(p: Project, i: int, share: float, champion: int = 1):
    """A drifted day whose labels have matured (its realized metric is in)."""
    _drift_day(p, i, share, champion)
    _perf_day(p, i, 0.84, champion=champion)


def test_persistent_drift_retries_while_refused_up_to_the_attempt_limit(project):
    p = project
    # threshold 0.3, 2 consecutive days, retry after 1 more breached day, 4 attempts.
    sensor = drift_retrain_sensor_name(p.spec)
    started = _replay_ticks(p, sensor, _drift_and_labels_day, [0.8] * 10)
    # No champion was promoted (the launched runs leave v1 serving): a refusal re-arms.
    assert [d for d, _ in started] == [11, 12, 13, 14]
    episode = f"drift:v1:{_day(10)}"
    assert [r.run_key for _, r in started] == [episode, *(f"{episode}#{n}" for n in (2, 3, 4))]
    tags = started[0][1].tags
    assert tags[monitoring.TAG_TRIGGER] == monitoring.DRIFT
    assert tags[monitoring.TAG_PARTITION] == _day(11)
    assert tags[monitoring.TAG_CHANGE_POINT] == _day(10)  # the training set starts there
    assert [r.tags[monitoring.TAG_ATTEMPT] for _, r in started] == ["1", "2", "3", "4"]
    evidence = json.loads(tags[monitoring.TAG_EVIDENCE])
    assert evidence["partitions"] == [_day(10), _day(11)] and evidence["values"] == [0.8, 0.8]
    assert "drift share" in tags[monitoring.TAG_REASON]
    _, _, skip = _tick(p, drift_retrain_sensor_name(p.spec), None)
    assert "no more attempts" in skip


def test_a_retry_waits_for_labelled_days_after_the_change(project):
    p = project
    sensor = drift_retrain_sensor_name(p.spec)
    # Drift persists, but no labels mature: a retry would train on the same rows.
    started = _replay_ticks(p, sensor, _drift_day, [0.8] * 5)
    assert [d for d, _ in started] == [11]
    _, _, skip = _tick(p, sensor, None)
    assert "waiting for a labelled day after the change point" in skip
    _perf_day(p, 10, 0.84)  # the change point's labels arrive: now a retry can learn
    _drift_day(p, 15, 0.8)
    reqs, _, _ = _tick(p, sensor, None)
    assert [r.tags[monitoring.TAG_ATTEMPT] for r in reqs] == ["2"]


def test_a_promoted_champion_ends_the_episode(project):
    from mlops import registry

    p = project
    sensor = drift_retrain_sensor_name(p.spec)
    started = _replay_ticks(p, sensor, _drift_day, [0.8] * 2)
    assert [d for d, _ in started] == [11]
    # The retraining was promoted: v2 serves, so v1's breach is over.
    registry.record_deployment(p.lake, p.spec.name, registry.Deployment("promote", 1, 2, "ok"))
    _drift_day(p, 12, 0.8)
    reqs, _, skip = _tick(p, sensor, None)
    assert reqs == [] and "v2 serves now" in skip


def test_a_drifted_day_below_the_consecutive_threshold_does_not_retrain(project):
    p = project
    started = _replay_ticks(
        p, drift_retrain_sensor_name(p.spec), _drift_day, [0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.2]
    )
    assert started == []
    reqs, _, skip = _tick(p, drift_retrain_sensor_name(p.spec), None)
    assert reqs == [] and "no breach" in skip


def test_twenty_undrifted_control_days_trigger_nothing(project):
    p = project
    import random

    rng = random.Random(0)
    shares = [rng.uniform(0, 0.3) for _ in range(20)]  # at most the threshold, never above
    assert _replay_ticks(p, drift_retrain_sensor_name(p.spec), _drift_day, shares) == []
    perf = [0.85 + rng.uniform(-0.05, 0.05) for _ in range(20)]  # within the tolerance
    assert _replay_ticks(p, metric_decline_sensor_name(p.spec), _perf_day, perf) == []


def test_metric_decline_is_not_missed(project):
    p = project
    # tolerance 0.05 below a 0.85 baseline: 0.79 declines, 0.81 does not.
    started = _replay_ticks(
        p, metric_decline_sensor_name(p.spec), _perf_day, [0.84, 0.81, 0.79, 0.78]
    )
    assert [d for d, _ in started] == [12, 13]  # v1 still serves on day 13: a retry
    tags = started[0][1].tags
    assert tags[monitoring.TAG_TRIGGER] == monitoring.METRIC_DECLINE
    assert json.loads(tags[monitoring.TAG_EVIDENCE])["values"] == [0.79]


def test_cooldown_is_shared_between_change_triggers_and_counted_in_partitions(project):
    p = project
    drift = _replay_ticks(p, drift_retrain_sensor_name(p.spec), _drift_day, [0.9, 0.9])
    assert [d for d, _ in drift] == [11]
    # A decline 3 partitions later waits for the drift retraining's cooldown (7)...
    perf = _replay_ticks(p, metric_decline_sensor_name(p.spec), _perf_day, [0.5] * 6, start=12)
    assert [d for d, _ in perf] == [], "within the cooldown of the drift retraining"
    # ...and fires once it has passed.
    _perf_day(p, 18, 0.5)
    reqs, _, _ = _tick(p, metric_decline_sensor_name(p.spec), None)
    assert len(reqs) == 1 and reqs[0].tags[monitoring.TAG_PARTITION] == _day(18)


def test_cooldown_runs_on_the_data_clock_not_the_lagging_label_clock(project):
    p = project
    # Realized metrics arrive 3 days behind the data: the cooldown counts data partitions.
    for i in range(13):
        p.lake.write(p.spec.name, "features", pl.DataFrame({"x": [1]}), _day(i))
    tags = {monitoring.TAG_SPEC: p.spec.name, monitoring.TAG_PARTITION: _day(5)}
    _launch(p, dg.RunRequest(run_key="x", tags={**tags, monitoring.TAG_TRIGGER: "drift"}))
    _perf_day(p, 9, 0.5)  # labelled day 9, data through day 12: 7 partitions after day 5
    reqs, _, _ = _tick(p, metric_decline_sensor_name(p.spec), None)
    assert len(reqs) == 1 and reqs[0].tags[monitoring.TAG_PARTITION] == _day(12)


def test_a_scheduled_retraining_does_not_delay_the_recovery_from_a_change(project):
    p = project
    for i in range(13):
        p.lake.write(p.spec.name, "features", pl.DataFrame({"x": [1]}), _day(i))
    tags = {monitoring.TAG_SPEC: p.spec.name, monitoring.TAG_PARTITION: _day(11)}
    _launch(p, dg.RunRequest(run_key="s", tags={**tags, monitoring.TAG_TRIGGER: "schedule"}))
    _perf_day(p, 12, 0.5)  # one day after the scheduled retraining
    reqs, _, _ = _tick(p, metric_decline_sensor_name(p.spec), None)
    assert len(reqs) == 1, "a scheduled retraining starts no cooldown for a change"


def test_a_new_champion_starts_a_new_episode(project):
    p = project
    sensor = drift_retrain_sensor_name(p.spec)
    started = _replay_ticks(p, sensor, _drift_and_labels_day, [0.9] * 3)
    assert [d for d, _ in started] == [11, 12]  # the first retraining and one retry
    # A week later the drift goes on against the new champion (v2): its own episode.
    cursor = None
    got = []
    for i in range(20, 23):
        _drift_and_labels_day(p, i, 0.9, champion=2)
        reqs, cursor, _ = _tick(p, sensor, cursor)
        got += [(i, r.run_key) for r in reqs]
    assert got == [(21, f"drift:v2:{_day(20)}"), (22, f"drift:v2:{_day(20)}#2")]


# --- schedules ----------------------------------------------------------------------------


def _schedule_tick(p: Project, name: str, at: dt.datetime):
    ctx = dg.build_schedule_context(
        instance=p.instance,
        scheduled_execution_time=at,
        resources={"lake": LakeResource(base_url=str(p.lake.root))},
        repository_def=p.defs.get_repository_def(),
    )
    data = p.defs.get_repository_def().get_schedule_def(name).evaluate_tick(ctx)
    return list(data.run_requests or []), data.skip_message


def test_scoring_schedule_scores_yesterday_once_its_features_exist(project):
    p = project
    at = dt.datetime(2026, 1, 3, 2, tzinfo=dt.UTC)
    reqs, skip = _schedule_tick(p, scoring_schedule_name(p.spec), at)
    assert reqs == [] and "no features for 2026-01-02" in skip
    p.lake.write(p.spec.name, "features", pl.DataFrame({"x": [1]}), "2026-01-02")
    reqs, _ = _schedule_tick(p, scoring_schedule_name(p.spec), at)
    assert [(r.partition_key, r.run_key) for r in reqs] == [("2026-01-02", "scoring:2026-01-02")]


def test_retraining_schedule_respects_the_cooldown(tmp_path):
    spec = embedded_spec_text(
        ('# retraining_schedule: "0 3 * * 0"', 'retraining_schedule: "0 3 * * 0"')
    )
    p = make_project(tmp_path, spec)
    (tmp_path / "dagster").mkdir()
    p.instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster"))
    for i in range(7):
        p.lake.write(p.spec.name, "features", pl.DataFrame({"x": [1]}), _day(i))
    drift = _replay_ticks(p, drift_retrain_sensor_name(p.spec), _drift_day, [0.9, 0.9], start=5)
    assert [d for d, _ in drift] == [6]
    for i in range(7, 15):
        p.lake.write(p.spec.name, "features", pl.DataFrame({"x": [1]}), _day(i))
    name = retraining_schedule_name(p.spec)
    reqs, skip = _schedule_tick(p, name, dt.datetime(2026, 1, 11, 3, tzinfo=dt.UTC))
    assert reqs == [] and "cooldown" in skip  # latest day 9: 3 partitions after day 6
    reqs, _ = _schedule_tick(p, name, dt.datetime(2026, 1, 15, 3, tzinfo=dt.UTC))  # day 13
    assert len(reqs) == 1 and reqs[0].tags[monitoring.TAG_TRIGGER] == monitoring.SCHEDULE


def test_sql_sources_are_watched_by_row_fingerprints():
    from mlops import watch

    state, changes = watch.diff_fingerprints({}, {_day(0): "a" * 64, _day(1): None})
    assert [(c.partition, c.kind) for c in changes] == [(_day(0), watch.NEW)]
    same, none = watch.diff_fingerprints(state, {_day(0): "a" * 64})
    assert none == [] and same == state
    _, fixed = watch.diff_fingerprints(state, {_day(0): "b" * 64})
    assert [(c.partition, c.kind) for c in fixed] == [(_day(0), watch.CORRECTED)]
    days = watch.sql_days(START, START + dt.timedelta(days=9), [_day(8)], rescan_days=3)
    assert [d.isoformat() for d in days] == [_day(i) for i in range(5, 10)]


# --- run-failure alerts -------------------------------------------------------------------------


@pytest.fixture
def webhook():
    """A local alert webhook: (its URL, the JSON bodies it received)."""
    import http.server
    import threading

    got: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", got
    finally:
        server.shutdown()


def test_a_failed_run_alerts_through_the_webhook(project, webhook):
    from resources.alerting import AlertingResource
    from sensors.alerts import run_failure_sensor_name

    p = project
    url, got = webhook
    sensor = p.defs.get_repository_def().get_sensor_def(run_failure_sensor_name(p.spec))

    def tick(cursor):
        ctx = dg.build_sensor_context(
            instance=p.instance,
            cursor=cursor,
            resources={"alerting": AlertingResource(webhook_url=url)},
            definitions=p.defs,
        )
        data = sensor.evaluate_tick(ctx)
        return data.cursor or cursor

    cursor = tick(None)
    result = p.run_day(_day(0), raise_on_error=False)  # no landing file: the run fails
    assert not result.success
    cursor = tick(cursor)
    assert len(got) == 1
    alert = got[0]
    assert alert["fields"]["job"] == data_job_name(p.spec)
    assert alert["fields"]["partition"] == _day(0)
    assert alert["fields"]["run_id"] == result.run_id
    assert alert["fields"]["attempt"] == 1
    assert alert["fields"]["attempts_allowed"] == 1  # this instance has no run retries
    assert alert["fields"]["spec"] == p.spec.name
    assert alert["fields"]["first_run_id"] == result.run_id
    assert alert["fields"]["retry"].startswith("not retried")
    # The title names the spec and job; the body is the run-failure event's message,
    # which names the step that failed (raw_data, for the missing landing file).
    job = data_job_name(p.spec)
    assert alert["title"] == f"[{p.spec.name}] {job} failed"
    title, body = alert["text"].split("\n", 1)
    assert title == alert["title"]
    assert f'"{job}"' in body and f"Steps failed: ['{p.spec.name}__raw_data']" in body, body
    tick(cursor)
    assert len(got) == 1, "one alert per failed run"


def _retrying(root: Path, max_retries: int = 1) -> Project:
    """A project on a persistent instance with run retries as the shipped profiles set them."""
    p = make_project(root)
    (root / "dagster").mkdir()
    p.instance = dg.DagsterInstance.local_temp(
        str(root / "dagster"),
        overrides={
            "run_retries": {
                "enabled": True,
                "max_retries": max_retries,
                "retry_on_asset_or_op_failure": False,
            }
        },
    )
    return p


def _failure_alerts(p: Project, url: str, run: dg.DagsterRun, event: dg.DagsterEvent) -> None:
    """The run-failure sensor on one failure, as the daemon would call it."""
    from resources.alerting import AlertingResource
    from sensors.alerts import run_failure_sensor_name

    name = run_failure_sensor_name(p.spec)
    sensor = p.defs.get_repository_def().get_sensor_def(name)
    ctx = dg.build_run_status_sensor_context(
        sensor_name=name,
        dagster_event=event,
        dagster_instance=p.instance,
        dagster_run=p.instance.get_run_by_id(run.run_id),
        resources={"alerting": AlertingResource(webhook_url=url)},
    )
    sensor(ctx)


def _failed_run(
    p: Project, reason: str = "START_TIMEOUT", by_daemon: bool = True, **parent
) -> tuple[dg.DagsterRun, dg.DagsterEvent]:
    """A run of the data job failed the way run monitoring fails a run stuck STARTING
    (or with another Dagster failure reason); Dagster itself decides whether it will be
    retried. `by_daemon`: launched from the code location, as the daemon launches runs."""
    from dagster._core.events import JobFailureData, RunFailureReason
    from dagster._core.remote_origin import (
        RegisteredCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )

    job = p.defs.resolve_job_def(data_job_name(p.spec))
    tags = {"dagster/partition": _day(0)}
    if parent:  # the tags the daemon's retry carries (retry_run, create_reexecuted_run)
        tags |= {
            "dagster/retry_number": str(parent["retry_number"]),
            "dagster/parent_run_id": parent["parent_run_id"],
            "dagster/root_run_id": parent["root_run_id"],
        }
    repo = RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("mlops"), "__repository__")
    run = p.instance.create_run_for_job(
        job,
        tags=tags,
        parent_run_id=parent.get("parent_run_id"),
        root_run_id=parent.get("root_run_id"),
        remote_job_origin=RemoteJobOrigin(repo, job.name) if by_daemon else None,
    )
    event = p.instance.report_run_failed(
        run,
        f"{reason} (failed by the test, as the daemon would fail it)",
        JobFailureData(error=None, failure_reason=RunFailureReason(reason)),
    )
    return p.instance.get_run_by_id(run.run_id), event


def test_a_run_dagster_will_retry_does_not_alert_but_its_last_attempt_does(tmp_path, webhook):
    p = _retrying(tmp_path, max_retries=1)
    url, got = webhook
    first, event = _failed_run(p)
    assert first.tags["dagster/will_retry"] == "true"
    _failure_alerts(p, url, first, event)
    assert got == [], "an attempt Dagster will retry is not an alert"

    # The daemon's retry (tagged as Dagster tags it) fails the same way: retries exhausted.
    last, event = _failed_run(
        p, parent_run_id=first.run_id, root_run_id=first.run_id, retry_number=1
    )
    assert last.tags["dagster/will_retry"] == "false"
    _failure_alerts(p, url, last, event)
    assert len(got) == 1
    fields = got[0]["fields"]
    assert fields["run_id"] == last.run_id
    assert fields["first_run_id"] == first.run_id
    assert (fields["attempt"], fields["attempts_allowed"]) == (2, 2)
    assert fields["retry"] == "retries exhausted: attempt 2 of 2 failed"
    assert fields["partition"] == _day(0) and fields["job"] == data_job_name(p.spec)
    assert "attempt 2 of 2" in got[0]["title"]


def test_a_run_whose_step_raised_alerts_at_once_with_retries_on(tmp_path, webhook):
    p = _retrying(tmp_path, max_retries=2)
    url, got = webhook
    # In process, for real: no landing file, raw_data raises; Dagster will not retry it.
    result = p.run_day(_day(0), raise_on_error=False)
    assert not result.success
    assert p.instance.get_run_by_id(result.run_id).tags["dagster/will_retry"] == "false"
    # The same failure of a run the daemon launched.
    run, event = _failed_run(p, reason="STEP_FAILURE")
    assert run.tags["dagster/will_retry"] == "false"
    _failure_alerts(p, url, run, event)
    assert len(got) == 1
    fields = got[0]["fields"]
    assert (fields["attempt"], fields["attempts_allowed"]) == (1, 3)
    assert fields["retry"] == "a step raised: not retried (retry_on_asset_or_op_failure is off)"


def test_a_run_outside_the_daemon_alerts_even_where_dagster_tags_it_for_retry(tmp_path, webhook):
    """The demo and `mlops backtest` run jobs in their own process: no daemon can re-launch
    such a run, so its failure alerts at once."""
    p = _retrying(tmp_path, max_retries=2)
    url, got = webhook
    run, event = _failed_run(p, by_daemon=False)
    assert run.tags["dagster/will_retry"] == "true"  # Dagster's tag does not look at the origin
    _failure_alerts(p, url, run, event)
    assert len(got) == 1
    assert got[0]["fields"]["attempt"] == 1 and got[0]["fields"]["attempts_allowed"] == 1


def test_the_shipped_profiles_retry_runs_that_never_started_but_not_step_failures():
    import yaml

    from orchestration.instance import DEFAULT_INSTANCE_YAML

    shipped = {
        "default": yaml.safe_load(DEFAULT_INSTANCE_YAML),
        "production": yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text()),
    }
    for profile, cfg in shipped.items():
        retries = cfg["run_retries"]
        assert retries["enabled"] and retries["max_retries"] >= 1, profile
        assert retries["retry_on_asset_or_op_failure"] is False, profile
        assert cfg["run_monitoring"]["enabled"], profile
        assert cfg["code_servers"]["local_startup_timeout"] > 180, profile  # Dagster's default


def test_an_unreachable_webhook_fails_loudly():
    from resources.alerting import AlertError, AlertingResource

    with pytest.raises(AlertError, match="alert webhook"):
        AlertingResource(webhook_url="http://127.0.0.1:9/x", timeout_s=0.5).alert("t", "x")
    assert AlertingResource().alert("t", "logged only") is False


@pytest.mark.parametrize(
    "now",
    [
        dt.datetime(2026, 1, 1, 0, 0, tzinfo=dt.UTC),  # the start date itself: no partition yet
        dt.datetime(2026, 1, 1, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 2, 0, 0, tzinfo=dt.UTC),  # the first day has just ended
        dt.datetime(2026, 1, 2, 0, 0, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC),
        dt.datetime(2025, 12, 1, tzinfo=dt.UTC),  # before the start
    ],
)
def test_last_partition_agrees_with_dagsters_partitions(tmp_path, now) -> None:
    """mlops.watch.last_partition (what `mlops status` and the sensor use) is Dagster's last
    daily partition key at the same instant, bounded by the clock's day."""
    from dagster._core.test_utils import freeze_time

    from catalog.partitions import daily_partitions
    from mlops.watch import last_partition

    spec = make_project(tmp_path).spec
    assert spec.source.start_date == dt.date(2026, 1, 1)
    with freeze_time(now):
        key = daily_partitions(spec).get_last_partition_key()
    expected = dt.date.fromisoformat(key) if key else None
    far = dt.date(2100, 1, 1)
    assert last_partition(spec, far, now.timestamp()) == expected
    if expected is not None:
        earlier = expected - dt.timedelta(days=1)
        assert last_partition(spec, earlier, now.timestamp()) == earlier
