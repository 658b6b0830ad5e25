"""Feature store: offline/online parity on SQLite and the real local Redis, the fallback
policy, concurrent server workers, and point-in-time historical retrieval."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import uuid

import polars as pl
import pytest
from click.testing import CliRunner

from cli.main import main
from mlops import features as feats
from mlops import online
from mlops.features import historical_features
from mlops.online_store import RedisOnlineStore, SQLiteOnlineStore, make_store
from mlops.spec import load_spec
from tests.conftest import make_project, require_redis, small_data

REDIS = "redis://127.0.0.1:6379/0"


def _redis_or_skip() -> None:
    require_redis()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "redis":
        _redis_or_skip()
        s = RedisOnlineStore(REDIS, prefix=f"test-{uuid.uuid4().hex[:8]}")
    else:
        s = SQLiteOnlineStore(tmp_path / "online.db")
    yield s
    s.delete_spec("machine_failure")
    s.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    p = make_project(tmp_path_factory.mktemp("fs"))
    small_data(p, days=3, machines=10, bad_rows=0.02, seed=9)
    for d in ("2026-01-01", "2026-01-02", "2026-01-03"):
        p.run_day(d)
    return p


def test_online_replay_equals_offline_features(built, store):
    """Day 3 replayed one reading at a time through the online path, over the state the
    online_features asset writes for day 2, equals the offline features of day 3."""
    p, spec = built, built.spec
    history = p.lake.read_many(spec.name, "validated_data", ["2026-01-01", "2026-01-02"])
    store.write_states(spec.name, online.states_from_rows(spec, history))
    service = online.OnlineFeatures(spec, store)
    day3 = p.lake.read(spec.name, "validated_data", "2026-01-03")
    offline = p.lake.read(spec.name, "features", "2026-01-03")
    names = feats.feature_names(spec)
    by_key = {(r["machine_id"], r["timestamp"]): r for r in offline.iter_rows(named=True)}
    worst = 0.0
    for reading in day3.sort("timestamp").iter_rows(named=True):
        got = service.get(reading["machine_id"], reading)
        assert got.fallback is None
        want = by_key[(reading["machine_id"], reading["timestamp"])]
        for n in names:
            a, b = got.features[n], want[n]
            if isinstance(b, str) or b is None or a is None:
                assert a == b, (n, a, b)
            else:
                worst = max(worst, abs(a - b))
    assert worst <= 1e-9
    assert service.counts["served"] == day3.height
    # The state stays bounded: the longest window plus the newest row before it.
    st = store.get_state(spec.name, "M0001")
    assert st.as_of == day3.filter(pl.col("machine_id") == "M0001")["timestamp"].max()
    assert len(st.rows) <= 26


def test_unknown_entity_gets_the_fallback_policy_never_a_default(built, store):
    spec = built.spec
    reading = built.lake.read(spec.name, "validated_data", "2026-01-03").row(0, named=True)
    strict = online.OnlineFeatures(spec, store, fallback="reject")
    with pytest.raises(online.FeatureRejected, match="unknown entity"):
        strict.get("M9999", reading)
    assert strict.counts["rejected"] == 1 and strict.counts["fallback_unknown_entity"] == 1
    assert store.get_state(spec.name, "M9999") is None  # a rejected reading is not stored
    lenient = online.OnlineFeatures(spec, store, fallback="reading_only")
    got = lenient.get("M9999", reading)
    assert got.fallback and "unknown entity" in got.fallback
    assert got.features["temperature"] == reading["temperature"]
    assert got.features["temperature_std_6h"] is None  # one reading: no spread, not 0
    # The module-level entry point applies the spec's policy (reject by default).
    with pytest.raises(online.FeatureRejected, match="M7777"):
        online.get_online_features(spec, "M7777", reading, store_url=_url(store))
    # Stale state: the next reading a week later is flagged too.
    later = {**reading, "timestamp": reading["timestamp"] + dt.timedelta(days=7)}
    assert "stale state" in lenient.get("M9999", later).fallback


def _url(store) -> str:
    if isinstance(store, SQLiteOnlineStore):
        return f"sqlite:///{store.path}"
    return REDIS


def _worker(url: str, spec_path: str, offset: int, n: int) -> None:
    spec = load_spec(spec_path)
    service = online.OnlineFeatures(spec, make_store(url), fallback="reading_only")
    t0 = dt.datetime(2026, 1, 5)
    for i in range(n):
        minute = 2 * i + offset  # the two workers interleave in time
        service.get(
            "M0001",
            {
                "timestamp": t0 + dt.timedelta(minutes=minute),
                "machine_id": "M0001",
                "machine_type": "A",
                "firmware": "1.0",
                "temperature": 50.0 + i,
                "vibration": 1.0,
                "pressure": 100.0,
                "rpm": 1000.0,
                "voltage": 220.0,
            },
        )


def test_two_server_workers_lose_no_reading_in_sqlite(tmp_path):
    p = make_project(tmp_path)
    url = f"sqlite:///{tmp_path / 'online.db'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(url, str(p.spec.path), k, 150)) for k in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    state = make_store(url).get_state(p.spec.name, "M0001")
    assert len(state.rows) == 300  # 300 readings over 10 h: all inside the 24 h window
    assert [r["ts"] for r in state.rows] == sorted(r["ts"] for r in state.rows)


def test_historical_features_are_point_in_time(built, tmp_path):
    p, spec = built, built.spec
    f3 = p.lake.read(spec.name, "features", "2026-01-03")
    row = f3.filter(pl.col("machine_id") == "M0003").row(5, named=True)
    points = pl.DataFrame(
        {
            "machine_id": ["M0003", "M0003", "M0003", "M9999"],
            "timestamp": [
                row["timestamp"],
                row["timestamp"] + dt.timedelta(minutes=30),
                dt.datetime(2025, 12, 1),
                row["timestamp"],
            ],
        }
    )
    out = historical_features(spec, p.lake, points)
    assert out["temperature"][0] == row["temperature"] == out["temperature"][1]
    assert out["feature_time"][1] == row["timestamp"]  # the latest at or before, not after
    assert out["feature_time"][2] is None and out["feature_time"][3] is None
    # A feature row recorded later in the lake cannot change an earlier answer.
    late = (
        f3.filter(pl.col("machine_id") == "M0003")
        .tail(1)
        .with_columns(
            pl.lit(dt.datetime(2026, 1, 3, 23, 59, 59)).cast(pl.Datetime("us")).alias("timestamp"),
            pl.lit(999.0).alias("temperature"),
        )
    )
    p.lake.write(spec.name, "features", pl.concat([f3, late]).sort("timestamp"), "2026-01-03")
    try:
        again = historical_features(spec, p.lake, points)
        assert again.head(3).equals(out.head(3))
    finally:
        p.lake.write(spec.name, "features", f3, "2026-01-03")
    # The CLI over a CSV of (entity, timestamp).
    src = tmp_path / "entities.csv"
    points.write_csv(src)
    env = {
        "MLOPS_SPECS_DIR": str(p.root / "specs"),
        "MLOPS_LAKE_URL": str(p.lake.base_url),
        "MLOPS_ONLINE_STORE_URL": f"sqlite:///{p.root / '.mlops' / 'online.db'}",
    }
    runner = CliRunner(env=env)
    res = runner.invoke(
        main,
        [
            "features",
            "historical",
            "--spec",
            spec.name,
            "--entities",
            str(src),
            "--out",
            str(tmp_path / "o.parquet"),
        ],
    )
    assert res.exit_code == 0, res.output
    got = pl.read_parquet(tmp_path / "o.parquet")
    assert got["temperature"].to_list()[:2] == [row["temperature"]] * 2
    stats = runner.invoke(main, ["features", "online-stats", "--spec", spec.name])
    assert stats.exit_code == 0 and "entities     10" in stats.output


def test_online_features_asset_never_moves_state_back(built):
    spec = built.spec
    store = make_store(f"sqlite:///{built.root / '.mlops' / 'online.db'}")
    before = store.get_state(spec.name, "M0002").as_of
    assert before.date() == dt.date(2026, 1, 3)
    machines = sorted(built.lake.read(spec.name, "validated_data", "2026-01-03")["machine_id"])
    states, stats = store.get_states(spec.name, machines), store.stats(spec.name)
    assert sorted(states) == sorted(set(machines)) and stats.entities == len(states)
    assert stats.bytes > 0 and stats.newest_as_of.date() == dt.date(2026, 1, 3)
    built.run_day("2026-01-02")  # an older day re-materialized
    # Nothing rewritten: every entity's rows and as_of, and the stored payload bytes, as before.
    assert store.get_states(spec.name, machines) == states
    assert store.stats(spec.name) == stats
    assert store.get_state(spec.name, "M0002").as_of == before
