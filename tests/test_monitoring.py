"""mlops.monitoring on small frames: realized performance, served rows, the retraining rules."""

import datetime as dt
import json

import numpy as np
import polars as pl
import pytest

from mlops import monitoring
from mlops.labels import MATURE
from mlops.spec import load_spec
from tests.conftest import REPO

SPEC = load_spec(REPO / "specs" / "machine_failure.yaml")
T0 = dt.datetime(2026, 2, 1)


def _preds(scores, version=1):
    n = len(scores)
    return pl.DataFrame(
        {
            "machine_id": [f"m{i % 4}" for i in range(n)],
            "timestamp": [T0 + dt.timedelta(hours=i) for i in range(n)],
            "score": scores,
            "decision": [float(s >= 0.5) for s in scores],
            "model_version": [version] * n,
        }
    )


def _labels(ys, mature=True):
    n = len(ys)
    return pl.DataFrame(
        {
            "machine_id": [f"m{i % 4}" for i in range(n)],
            "timestamp": [T0 + dt.timedelta(hours=i) for i in range(n)],
            "failure_24h": ys,
            MATURE: [mature] * n,
        }
    )


def test_realized_performance_against_the_baseline():
    ys = [0, 1] * 20
    good = monitoring.realized_performance(
        SPEC, _preds([0.1, 0.9] * 20), _labels(ys), None, baseline=0.9, threshold=0.5
    )
    assert good.realized == pytest.approx(1.0) and not good.declined
    assert good.rows_labelled == 40 and good.model_versions == [1]
    bad = monitoring.realized_performance(
        SPEC, _preds([0.9, 0.1] * 20), _labels(ys), None, baseline=0.9, threshold=0.5
    )
    assert bad.realized == pytest.approx(0.0) and bad.declined
    immature = monitoring.realized_performance(
        SPEC, _preds([0.1, 0.9] * 20), _labels(ys, mature=False), None, 0.9, 0.5
    )
    assert immature.rows_labelled == 0 and immature.realized is None and not immature.declined


def test_declined_is_strictly_beyond_the_tolerance():
    tol = SPEC.monitoring.metric_decline_tolerance
    assert not monitoring.declined(SPEC, 0.9 - tol, 0.9)
    assert monitoring.declined(SPEC, 0.9 - tol - 0.001, 0.9)
    assert not monitoring.declined(SPEC, None, 0.9)


def test_served_rows_read_like_batch_predictions_with_their_features():
    log = pl.DataFrame(
        {
            "entity": ["m1", "m1", "m2"],
            "event_time": [T0, T0, T0 + dt.timedelta(hours=1)],
            "route": ["champion", "shadow", "champion"],
            "score": [0.2, 0.3, 0.8],
            "decision": [0.0, 0.0, 1.0],
            "model_version": [3, 4, 3],
            "features": [json.dumps({"temperature": 70.0, "machine_type": "A"})] * 3,
        }
    )
    rows = monitoring.served_rows(SPEC, log)
    assert rows.columns == [
        "machine_id",
        "timestamp",
        "score",
        "decision",
        "model_version",
        "temperature",
        "machine_type",
    ]
    assert rows["score"].to_list() == [0.2, 0.8]  # the shadow's answers are not what was served
    assert monitoring.served_rows(SPEC, log.filter(pl.col("route") == "x")).height == 0


def _obs(values, start=0, champion=1, limit=0.3):
    return [
        monitoring.Observation(
            (dt.date(2026, 1, 1) + dt.timedelta(days=start + i)).isoformat(),
            v > limit,
            v,
            limit,
            champion,
        )
        for i, v in enumerate(values)
    ]


def test_a_monitored_day_below_the_threshold_breaks_the_consecutive_run():
    obs = _obs([0.9, 0.1, 0.9])
    d = monitoring.decide_retraining(monitoring.DRIFT, obs, 2, 7, None, {})
    assert not d.retrain and "1/2" in d.reason


def test_decision_tags_carry_reason_and_evidence():
    d = monitoring.decide_retraining(monitoring.DRIFT, _obs([0.5, 0.6]), 2, 7, None, {})
    assert d.retrain and d.episode == "drift:v1:2026-01-01"
    tags = d.tags(SPEC)
    assert tags[monitoring.TAG_TRIGGER] == "drift" and tags[monitoring.TAG_SPEC] == SPEC.name
    assert json.loads(tags[monitoring.TAG_EVIDENCE])["values"] == [0.5, 0.6]


# --- every built day is scored and evaluated (follow the data) ------------------------------


def _column_spec(maturity: str = "24h"):
    import yaml

    from mlops.spec import Spec

    data = yaml.safe_load(
        f"""
name: flat
source: {{path: data, file_pattern: "d_{{date}}.csv", timestamp_column: ts,
          start_date: "2026-01-01"}}
schema: {{columns: [{{name: ts, type: timestamp}}, {{name: x, type: float}},
                   {{name: y, type: int}}]}}
labels: {{kind: column, column: y, maturity: {maturity}}}
features: {{lookback_days: 0, passthrough: [x]}}
model: {{candidates: [{{estimator: logistic_regression}}]}}
"""
    )
    return Spec.model_validate(data)


def _d(i: int) -> str:
    return (dt.date(2026, 1, 1) + dt.timedelta(days=i)).isoformat()


def test_without_a_champion_only_labels_follow_the_data():
    spec = _column_spec("24h")
    days = [_d(i) for i in range(4)]
    out = monitoring.follow_ups(
        spec,
        start=None,
        features=days,
        scored=set(),
        labelled=days,
        mature=set(),
        performed=set(),
        data_through=days[-1],
    )
    # 24h maturity: day 3's labels wait for day 4's data; nothing is scored without a champion.
    assert [(f.kind, f.partition) for f in out] == [("labels", d) for d in days[:3]]


def test_every_day_after_the_first_champion_is_scored_then_evaluated_late_days_included():
    spec = _column_spec("0h")
    days = [_d(i) for i in range(8)]
    late = _d(3)  # landed after day 7: it is scored as any other
    out = monitoring.follow_ups(
        spec,
        start=_d(2),  # the first champion trained on days 0-2: in-sample, not monitored
        features=days,
        scored={_d(4), _d(5), _d(6)},
        labelled=days,
        mature=set(days),
        performed={_d(4)},
        data_through=days[-1],
        busy={_d(7)},  # a run on day 7 is in flight: wait for it
    )
    got = {(f.kind, f.partition) for f in out}
    assert got == {("score", late), ("performance", _d(5)), ("performance", _d(6))}


def test_column_label_maturity_follows_the_data_clock_not_the_wall_clock():
    spec = _column_spec("48h")
    assert not monitoring.label_due(spec, _d(0), _d(1))
    assert monitoring.label_due(spec, _d(0), _d(2))
    assert not monitoring.label_due(spec, _d(0), None)


def test_a_refusal_rearms_after_more_breached_days_and_a_gap_does_not_split_the_episode():
    obs = _obs([0.9, 0.9]) + _obs([0.9, 0.9, 0.9], start=3)  # day 2 has no observation
    episode = "drift:v1:2026-01-01"
    first = monitoring.decide_retraining(monitoring.DRIFT, obs[:2], 2, 7, None, {})
    assert first.retrain and first.episode == episode and first.change_point == "2026-01-01"
    # Refused at day 2 (observed 2026-01-02): one more breached day re-arms it.
    d = monitoring.decide_retraining(
        monitoring.DRIFT, obs[:3], 2, 7, "2026-01-02", {episode: [["2026-01-02", ""]]}
    )
    assert d.retrain and d.attempt == 2 and d.run_key == f"{episode}#2"
    assert d.episode == episode, "the missing day did not start a new episode"


def test_the_cooldown_only_delays_a_new_episode_not_a_retry():
    obs = _obs([0.9, 0.9, 0.9])
    ep = "drift:v1:2026-01-01"
    retry = monitoring.decide_retraining(
        monitoring.DRIFT, obs, 2, 7, "2026-01-02", {ep: ["2026-01-02"]}
    )
    assert retry.retrain and retry.attempt == 2
    fresh = monitoring.decide_retraining(monitoring.DRIFT, obs, 2, 7, "2026-01-02", {})
    assert not fresh.retrain and "cooldown" in fresh.reason


def test_a_decline_within_chance_on_a_small_day_is_not_a_breach():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.1).astype(int)  # a small day: 30 positives
    pred = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    se = monitoring.standard_error("binary_classification", "roc_auc", y, pred, None)
    assert 0.01 < se < 0.1
    # Rows of one entity move together: resampling entities sees more spread than rows.
    groups = np.repeat(np.arange(10), 30)
    clustered = np.clip(pred + np.repeat(rng.normal(0, 0.3, 10), 30) * y, 0, 1)
    by_row = monitoring.standard_error("binary_classification", "roc_auc", y, clustered, None)
    by_entity = monitoring.standard_error(
        "binary_classification", "roc_auc", y, clustered, None, groups
    )
    assert by_entity > by_row
    # 0.80 against a 0.90 baseline, tolerance 0.05: below the line, but within chance.
    assert monitoring.declined(SPEC, 0.80, 0.90)
    assert not monitoring.declined(SPEC, 0.80, 0.90, se=0.05)
    assert monitoring.declined(SPEC, 0.60, 0.90, se=0.05)  # far below: a real decline
    bootstrap = monitoring.standard_error("binary_classification", "accuracy", y, pred, 0.5)
    assert bootstrap is not None and bootstrap > 0


def test_the_threshold_gate_does_not_hold_back_a_fix_the_champion_is_worse_than():
    from mlops import promotion

    doc = {
        "primary_metric": "roc_auc",
        "challenger": {"metrics": {"roc_auc": 0.70, "pr_auc": 0.5}},
        "champion": {"version": 1, "metrics": {"roc_auc": 0.58, "pr_auc": 0.4}},
    }
    gate = promotion.threshold_gate(SPEC, doc)  # the embedded spec asks roc_auc >= 0.75
    assert gate.passed and "misses it too" in gate.reason
    doc["champion"]["metrics"]["roc_auc"] = 0.80  # the champion meets the bar: no waiver
    assert not promotion.threshold_gate(SPEC, doc).passed
    doc["champion"] = None  # the first model: the bar holds
    assert not promotion.threshold_gate(SPEC, doc).passed
