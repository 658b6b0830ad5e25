"""The closed-loop benchmark's known-truth streams (bench/streams) and its reading of a
backtest's JSON; the backtest itself runs in bench/closed_loop.py, not here (minutes)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from bench import closed_loop
from bench.streams import FEATURES, STREAMS, TARGET, Stream, generate, write_project
from mlops import ingest, validation
from mlops.spec import load_spec


def _corr(frame: pl.DataFrame, column: str) -> float:
    return float(np.corrcoef(frame[column].to_numpy(), frame[TARGET].to_numpy())[0, 1])


def _halves(s: Stream) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The regimes: the days before the onset, and those after the change has settled."""
    return s.rows(0, s.onset), s.rows(s.onset + 8, s.n_days)


@pytest.mark.parametrize("name", STREAMS)
def test_deterministic_for_a_seed(name):
    a, b, other = generate(name, seed=7), generate(name, seed=7), generate(name, seed=8)
    assert a.n_days == 45 and a.onset == 30 and a.build_days == 20
    assert all(x.equals(y) for x, y in zip(a.days, b.days, strict=True))
    assert not a.days[0].equals(other.days[0])
    for i, day in enumerate(a.days):
        assert 400 <= len(day) <= 1500
        assert day["timestamp"].is_sorted()
        assert day["timestamp"].dt.date().unique().to_list() == [a.date(i)]
        assert set(day[TARGET].unique()) == {0, 1}


def test_control_does_not_change():
    before, after = _halves(generate("control", seed=1))
    for f in FEATURES:
        assert abs(before[f].mean() - after[f].mean()) < 0.05
        assert abs(before[f].std() - after[f].std()) < 0.05
        assert abs(_corr(before, f) - _corr(after, f)) < 0.05
    assert abs(before[TARGET].mean() - after[TARGET].mean()) < 0.03


def test_concept_change_keeps_the_inputs_and_changes_the_rule():
    from scipy.stats import ks_2samp

    before, after = _halves(generate("concept_abrupt", seed=1))
    for f in FEATURES:
        assert ks_2samp(before[f].to_numpy(), after[f].to_numpy()).pvalue > 0.001, f
    assert _corr(before, "x1") > 0.4 and _corr(after, "x1") < -0.4  # x1's effect flips
    assert abs(_corr(before, "x3")) < 0.05 and _corr(after, "x3") > 0.2  # x3 takes over
    assert abs(before[TARGET].mean() - after[TARGET].mean()) < 0.03


def test_covariate_shift_moves_the_inputs_under_one_rule():
    s = generate("covariate_shift", seed=1)
    before, after = _halves(s)
    assert before["x1"].mean() > 1.3 and after["x1"].mean() < -1.3
    for f in ("x2", "x3"):
        assert abs(before[f].mean() - after[f].mean()) < 0.05
    # one rule: x2 drives the label where x1 > 0, x3 where x1 < 0
    assert _corr(before, "x2") > 0.4 and abs(_corr(before, "x3")) < 0.05
    assert _corr(after, "x3") > 0.4 and abs(_corr(after, "x2")) < 0.05


def test_gradual_drift_rotates_over_days():
    s = generate("gradual", seed=1)
    x1 = [_corr(s.days[i], "x1") for i in range(s.n_days)]
    x2 = [_corr(s.days[i], "x2") for i in range(s.n_days)]
    assert min(x1[: s.onset]) > 0.45 and max(np.abs(x2[: s.onset])) < 0.12
    assert max(np.abs(x1[s.onset + 8 :])) < 0.12 and min(x2[s.onset + 8 :]) > 0.45
    mid = s.onset + 4  # halfway through the rotation both matter
    assert 0.25 < x1[mid] < np.mean(x1[: s.onset]) - 0.15 and 0.25 < x2[mid] < 0.6
    assert np.mean(x1[s.onset + 1 : s.onset + 3]) < np.mean(x1[: s.onset]) - 0.02


@pytest.mark.parametrize("name", STREAMS)
def test_projects_load_and_validate(tmp_path, name):
    s = generate(name, seed=2, days=24, onset=16, build_days=10)
    spec = load_spec(write_project(s, tmp_path))
    assert spec.name == name and spec.root == tmp_path
    assert spec.labels.kind == "column" and spec.labels.column == TARGET
    assert spec.source.entity_column == ("machine_id" if s.entity else None)
    assert spec.monitoring.retraining_schedule is None
    assert [c.estimator for c in spec.model.candidates] == ["xgboost", "logistic_regression"]
    assert len(list(spec.landing_dir.glob("readings_*.csv"))) == 24
    day = s.date(3)
    frame = ingest.load_day(spec.source, spec.landing_dir, day).frame
    result = validation.validate(spec, frame, day)
    assert result.quarantine.height == 0 and result.valid.height == len(s.days[3])


def test_streams_cover_both_entity_shapes():
    entity = {generate(n).entity for n in STREAMS}
    assert entity == {True, False}
    assert [generate(n).changes for n in STREAMS].count(False) == 1  # the control


def test_loop_summary_reads_the_backtest_contract():
    s = generate("concept_abrupt", seed=0)
    day = s.date

    def row(i: int, version: int, auc: float | None) -> dict:
        realized = None if auc is None else {"roc_auc": auc, "accuracy": auc - 0.1, "f1": 0.5}
        return {
            "day": str(day(i)),
            "champion_version": version,
            "realized": realized,
            "drift_share": 0.0,
            "events": [],
        }

    backtest = {
        "spec": s.name,
        "days": [
            row(i, 1 if i < 34 else 3, None if i == 40 else (0.9 if i < 30 or i >= 34 else 0.2))
            for i in range(s.build_days, s.n_days)
        ],
        "retrainings": [
            {"day": str(day(33)), "trigger": "schedule", "version": 3, "outcome": "promoted"},
            {"day": str(day(25)), "trigger": "drift", "version": 1, "outcome": "refused"},
            {"day": str(day(31)), "trigger": "metric_decline", "version": 2, "outcome": "refused"},
        ],
    }
    loop = closed_loop.loop_summary(s, backtest)
    assert loop["first_trigger_lag_days"] == 1 and loop["first_trigger"] == "metric_decline"
    assert loop["first_promoted_lag_days"] == 3
    assert loop["new_champion_scoring_lag_days"] == 4
    assert (loop["retrainings_before_onset"], loop["retrainings_total"]) == (1, 3)
    assert loop["post_change_days"] == 10 and loop["post_change_days_with_labels"] == 9
    assert loop["post_change"] == pytest.approx({"roc_auc": 0.9, "accuracy": 0.8})
    assert [c["version"] for c in loop["champions"]] == [1, 3]
    base = {"oracle": {"roc_auc": 0.92}, "never_retrain": {"roc_auc": 0.2}}
    g = closed_loop.goals(s, loop, base)
    assert g == {
        "trigger_within_2_days": True,
        "promoted_within_4_days": True,
        "no_retraining_before_onset": False,
        "no_retraining_in_control": None,
        "post_change_95pct_of_oracle": True,
    }
    assert dt.date.fromisoformat(loop["champions"][1]["from"]) == day(34)
