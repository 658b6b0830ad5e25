"""mlops.monitoring on small frames: realized performance, served rows, the retraining rules."""

import datetime as dt
import json

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


def test_a_gap_breaks_the_consecutive_run():
    obs = _obs([0.9]) + _obs([0.9], start=2)  # day 1 missing
    d = monitoring.decide(monitoring.DRIFT, obs, 2, 7, None, set())
    assert not d.retrain and "1/2" in d.reason


def test_decision_tags_carry_reason_and_evidence():
    d = monitoring.decide(monitoring.DRIFT, _obs([0.5, 0.6]), 2, 7, None, set())
    assert d.retrain and d.episode == "drift:v1:2026-01-01"
    tags = d.tags(SPEC)
    assert tags[monitoring.TAG_TRIGGER] == "drift" and tags[monitoring.TAG_SPEC] == SPEC.name
    assert json.loads(tags[monitoring.TAG_EVIDENCE])["values"] == [0.5, 0.6]
