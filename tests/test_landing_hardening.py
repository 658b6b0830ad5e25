"""Landing folders as they are in the field: symlinks, stray dates, files still being
written, writers' temp names, near-miss names. Real files in tmp_path, the real new-data
sensor through dg.build_sensor_context, `mlops status`'s landing section."""

import datetime as dt
import os
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import freeze_time

from catalog.jobs import data_job_name
from mlops import ingest, watch
from mlops.registry_reader import open_registry
from mlops.spec import FileFeed
from orchestration import status as st
from orchestration.replay import Feed, Replay, backdate
from orchestration.run_records import InstanceRuns
from resources.clock import ClockResource
from resources.lake import LakeResource
from sensors.new_data import new_data_sensor_name
from tests.conftest import Project, make_project

START = dt.date(2026, 1, 1)  # the embedded spec's source.start_date
CSV = "timestamp,machine_id,temperature\n" + "".join(
    f"2026-01-01T{h:02d}:00:00,m{m},{20 + h}\n" for h in range(24) for m in range(10)
)  # 240 rows


def _day(i: int) -> str:
    return (START + dt.timedelta(days=i)).isoformat()


@pytest.fixture
def p(tmp_path: Path) -> Project:
    p = make_project(tmp_path)
    p.spec.landing_dir.mkdir(parents=True)
    p.spec.resolve(p.spec.labels.events.path).mkdir(parents=True)
    return p


def _write(folder: Path, name: str, text: str = CSV, settled: bool = True) -> Path:
    f = folder / name
    f.write_text(text)
    if settled:
        backdate([f], 5.0)
    return f


def _tick(p: Project, cursor: str | None = None, today: str = ""):
    """(data partitions requested, cursor, skip message) of one new-data sensor tick."""
    ctx = dg.build_sensor_context(
        instance=p.instance,
        cursor=cursor,
        resources={
            "lake": LakeResource(base_url=str(p.lake.root)),
            "clock": ClockResource(today=today),
        },
        definitions=p.defs,
    )
    sensor = p.defs.get_repository_def().get_sensor_def(new_data_sensor_name(p.spec))
    data = sensor.evaluate_tick(ctx)
    reqs = [r for r in data.run_requests or [] if r.job_name == data_job_name(p.spec)]
    return reqs, data.cursor or cursor, data.skip_message or ""


def _source_landing(p: Project) -> dict:
    (got,) = [d for d in st.landing(p.spec) if d["feed"] == "source"]
    return got


# --- 3a. symlinks ---------------------------------------------------------------------------


def test_a_symlink_leading_out_of_the_landing_folder_is_never_read(p, tmp_path, capfd):
    landing = p.spec.landing_dir
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = _write(outside, "exports.csv")
    _write(landing, f"readings_{_day(0)}.csv")
    (landing / f"readings_{_day(1)}.csv").symlink_to(secret)  # leads out: refused
    (landing / "archive").mkdir()
    inner = _write(landing / "archive", "copy.csv")
    (landing / f"readings_{_day(2)}.csv").symlink_to(inner)  # stays inside: a landing file

    feed = p.spec.source
    assert ingest.files_for_day(feed, landing, START + dt.timedelta(days=1)) == []
    assert ingest.landed_days(feed, landing) == [START, START + dt.timedelta(days=2)]
    # What raw_data reads (ingest.load_day -> files_for_day): nothing from outside.
    batch = ingest.load_day(feed, landing, START + dt.timedelta(days=1))
    assert batch.files == [] and batch.frame.height == 0
    inside = ingest.load_day(feed, landing, START + dt.timedelta(days=2))
    assert inside.frame.height == 240

    reqs, _, _ = _tick(p)
    assert [r.partition_key for r in reqs] == [_day(0), _day(2)]
    log = capfd.readouterr().err
    assert f"readings_{_day(1)}.csv -> {secret}" in log and "leading out" in log

    got = _source_landing(p)["symlinks_refused"]
    assert got == {"count": 1, "names": [f"readings_{_day(1)}.csv -> {secret}"]}


# --- 5. stray dates ---------------------------------------------------------------------------


def test_files_dated_before_the_start_or_in_the_future_do_not_stop_other_days(p, capfd):
    landing = p.spec.landing_dir
    _write(landing, "readings_2025-12-31.csv")  # before source.start_date
    _write(landing, "readings_2099-01-01.csv")  # no such partition yet
    _write(landing, f"readings_{_day(0)}.csv")
    reqs, cursor, _ = _tick(p)  # today's code: DagsterUnknownPartitionError, every tick
    assert [r.partition_key for r in reqs] == [_day(0)]
    log = capfd.readouterr().err
    assert "readings_2025-12-31.csv dated before source.start_date 2026-01-01" in log
    assert "readings_2099-01-01.csv dated after the last partition" in log

    _write(landing, f"readings_{_day(1)}.csv")  # the next day still comes in
    reqs, cursor, _ = _tick(p, cursor)
    assert [r.partition_key for r in reqs] == [_day(1)]
    reqs, _, skip = _tick(p, cursor)  # and the strays are named in the skip reason
    assert reqs == [] and "readings_2025-12-31.csv" in skip and "readings_2099-01-01.csv" in skip

    got = _source_landing(p)
    assert got["before_start"] == {"count": 1, "names": ["readings_2025-12-31.csv"]}
    assert got["after_last_partition"] == {"count": 1, "names": ["readings_2099-01-01.csv"]}


def test_todays_file_waits_for_its_partition_then_is_picked_up(p):
    landing = p.spec.landing_dir
    noon = dt.datetime(2026, 1, 4, 12, tzinfo=dt.UTC)  # day 3, not complete yet
    for i in (0, 3):
        f = _write(landing, f"readings_{_day(i)}.csv")
        os.utime(f, (noon.timestamp() - 60, noon.timestamp() - 60))
    with freeze_time(noon):
        reqs, cursor, skip = _tick(p)
        assert [r.partition_key for r in reqs] == [_day(0)]
        reqs, cursor, skip = _tick(p, cursor)
        assert reqs == [] and f"readings_{_day(3)}.csv dated after the last partition" in skip
    with freeze_time(dt.datetime(2026, 1, 5, 0, 0, 30, tzinfo=dt.UTC)):  # day 3 exists now
        reqs, cursor, _ = _tick(p, cursor)
    assert [(r.partition_key, r.tags["mlops/change"]) for r in reqs] == [(_day(3), "new")]


def test_a_replays_simulated_day_bounds_what_is_requested(p):
    for i in range(4):
        _write(p.spec.landing_dir, f"readings_{_day(i)}.csv")
    reqs, cursor, _ = _tick(p, today=_day(1))
    assert [r.partition_key for r in reqs] == [_day(0), _day(1)]
    reqs, _, _ = _tick(p, cursor, today=_day(3))
    assert [r.partition_key for r in reqs] == [_day(2), _day(3)]


# --- 6. files still being written, writers' temp names ---------------------------------------


def test_a_file_still_being_written_is_built_only_once_settled(p):
    landing = p.spec.landing_dir
    name = f"readings_{_day(0)}.csv"
    lines = CSV.splitlines(keepends=True)
    f = _write(landing, name, "".join(lines[: 1 + 144]), settled=False)  # 60 % of its rows
    reqs, cursor, skip = _tick(p)
    assert reqs == []
    assert f"{name} (0 s ago) still changing (settle_seconds 5)" in skip
    assert f"day(s) {_day(0)} wait for a later tick" in skip

    f.write_text(CSV)  # the writer finishes; the file then rests
    backdate([f], 5.0)
    reqs, cursor, _ = _tick(p, cursor)
    assert [r.partition_key for r in reqs] == [_day(0)]
    whole = ingest.content_hash([f])
    assert reqs[0].run_key == f"data:{_day(0)}:{watch.short(whole)}"
    assert _tick(p, cursor)[0] == []


def test_a_day_waits_whole_while_one_of_its_files_is_changing(tmp_path):
    feed = FileFeed(path="x", file_pattern="*_{date}.csv", timestamp_column="t")
    _write(tmp_path, f"a_{_day(0)}.csv")
    _write(tmp_path, f"b_{_day(0)}.csv", settled=False)
    _write(tmp_path, f"a_{_day(1)}.csv")
    seen = watch.scan(feed, tmp_path, now=dt.datetime.now(dt.UTC).timestamp())
    assert sorted(seen.files) == [_day(1)] and list(seen.unsettled) == [_day(0)]
    instant = FileFeed(
        path="x", file_pattern="*_{date}.csv", timestamp_column="t", settle_seconds=0
    )
    seen = watch.scan(instant, tmp_path, now=dt.datetime.now(dt.UTC).timestamp() + 1)
    assert sorted(seen.files) == [_day(0), _day(1)]


def test_writers_temp_names_are_never_data_and_never_listed(tmp_path):
    # A pattern loose enough to match a temp name: the name rule, not the pattern, keeps it out.
    feed = FileFeed(path="x", file_pattern="readings_{date}.csv*", timestamp_column="t")
    d = f"readings_{_day(0)}"
    temps = [f".{d}.csv", f"{d}.csv.tmp", f"{d}.csv.part", f"{d}.csv.PARTIAL", "_SUCCESS"]
    temps += [f"{d}.csv.filepart", f"~{d}.csv"]
    for n in temps:
        _write(tmp_path, n)
        assert ingest.file_day(feed, n) is None, n
    _write(tmp_path, f"{d}.csv")
    assert ingest.files_for_day(feed, tmp_path, START) == [tmp_path / f"{d}.csv"]
    seen = watch.scan(feed, tmp_path, now=dt.datetime.now(dt.UTC).timestamp())
    assert seen.files[_day(0)][0][0] == f"{d}.csv" and seen.unmatched == []
    # A feed whose own names start with `_` is not mistaken for markers.
    marked = FileFeed(path="x", file_pattern="_r_{date}.csv", timestamp_column="t")
    assert ingest.file_day(marked, f"_r_{_day(0)}.csv") == START


def test_the_replay_lands_files_settled(p, tmp_path):
    """Replay.land (make demo, mlops backtest) writes whole files and ticks at once."""
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / f"readings_{_day(0)}.csv").write_text(CSV)  # just written: not settled itself
    feed = Feed(p.spec.source, stage, p.spec.landing_dir)
    replay = Replay(p.spec, p.defs, p.instance, p.lake, p.tracking_uri, feeds=[feed])
    assert replay.land(START) == [f"readings_{_day(0)}.csv"]
    (landed,) = p.spec.landing_dir.iterdir()  # no temp file left behind
    assert time.time() - landed.stat().st_mtime > p.spec.source.settle_seconds
    requests, _ = replay.tick_sensor(new_data_sensor_name(p.spec))
    assert [r.partition_key for r in requests] == [_day(0)]


# --- 7. near-miss names -----------------------------------------------------------------------


def test_names_matching_no_pattern_are_listed_on_the_tick_and_in_status(p, capfd):
    landing = p.spec.landing_dir
    misses = ["readings-2026-01-13.csv", "readings_2026-13-01.csv", "Readings_2026-01-02.csv"]
    misses += [f"notes_{i:02d}.txt" for i in range(10)]
    for n in misses:
        _write(landing, n)
    _write(landing, f"readings_{_day(0)}.csv")
    _write(landing, f"{landing.name}.tmp")  # a temp name: not a near miss
    reqs, cursor, _ = _tick(p)
    assert [r.partition_key for r in reqs] == [_day(0)]
    log = capfd.readouterr().err
    shown = sorted(misses)[:10]
    assert f"{', '.join(shown)} (+3 more) match no file pattern (readings_{{date}}.csv" in log
    _, _, skip = _tick(p, cursor)
    assert "notes_08.txt (+3 more) match no file pattern" in skip

    got = _source_landing(p)
    assert got["unmatched"] == {"count": 13, "names": shown} and got["days"] == 1


def test_status_renders_the_landing_folders_skipped_files(tmp_path):
    p = make_project(tmp_path, with_mlflow=True)
    landing = p.spec.landing_dir
    landing.mkdir(parents=True)
    _write(landing, f"readings_{_day(0)}.csv")
    _write(landing, "readings-2026-01-13.csv")
    _write(landing, "readings_2025-12-31.csv")
    _write(landing, f"readings_{_day(1)}.csv", settled=False)
    s = st.status(p.spec, InstanceRuns(p.instance), p.lake, open_registry(p.tracking_uri))
    text = st.render(s)
    assert f"landing      source: 1 day(s) in {landing}" in text
    assert "1 match no file pattern, not read: readings-2026-01-13.csv" in text
    assert "1 dated before source.start_date, skipped: readings_2025-12-31.csv" in text
    assert f"1 still changing, wait for a later tick: readings_{_day(1)}.csv" in text
