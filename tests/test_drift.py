"""Drift scores on seeded synthetic frames: what drifts, what does not, sampling, limits, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mlops import drift
from mlops.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
NUMERIC = ["temp", "vibration", "pressure", "rpm"]
CATEGORICAL = ["model", "site"]
ALL = NUMERIC + CATEGORICAL


def _frame(
    n: int,
    seed: int,
    shift: dict[str, float] | None = None,
    sites: tuple[str, ...] = ("north", "south", "east"),
    pred_shift: float = 0.0,
) -> pl.DataFrame:
    """Sensor-like columns; `shift` moves a numeric column's mean by that many std."""
    rng = np.random.default_rng(seed)
    shift = shift or {}
    data: dict[str, object] = {
        c: rng.normal(10.0 * (i + 1), 2.0 * (i + 1), n) + shift.get(c, 0.0) * 2.0 * (i + 1)
        for i, c in enumerate(NUMERIC)
    }
    data["model"] = rng.choice(["A", "B", "C"], n, p=[0.5, 0.3, 0.2])
    data["site"] = rng.choice(list(sites), n)
    data["score"] = np.clip(rng.beta(2, 5, n) + pred_shift, 0.0, 1.0)
    return pl.DataFrame(data)


def _run(ref: pl.DataFrame, cur: pl.DataFrame, **kw) -> drift.DriftResult:
    kw.setdefault("numeric", NUMERIC)
    kw.setdefault("categorical", CATEGORICAL)
    return drift.compute_drift(ref, cur, **kw)


def _scores(result: drift.DriftResult) -> dict[str, float]:
    return dict(zip(result.columns["column"], result.columns["score"], strict=True))


def test_same_distribution_does_not_drift():
    result = _run(_frame(3000, 1), _frame(3000, 2), prediction_column="score")
    assert result.columns["column"].to_list() == ALL
    assert result.columns["kind"].to_list() == ["num"] * 4 + ["cat"] * 2
    assert result.columns["method"].to_list() == ["wasserstein"] * 4 + ["jensenshannon"] * 2
    assert result.columns["threshold"].to_list() == [0.1] * 6
    assert not result.columns["drifted"].any(), result.columns
    assert result.drift_share == 0.0
    assert result.dataset_drift is False
    assert result.prediction is not None and result.prediction["drifted"] is False
    assert result.skipped_columns == []
    assert "<html" in result.html and "Drift scores in the run" in result.html


def test_shifted_numeric_columns_drift_and_the_others_do_not():
    ref = _frame(3000, 1)
    cur = _frame(3000, 2, shift={"temp": 0.5, "rpm": -0.5})
    result = _run(ref, cur, share_threshold=0.3)
    drifted = dict(zip(result.columns["column"], result.columns["drifted"], strict=True))
    assert drifted == {
        "temp": True, "vibration": False, "pressure": False, "rpm": True,
        "model": False, "site": False,
    }  # fmt: skip
    # Normalized Wasserstein of a half-std mean shift is about 0.5.
    assert _scores(result)["temp"] == pytest.approx(0.5, abs=0.08)
    assert result.drift_share == pytest.approx(2 / 6)
    assert result.dataset_drift is True
    assert result.drifted_columns == ["temp", "rpm"]


def test_dataset_drift_at_exactly_the_share_threshold():
    ref, cur = _frame(2000, 1), _frame(2000, 2, shift={"temp": 1.0})
    at = _run(ref, cur, categorical=[], share_threshold=0.25)  # 1 of 4 columns
    assert at.drift_share == 0.25 and at.dataset_drift is True
    above = _run(ref, cur, categorical=[], share_threshold=0.26)
    assert above.dataset_drift is False


def test_a_new_category_drifts_its_column():
    ref = _frame(3000, 1)
    cur = _frame(3000, 2, sites=("north", "south", "east", "west"))
    result = _run(ref, cur)
    assert result.drifted_columns == ["site"]
    assert _scores(result)["site"] > 0.1
    assert _scores(result)["model"] < 0.05


def test_prediction_drift_is_reported_apart_from_the_drift_share():
    result = _run(_frame(3000, 1), _frame(3000, 2, pred_shift=0.2), prediction_column="score")
    assert result.prediction is not None
    assert result.prediction["column"] == "score"
    assert result.prediction["method"] == "wasserstein"
    assert result.prediction["drifted"] is True
    assert result.prediction["score"] > result.prediction["threshold"] == 0.1
    assert "score" not in result.columns["column"].to_list()
    assert result.drift_share == 0.0 and result.dataset_drift is False


def test_sampling_is_deterministic_and_reported():
    ref, cur = _frame(30_000, 1), _frame(12_000, 2, shift={"temp": 0.3})
    kw = {"sample_rows": 2_000, "html_rows": 500, "prediction_column": "score"}
    first, again = _run(ref, cur, **kw), _run(ref, cur, **kw)
    assert first.summary() == again.summary()
    assert (first.reference_rows, first.reference_total) == (2_000, 30_000)
    assert (first.current_rows, first.current_total) == (2_000, 12_000)
    assert first.html_rows == (500, 500)
    assert any("sampled 2,000 of 30,000 reference" in n for n in first.notes)
    other = _run(ref, cur, seed=1, **kw)
    assert _scores(other) != _scores(first)
    # A side smaller than sample_rows is used whole.
    small = _run(ref, cur.head(800), **kw)
    assert (small.current_rows, small.current_total) == (800, 800)


def test_column_limit_keeps_the_highest_priority_columns():
    ref, cur = _frame(1500, 1), _frame(1500, 2)
    order = ["site", "pressure", "temp", "unknown_feature"]
    result = _run(ref, cur, max_columns=3, column_order=order)
    assert result.columns["column"].to_list() == ["site", "pressure", "temp"]
    assert result.skipped_columns == ["vibration", "rpm", "model"]
    assert any("over the limit of 3" in n for n in result.notes)
    unordered = _run(ref, cur, max_columns=2)
    assert unordered.columns["column"].to_list() == ["temp", "vibration"]


def test_all_null_and_constant_columns_are_skipped_with_a_reason():
    ref = _frame(1500, 1).with_columns(pl.lit(1.0).alias("rpm"))
    cur = _frame(1500, 2).with_columns(
        pl.lit(1.0).alias("rpm"), pl.lit(None, dtype=pl.Float64).alias("pressure")
    )
    # Untestable columns do not take the limit's slots: model is tested, site is over.
    result = _run(ref, cur, max_columns=3)
    assert result.columns["column"].to_list() == ["temp", "vibration", "model"]
    assert result.skipped_columns == ["pressure", "rpm", "site"]
    notes = " ".join(result.notes)
    assert "pressure: no non-null values in the 1,500 sampled current rows" in notes
    assert "rpm: constant" in notes


def test_scores_equal_evidentlys_own_report():
    """On rows under html_rows the HTML runs on the scored rows, so Evidently's ValueDrift
    values must equal ours, for the numeric method, the categorical test and the prediction."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    ref = _frame(1200, 1).with_columns(
        pl.when(pl.int_range(pl.len()) % 7 == 0).then(None).otherwise(pl.col("temp")).alias("temp")
    )
    cur = _frame(1100, 2, shift={"vibration": 0.2}, sites=("north", "south", "west"))
    for method, threshold in (("wasserstein", None), ("ks", 0.01)):
        ours = _run(ref, cur, method=method, column_threshold=threshold, prediction_column="score")
        definition = DataDefinition(
            numerical_columns=[*NUMERIC, "score"], categorical_columns=CATEGORICAL
        )
        metrics = [
            ValueDrift(column=c, method=method, threshold=threshold) for c in [*NUMERIC, "score"]
        ]
        metrics += [ValueDrift(column=c, method="jensenshannon") for c in CATEGORICAL]
        snapshot = Report(metrics).run(
            Dataset.from_pandas(cur.to_pandas(), data_definition=definition),
            Dataset.from_pandas(ref.to_pandas(), data_definition=definition),
        )
        theirs = {m["config"]["column"]: m["value"] for m in snapshot.dict()["metrics"]}
        expected = {**_scores(ours), "score": ours.prediction["score"]}
        assert theirs == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert ours.html_rows == (1200, 1100)


def test_own_wasserstein_definition():
    """The wasserstein score is scipy's distance divided by the reference's std."""
    from scipy.stats import wasserstein_distance

    ref, cur = _frame(1000, 1), _frame(1000, 2, shift={"temp": 0.3})
    result = _run(ref, cur, numeric=["temp"], categorical=[])
    r, c = ref["temp"].to_numpy(), cur["temp"].to_numpy()
    assert _scores(result)["temp"] == pytest.approx(wasserstein_distance(r, c) / np.std(r))


def test_method_and_threshold_are_applied():
    ref, cur = _frame(2000, 1), _frame(2000, 2, shift={"temp": 0.3})
    strict = _run(ref, cur, column_threshold=0.5)
    assert strict.columns["threshold"].to_list() == [0.5] * 4 + [0.1] * 2  # JS keeps its default
    assert strict.drifted_columns == []
    psi = _run(ref, cur, method="psi", column_threshold=0.2)
    assert psi.columns["method"].to_list() == ["psi"] * 6  # psi applies to categoricals too
    assert psi.columns["threshold"].to_list() == [0.2] * 6


def test_summary_is_json_without_html():
    result = _run(_frame(1000, 1), _frame(1000, 2), prediction_column="score")
    summary = result.summary()
    text = json.dumps(summary)
    assert "<html" not in text
    assert summary["tested_columns"] == 6 and len(summary["columns"]) == 6
    assert set(summary["columns"][0]) == set(drift.COLUMN_SCHEMA)
    assert summary["prediction"]["column"] == "score"


def test_errors_name_the_problem():
    ref, cur = _frame(500, 1), _frame(500, 2)
    with pytest.raises(ValueError, match=r"\['rpm'\] missing from the current frame"):
        _run(ref, cur.drop("rpm"))
    with pytest.raises(ValueError, match=r"\['score'\] missing from the reference frame"):
        _run(ref.drop("score"), cur, prediction_column="score")
    with pytest.raises(ValueError, match="no rows to compare"):
        _run(ref, cur.head(0))
    with pytest.raises(ValueError, match="no rows to compare: the reference"):
        _run(ref.head(0), cur)
    with pytest.raises(ValueError, match="drift method 'nope'"):
        _run(ref, cur, method="nope")
    with pytest.raises(ValueError, match="numeric column 'site'"):
        _run(ref, cur, numeric=["site"], categorical=[])
    with pytest.raises(ValueError, match="both numeric and categorical"):
        _run(ref, cur, numeric=["temp"], categorical=["temp"])


def test_drift_config_comes_from_the_spec():
    spec = load_spec(REPO / "specs" / "machine_failure.yaml")
    m = spec.monitoring
    assert drift.drift_config(spec) == {
        "method": m.drift_method,
        "column_threshold": m.column_drift_threshold,
        "share_threshold": m.drift_threshold,
        "sample_rows": m.drift_sample_rows,
        "max_columns": m.drift_max_columns,
        "significance": m.drift_significance,
    }
    cols = drift.drift_columns(spec)
    assert set(cols["categorical"]) == set(spec.features.categorical)
    assert not set(cols["numeric"]) & set(cols["categorical"])


def test_a_distance_over_its_threshold_by_chance_on_a_small_day_is_not_drift():
    """Two samples of 300 rows from one distribution: Wasserstein can pass 0.1 by chance;
    with the significance guard (the spec default) that is not drift, a real shift is."""
    rng = np.random.default_rng(3)
    ref = pl.DataFrame({"x": rng.normal(size=300)})
    same = pl.DataFrame({"x": rng.normal(size=300)})
    shifted = pl.DataFrame({"x": rng.normal(loc=0.8, size=300)})
    kw = {"numeric": ["x"], "categorical": [], "column_threshold": 0.01}
    loose = drift.compute_drift(ref, same, **kw)
    assert loose.drift_share == 1.0  # the distance alone calls chance drift
    guarded = drift.compute_drift(ref, same, significance=0.001, **kw)
    assert guarded.drift_share == 0.0 and guarded.columns["p_value"][0] > 0.001
    real = drift.compute_drift(ref, shifted, significance=0.001, **kw)
    assert real.drift_share == 1.0 and real.columns["p_value"][0] < 1e-6
