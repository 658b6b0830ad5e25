"""Evaluation functions on small hand-made and seeded synthetic predictions."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mlops import evaluation as ev

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Hand-made: 10 rows, one score exactly on the 0.5 threshold (a predicted positive).
Y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.9, 0.2, 0.65, 0.3, 0.05])


def _classification_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=n)
    return pd.DataFrame({"y": (rng.uniform(size=n) < p).astype(int), "p": p})


def _regression_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.normal(10, 3, size=n)
    return pd.DataFrame({"y": y, "p": y + rng.normal(0, 1, size=n)})


def test_classification_metrics_match_sklearn_on_hand_made_example():
    m = ev.classification_metrics(Y, P, threshold=0.5)
    labels = (P >= 0.5).astype(int)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 0, 0]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y, P))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(Y, P))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, labels))
    assert m["recall"] == pytest.approx(skm.recall_score(Y, labels))
    assert m["precision"] == pytest.approx(skm.precision_score(Y, labels))
    assert m["log_loss"] == pytest.approx(skm.log_loss(Y, P))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(Y, P))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, labels))
    assert m["positive_rate"] == pytest.approx(0.5)
    assert m["predicted_positive_rate"] == pytest.approx(0.4)
    assert m["threshold"] == 0.5
    assert m["n"] == 10
    assert set(m) == {
        "roc_auc", "pr_auc", "f1", "recall", "precision", "log_loss", "brier", "accuracy",
        "positive_rate", "predicted_positive_rate", "threshold", "n",
    }  # fmt: skip


def test_log_loss_clips_certain_wrong_predictions():
    y, p = np.array([1, 0, 1]), np.array([0.0, 1.0, 0.9])
    m = ev.classification_metrics(y, p, threshold=0.5)
    assert math.isfinite(m["log_loss"])
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)))
    assert m["log_loss"] > 20  # two confident mistakes dominate


def test_regression_metrics_match_sklearn():
    y = np.array([3.0, -0.5, 2.0, 7.0, 4.2])
    yhat = np.array([2.5, 0.0, 2.0, 8.0, 3.9])
    m = ev.regression_metrics(y, yhat)
    assert m["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, yhat)))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, yhat))
    assert m["r2"] == pytest.approx(skm.r2_score(y, yhat))
    assert m["n"] == 5


def test_metrics_dispatches_by_task_and_defaults_the_threshold():
    assert ev.metrics("binary_classification", Y, P) == ev.classification_metrics(Y, P, 0.5)
    assert ev.metrics("binary_classification", Y, P, 0.3)["threshold"] == 0.3
    assert ev.metrics("regression", [1.0, 2.0], [1.0, 3.0]) == ev.regression_metrics(
        np.array([1.0, 2.0]), np.array([1.0, 3.0])
    )
    with pytest.raises(ValueError, match="unknown model task 'multiclass'"):
        ev.metrics("multiclass", Y, P)


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1, 1], [0.2, 0.7], "3 labels but 2 predictions"),
        ([0, 2], [0.2, 0.7], "labels must be 0 or 1"),
        ([0, 1], [0.2, 1.7], r"probabilities in \[0, 1\]"),
        ([0, 1], [0.2, np.nan], "NaN"),
        ([], [], "no rows"),
    ],
)
def test_bad_classification_inputs_say_what_is_wrong(y, p, message):
    with pytest.raises(ValueError, match=message):
        ev.classification_metrics(np.array(y), np.array(p), 0.5)


def _brute_force_threshold(y: np.ndarray, p: np.ndarray) -> tuple[float, Fraction]:
    """Every distinct score as the threshold, exact F1; ties go to the higher threshold."""
    scored = []
    for t in np.unique(p):
        pred = p >= t
        tp = int((pred & (y == 1)).sum())
        fp = int((pred & (y == 0)).sum())
        fn = int((~pred & (y == 1)).sum())
        scored.append((Fraction(2 * tp, 2 * tp + fp + fn), float(t)))
    best = max(f1 for f1, _ in scored)
    return max(t for f1, t in scored if f1 == best), best


@pytest.mark.parametrize("seed", range(8))
def test_threshold_maximizes_validation_f1(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    # Rounded scores so that many rows share a score and several thresholds tie.
    p = np.round(rng.beta(2, 3, size=n), 2)
    y = (rng.uniform(size=n) < p).astype(int)
    y[:2] = [0, 1]
    expected, best_f1 = _brute_force_threshold(y, p)
    chosen = ev.choose_threshold(y, p)
    assert chosen == expected
    assert skm.f1_score(y, p >= chosen) == pytest.approx(float(best_f1))


def test_threshold_ties_go_to_the_higher_threshold():
    # Thresholds 0.9 (2/2+0+1) and 0.6 (4/4+2+0) both give F1 = 2/3; 0.1 gives 4/7.
    y = np.array([1, 0, 0, 1, 0])
    p = np.array([0.9, 0.6, 0.6, 0.6, 0.1])
    assert ev.choose_threshold(y, p) == 0.9


@pytest.mark.parametrize("label", [0, 1])
def test_threshold_is_half_for_one_class(label):
    assert ev.choose_threshold(np.full(5, label), np.linspace(0.1, 0.9, 5)) == 0.5


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_auc_without_raising_or_warning(label):
    y = np.full(6, label)
    p = np.array([0.1, 0.2, 0.4, 0.6, 0.8, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ev.classification_metrics(y, p, threshold=0.5)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    others = {k: v for k, v in m.items() if k not in ("roc_auc", "pr_auc")}
    assert all(math.isfinite(v) for v in others.values()), others
    assert m["positive_rate"] == label


def test_slice_metrics_groups_values_applies_min_rows_and_collects_nulls():
    rng = np.random.default_rng(3)
    site = ["b"] * 40 + ["a"] * 35 + [None] * 30 + [np.nan] * 5 + ["c"] * 10
    n = len(site)
    p = rng.uniform(size=n)
    frame = pd.DataFrame(
        {
            "site": site,
            "shift": [1.0, 2.0] * (n // 2),
            "y": (rng.uniform(size=n) < p).astype(int),
            "p": p,
        },
        index=[0] * n,  # a repeated index must not change the groups
    )
    out = ev.slice_metrics(
        "binary_classification", frame, "y", "p", ["site", "shift"], threshold=0.4, min_rows=30
    )
    assert list(out) == ["shift", "site"]
    assert list(out["site"]) == ["<null>", "a", "b", "c"]
    assert list(out["shift"]) == ["1.0", "2.0"]
    assert out["site"]["c"] == {"n": 10, "insufficient": 1.0}
    assert out["site"]["<null>"]["n"] == 35  # None and NaN are one group
    for value, mask in [("a", frame["site"] == "a"), ("<null>", frame["site"].isna())]:
        rows = frame[mask.to_numpy()]
        assert out["site"][value] == ev.metrics(
            "binary_classification", rows["y"].to_numpy(), rows["p"].to_numpy(), 0.4
        )
        assert "insufficient" not in out["site"][value]
    assert sum(m["n"] for m in out["site"].values()) == n


def test_slice_metrics_regression_and_a_missing_column():
    frame = _regression_frame(60, seed=1).assign(region=["north", "south", "east"] * 20)
    out = ev.slice_metrics("regression", frame, "y", "p", ["region"], min_rows=20)
    assert set(out["region"]) == {"east", "north", "south"}
    assert set(out["region"]["east"]) == {"rmse", "mae", "r2", "n"}
    with pytest.raises(KeyError, match="'plant'"):
        ev.slice_metrics("regression", frame, "y", "p", ["plant"])


def test_calibration_table_bins_every_row_once_and_omits_empty_bins():
    y = np.array([0, 1, 0, 1, 1, 1, 0])
    p = np.array([0.0, 0.05, 0.31, 0.39, 0.95, 1.0, 0.1])
    table = ev.calibration_table(y, p, bins=10)
    assert list(table.columns) == [
        "bin_lower", "bin_upper", "mean_predicted", "fraction_positive", "count",
    ]  # fmt: skip
    assert table["bin_lower"].tolist() == pytest.approx([0.0, 0.1, 0.3, 0.9])
    assert table["count"].tolist() == [2, 1, 2, 2]  # p = 1.0 lands in the last bin
    assert table["count"].sum() == len(y)
    last = table.iloc[-1]
    assert last["mean_predicted"] == pytest.approx(0.975)
    assert last["fraction_positive"] == 1.0


def test_ece_is_near_zero_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    table = ev.calibration_table(y, p)
    assert table["count"].sum() == p.size
    assert len(table) == 10
    assert ev.expected_calibration_error(y, p) < 0.01
    squashed = 0.5 + (p - 0.5) * 0.2  # right ranking, far too timid: ECE about 0.2
    assert ev.expected_calibration_error(y, squashed) > 0.15


def _assert_pngs(written: dict[str, Path], names: set[str], out_dir: Path) -> None:
    import matplotlib.pyplot as plt  # after ev.plots has chosen the Agg backend

    assert set(written) == names
    for name, path in written.items():
        assert path == out_dir / f"{name}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    assert plt.get_fignums() == []


def test_classification_plots_write_pngs_and_leak_no_figures(tmp_path):
    frame = _classification_frame(2000, seed=2)
    importance = {f"f{i:02d}": float(i) for i in range(30)}
    out_dir = tmp_path / "plots"
    written = ev.plots(
        "binary_classification",
        frame["y"],
        frame["p"],
        out_dir,
        threshold=0.4,
        feature_importance=importance,
        max_features=10,
    )
    names = {"roc", "pr", "confusion_matrix", "calibration", "feature_importance"}
    _assert_pngs(written, names, out_dir)


def test_regression_plots_write_pngs_and_leak_no_figures(tmp_path):
    frame = _regression_frame(2000, seed=2)
    written = ev.plots("regression", frame["y"], frame["p"], tmp_path)
    _assert_pngs(written, {"predicted_vs_actual", "residuals"}, tmp_path)


def test_plots_with_one_class_still_write_every_figure(tmp_path):
    written = ev.plots("binary_classification", np.zeros(50), np.linspace(0, 1, 50), tmp_path)
    _assert_pngs(written, {"roc", "pr", "confusion_matrix", "calibration"}, tmp_path)


@pytest.mark.parametrize(
    ("task", "make", "metric_name"),
    [
        ("binary_classification", _classification_frame, "ROC AUC"),
        ("regression", _regression_frame, "R2 Score"),
    ],
)
def test_evidently_report_writes_standalone_html(tmp_path, task, make, metric_name):
    reference, current = make(500, seed=1), make(500, seed=2)
    out = ev.evidently_report(
        task,
        reference.assign(extra="ignored"),
        current,
        target="y",
        prediction="p",
        out_path=tmp_path / "reports" / "quality.html",
        threshold=0.4 if task == "binary_classification" else None,
    )
    assert out == tmp_path / "reports" / "quality.html"
    html = out.read_text(encoding="utf-8")
    assert "<html" in html
    assert metric_name in html


def test_evidently_report_names_a_missing_column(tmp_path):
    frame = _classification_frame(50, seed=1)
    with pytest.raises(KeyError, match=r"evidently_report \(current\).*\['p'\]"):
        ev.evidently_report(
            "binary_classification", frame, frame.drop(columns="p"), "y", "p", tmp_path / "r.html"
        )
    assert not (tmp_path / "r.html").exists()


def _card(**overrides) -> str:
    args = dict(
        spec_name="iot_failures",
        model_name="iot_failures_model",
        version=3,
        task="binary_classification",
        estimator="xgboost",
        params={"max_depth": 4, "learning_rate": 0.1, "objective": "binary:logistic"},
        data_window=["2024-01-01", "2024-01-02", "2024-01-03"],
        training_rows={"train": 7000, "valid": 1500, "test": 1500},
        features=[f"sensor_{i}_mean_24h" for i in range(12)],
        metrics={"roc_auc": 0.91234567, "pr_auc": 0.5, "f1": float("nan"), "n": 1500},
        champion_metrics={"roc_auc": 0.9, "pr_auc": 0.55, "f1": 0.4},
        slices={
            "site": {
                "a": {"n": 900, "roc_auc": 0.9, "pr_auc": 0.4, "f1": 0.3},
                "b": {"n": 12, "insufficient": 1.0},
            }
        },
        lineage={"mlflow_run_id": "abc123", "training_set_version": "v7"},
        threshold=0.37,
        limits=["Trained on simulated data only."],
    )
    args.update(overrides)
    return ev.model_card(**args)


def test_model_card_has_every_section_the_champion_delta_and_na_for_nan():
    card = _card()
    for header in [
        "# Model card: iot_failures_model v3",
        "## Data window",
        "## Features",
        "## Parameters",
        "## Metrics",
        "## Slices",
        "### site",
        "## Lineage",
        "## Known limits",
    ]:
        assert header in card, header
    assert "| metric | this model | champion | delta |" in card
    assert "| roc_auc | 0.9123 | 0.9000 | +0.0123 |" in card
    assert "| pr_auc | 0.5000 | 0.5500 | -0.0500 |" in card
    assert "| f1 | n/a | 0.4000 | n/a |" in card
    assert "| n | 1500 | n/a | n/a |" in card  # no champion value: no delta
    assert "| b | 12 | n/a | n/a | n/a |" in card
    assert "12 features:" in card and "`sensor_11_mean_24h`" in card
    assert all(len(line) <= 100 for line in card.splitlines() if "sensor_" in line)
    assert "- Trained on simulated data only." in card
    assert "0.3700" in card  # the decision threshold


def test_model_card_without_champion_has_no_delta_column():
    card = _card(champion_metrics=None)
    assert "| metric | this model |" in card
    assert "champion" not in card and "delta" not in card


def test_model_card_is_deterministic_whatever_the_dict_order():
    card = _card()
    shuffled = _card(
        params={"objective": "binary:logistic", "learning_rate": 0.1, "max_depth": 4},
        lineage={"training_set_version": "v7", "mlflow_run_id": "abc123"},
    )
    assert card == shuffled


def test_evidently_report_with_one_class_says_why(tmp_path):
    ref = pd.DataFrame({"y": [0, 1] * 50, "p": np.linspace(0.01, 0.99, 100)})
    cur = pd.DataFrame({"y": [0] * 100, "p": np.linspace(0.01, 0.5, 100)})
    out = ev.evidently_report(
        "binary_classification", ref, cur, "y", "p", tmp_path / "r.html", threshold=0.5
    )
    assert "current split has only class 0 (100 rows)" in out.read_text()
