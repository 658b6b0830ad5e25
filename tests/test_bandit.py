"""Bandit routing: Thompson sampling on the feedback reward converges to the better arm,
keeps its exploration floor, and every worker reading the same files agrees."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from mlops.feedback import FeedbackWriter
from mlops.inference_log import InferenceLogWriter, compare_routes, read_day
from serving.bandit import Bandit, Reward

CHAMPION, CHALLENGER = 3, 7
DAY = dt.datetime(2026, 1, 4)


def _simulate(
    tmp_path, truth: dict[int, float], rounds: int, seed: int = 1
) -> tuple[Bandit, list[int]]:
    """`rounds` requests routed by the bandit; each arm decides correctly with its `truth`
    probability; a technician labels every reading (feedback), read every 20 requests."""
    log = InferenceLogWriter(tmp_path)
    fed = FeedbackWriter(tmp_path)
    bandit = Bandit(tmp_path, "binary_classification", Reward(), floor=0.05, seed=seed)
    rng = random.Random(seed + 100)
    routed = []
    for i in range(rounds):
        version, info = bandit.choose(CHAMPION, CHALLENGER)
        routed.append(version)
        label = rng.random() < 0.3
        decision = label if rng.random() < truth[version] else not label
        log.write(
            [
                {
                    "request_id": f"r{i}",
                    "record": 0,
                    "time": dt.datetime.now(dt.UTC).isoformat(),
                    "event_time": (DAY + dt.timedelta(seconds=i)).isoformat(),
                    "entity": f"M{i % 7}",
                    "route": "champion" if version == CHAMPION else "canary",
                    "model_version": version,
                    "status": 200,
                    "latency_ms": 1.0,
                    "score_ms": 0.1,
                    "outputs": {"score": 0.9 if decision else 0.1, "decision": int(decision)},
                    "bandit": info,
                }
            ]
        )
        fed.append(
            [{"request_id": f"r{i}", "record": None, "entity": None, "event_time": None,
              "label": float(label)}],
            "api",
        )  # fmt: skip
        if i % 20 == 19:
            bandit.refresh()
    bandit.refresh()
    log.close()
    fed.close()
    return bandit, routed


@pytest.mark.parametrize("better", [CHALLENGER, CHAMPION])
def test_traffic_converges_to_the_truly_better_arm_above_the_floor(tmp_path, better):
    worse = CHAMPION if better == CHALLENGER else CHALLENGER
    bandit, routed = _simulate(tmp_path, {better: 0.85, worse: 0.6}, rounds=2500)
    tail = routed[-1000:]
    share = tail.count(better) / len(tail)
    assert share >= 0.85, share
    # The floor: the worse arm still gets about `floor` of the traffic (5 %), never nothing.
    assert tail.count(worse) >= 20
    arms = bandit.state()["arms"]
    assert arms[str(better)]["mean"] == pytest.approx(0.85, abs=0.05)
    assert arms[str(better)]["mean"] > arms[str(worse)]["mean"]
    assert sum(a["rewarded"] for a in arms.values()) == 2500
    assert sum(a["pulls"] for a in arms.values()) == 2500


def test_every_worker_reading_the_same_files_has_the_same_posteriors(tmp_path):
    bandit, _ = _simulate(tmp_path, {CHAMPION: 0.7, CHALLENGER: 0.5}, rounds=300)
    other = Bandit(tmp_path, "binary_classification", Reward(), floor=0.05, seed=99)
    assert other.refresh() == 300
    assert other.state()["arms"] == bandit.state()["arms"]
    # A correction of an already rewarded reading is counted, not rewarded again.
    fed = FeedbackWriter(tmp_path)
    fed.append(
        [{"request_id": "r0", "record": None, "entity": None, "event_time": None, "label": 1.0}],
        "api",
    )
    fed.close()
    before = other.state()["arms"]
    assert other.refresh() == 0
    assert other.state()["arms"] == before and other.state()["corrections_ignored"] == 1


def test_the_route_comparison_reports_each_arms_posterior(tmp_path):
    _, routed = _simulate(tmp_path, {CHAMPION: 0.8, CHALLENGER: 0.55}, rounds=200)
    table = compare_routes(read_day(tmp_path, DAY.date()))
    rows = {r["model_version"]: r for r in table.to_dicts()}
    assert rows[CHAMPION]["count"] == routed.count(CHAMPION)
    for row in rows.values():
        assert row["posterior_alpha"] > 1 and row["posterior_beta"] > 1
        assert row["posterior_mean"] == pytest.approx(
            row["posterior_alpha"] / (row["posterior_alpha"] + row["posterior_beta"])
        )
        assert 0 < row["explored"] < row["count"]


def test_rewards_follow_the_table_and_the_tolerance():
    costly_miss = Reward(tp=1.0, tn=0.8, fp=0.5, fn=0.0)
    assert costly_miss.of("binary_classification", 1, 0.9, 1.0) == 1.0
    assert costly_miss.of("binary_classification", 0, 0.2, 1.0) == 0.0
    assert costly_miss.of("binary_classification", 1, 0.9, 0.0) == 0.5
    assert costly_miss.of("binary_classification", 0, 0.1, 0.0) == 0.8
    close = Reward(tolerance=2.0)
    assert close.of("regression", None, 10.0, 11.5) == 1.0
    assert close.of("regression", None, 10.0, 12.5) == 0.0
    assert Reward().of("regression", None, 10.0, 10.0) is None  # no tolerance, no reward
    with pytest.raises(ValueError, match="floor"):
        Bandit("/nonexistent", "binary_classification", Reward(), floor=0.6)
