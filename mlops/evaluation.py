"""Evaluation of a model's test-split predictions: metrics, slices, calibration, plots, reports.

Plain functions of arrays and frames (no Dagster, no MLflow), shared by the evaluation asset,
the champion comparison and the benchmark. Classification predictions are probabilities of
class 1 and a row is predicted positive when its probability is >= the decision threshold
(the same rule Evidently applies). Outputs are deterministic: sorted keys, fixed bins, no
random sampling. scikit-learn, matplotlib and evidently are imported inside the functions
that use them, because every Dagster process imports this module (sklearn.metrics alone
adds about a second to a cold import).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import pandas as pd


BINARY = "binary_classification"
REGRESSION = "regression"
TASKS = (BINARY, REGRESSION)
DEFAULT_THRESHOLD = 0.5
NULL_SLICE = "<null>"
PROB_EPS = 1e-15
PRIMARY_SLICE_METRICS = {BINARY: ("roc_auc", "pr_auc", "f1"), REGRESSION: ("rmse", "mae")}
DPI = 100


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown model task {task!r}: expected one of {', '.join(TASKS)}")


def _arrays(y: Any, pred: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both as flat float arrays of equal length, or a ValueError naming the problem."""
    y_arr = np.asarray(y, dtype=float).ravel()
    p_arr = np.asarray(pred, dtype=float).ravel()
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"{what}: {y_arr.size} labels but {p_arr.size} predictions")
    if y_arr.size == 0:
        raise ValueError(f"{what}: no rows to evaluate")
    if np.isnan(y_arr).any() or np.isnan(p_arr).any():
        raise ValueError(f"{what}: labels or predictions contain NaN; drop those rows first")
    return y_arr, p_arr


def _binary(y: Any, p: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    y_arr, p_arr = _arrays(y, p, what)
    if not np.isin(y_arr, (0.0, 1.0)).all():
        bad = sorted(set(np.unique(y_arr)) - {0.0, 1.0})[:5]
        raise ValueError(f"{what}: labels must be 0 or 1, found {bad}")
    if (p_arr < 0).any() or (p_arr > 1).any():
        raise ValueError(
            f"{what}: predictions must be class-1 probabilities in [0, 1], "
            f"found range [{p_arr.min():.4g}, {p_arr.max():.4g}]"
        )
    return y_arr.astype(np.int64), p_arr


def choose_threshold(y_valid: np.ndarray, p_valid: np.ndarray) -> float:
    """Decision threshold with the best validation F1 (ties: the higher); 0.5 for one class."""
    y, p = _binary(y_valid, p_valid, "choose_threshold")
    positives = int(y.sum())
    if positives in (0, y.size):
        return DEFAULT_THRESHOLD
    order = np.argsort(-p, kind="stable")
    p_desc, y_desc = p[order], y[order]
    # Candidates are the distinct scores; at candidate t every row with p >= t is positive,
    # so the counts are the cumulative sums up to the last row holding each distinct value.
    last = np.r_[np.flatnonzero(np.diff(p_desc) != 0), p_desc.size - 1]
    tp = np.cumsum(y_desc)[last]
    fp = (last + 1) - tp
    f1 = 2 * tp / (2 * tp + fp + (positives - tp))
    # Candidates run from high to low, so argmax's first maximum is the highest threshold.
    return float(p_desc[last[int(np.argmax(f1))]])


def classification_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Ranking, thresholded and probabilistic quality of class-1 probabilities."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y_arr, p_arr = _binary(y, p, "classification_metrics")
    n = y_arr.size
    pred = (p_arr >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (y_arr == 1)).sum())
    fp = int(((pred == 1) & (y_arr == 0)).sum())
    fn = int(((pred == 0) & (y_arr == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    two_classes = 0 < y_arr.sum() < n
    clipped = np.clip(p_arr, PROB_EPS, 1 - PROB_EPS)
    log_loss = -float(np.mean(y_arr * np.log(clipped) + (1 - y_arr) * np.log1p(-clipped)))
    return {
        "roc_auc": float(roc_auc_score(y_arr, p_arr)) if two_classes else math.nan,
        "pr_auc": float(average_precision_score(y_arr, p_arr)) if two_classes else math.nan,
        "f1": float(f1),
        "recall": float(recall),
        "precision": float(precision),
        "log_loss": log_loss,
        "brier": float(np.mean((p_arr - y_arr) ** 2)),
        "accuracy": float(np.mean(pred == y_arr)),
        "positive_rate": float(y_arr.mean()),
        "predicted_positive_rate": float(pred.mean()),
        "threshold": float(threshold),
        "n": n,
    }


def regression_metrics(y: np.ndarray, yhat: np.ndarray) -> dict[str, float]:
    """Error size (rmse, mae) and explained variance (r2; nan below two rows)."""
    from sklearn.metrics import r2_score

    y_arr, yhat_arr = _arrays(y, yhat, "regression_metrics")
    err = yhat_arr - y_arr
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "r2": float(r2_score(y_arr, yhat_arr)) if y_arr.size >= 2 else math.nan,
        "n": int(y_arr.size),
    }


def metrics(task: str, y: Any, pred: Any, threshold: float | None = None) -> dict[str, float]:
    """The task's metrics; classification uses `threshold` (0.5 when None)."""
    _check_task(task)
    if task == BINARY:
        return classification_metrics(
            y, pred, DEFAULT_THRESHOLD if threshold is None else threshold
        )
    return regression_metrics(y, pred)


def _require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(
            f"{what}: column(s) {missing} not in the frame; available: {sorted(map(str, frame.columns))}"
        )


def _slice_keys(values: pd.Series) -> pd.Series:
    """Slice value as text, nulls (None, NaN, NaT) as one "<null>" group."""
    as_text = values.astype(object).map(str)
    return as_text.where(values.notna(), NULL_SLICE)


def slice_metrics(
    task: str,
    frame: pd.DataFrame,
    y_col: str,
    pred_col: str,
    slice_columns: list[str],
    threshold: float | None = None,
    min_rows: int = 30,
) -> dict[str, dict[str, dict[str, float]]]:
    """Column -> value -> metrics; slices under min_rows get only n and insufficient=1.0."""
    _check_task(task)
    _require_columns(frame, [y_col, pred_col, *slice_columns], "slice_metrics")
    y_all, pred_all = frame[y_col].to_numpy(), frame[pred_col].to_numpy()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for col in sorted(set(slice_columns)):
        keys = _slice_keys(frame[col])
        per_value: dict[str, dict[str, float]] = {}
        # Positions, not index labels: the frame's index may repeat.
        for value, rows in sorted(keys.groupby(keys, sort=False).indices.items()):
            if rows.size < min_rows:
                per_value[value] = {"n": int(rows.size), "insufficient": 1.0}
            else:
                per_value[value] = metrics(task, y_all[rows], pred_all[rows], threshold)
        out[col] = per_value
    return out


def calibration_table(y: Any, p: Any, bins: int = 10) -> pd.DataFrame:
    """Reliability table over equal-width probability bins on [0, 1]; empty bins omitted."""
    if bins < 1:
        raise ValueError(f"calibration_table: bins must be >= 1, got {bins}")
    y_arr, p_arr = _binary(y, p, "calibration_table")
    idx = np.clip(np.floor(p_arr * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p_arr, minlength=bins)
    sum_y = np.bincount(idx, weights=y_arr, minlength=bins)
    used = np.flatnonzero(count)
    return pd.DataFrame(
        {
            "bin_lower": used / bins,
            "bin_upper": (used + 1) / bins,
            "mean_predicted": sum_p[used] / count[used],
            "fraction_positive": sum_y[used] / count[used],
            "count": count[used].astype(np.int64),
        }
    )


def expected_calibration_error(y: Any, p: Any, bins: int = 10) -> float:
    """Row-weighted mean gap between predicted probability and observed rate per bin."""
    table = calibration_table(y, p, bins)
    gap = (table["mean_predicted"] - table["fraction_positive"]).abs()
    return float((gap * table["count"]).sum() / table["count"].sum())


# --- plots ------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> Path:
    """Render in memory, then one atomic write: a failed render leaves no half PNG."""
    import io

    from mlops.lake import put_file

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", metadata={"Software": None})
    put_file(path, buf.getvalue())
    return path


def _top_features(importance: Mapping[str, float], max_features: int) -> list[tuple[str, float]]:
    """Largest |importance| first, name as the tie-break so the order is deterministic."""
    ranked = sorted(importance.items(), key=lambda kv: (-abs(float(kv[1])), kv[0]))
    return [(name, float(value)) for name, value in ranked[:max_features]]


def plots(
    task: str,
    y: Any,
    pred: Any,
    out_dir: Path,
    threshold: float | None = None,
    feature_importance: dict[str, float] | None = None,
    max_features: int = 20,
) -> dict[str, Path]:
    """Write the task's evaluation PNGs into out_dir; returns plot name -> file path."""
    _check_task(task)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if task == BINARY:
        y_arr, p_arr = _binary(y, pred, "plots")
        t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        drawers = {
            "roc": lambda ax: _roc(ax, y_arr, p_arr),
            "pr": lambda ax: _pr(ax, y_arr, p_arr),
            "confusion_matrix": lambda ax: _confusion(ax, y_arr, p_arr, t),
        }
    else:
        y_arr, p_arr = _arrays(y, pred, "plots")
        drawers = {"predicted_vs_actual": lambda ax: _predicted_vs_actual(ax, y_arr, p_arr)}

    written: dict[str, Path] = {}
    for name, draw in drawers.items():
        fig, ax = plt.subplots(figsize=(5, 4))
        try:
            draw(ax)
            written[name] = _save(fig, out_dir / f"{name}.png")
        finally:
            plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    try:
        if task == BINARY:
            _calibration(axes, y_arr, p_arr)
            written["calibration"] = _save(fig, out_dir / "calibration.png")
        else:
            _residuals(axes, y_arr, p_arr)
            written["residuals"] = _save(fig, out_dir / "residuals.png")
    finally:
        plt.close(fig)

    if feature_importance:
        top = _top_features(feature_importance, max_features)
        fig, ax = plt.subplots(figsize=(6, 1.2 + 0.25 * len(top)))
        try:
            names = [name for name, _ in reversed(top)]
            ax.barh(names, [value for _, value in reversed(top)], color="tab:blue")
            ax.set_xlabel("importance")
            ax.set_title(f"Feature importance (top {len(top)} of {len(feature_importance)})")
            ax.tick_params(axis="y", labelsize=8)
            written["feature_importance"] = _save(fig, out_dir / "feature_importance.png")
        finally:
            plt.close(fig)
    return written


def _one_class_note(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} undefined:\nthe labels hold one class", ha="center", va="center")
    ax.set_axis_off()


def _roc(ax: Any, y: np.ndarray, p: np.ndarray) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, color="tab:blue", label=f"AUC = {roc_auc_score(y, p):.4f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
    else:
        _one_class_note(ax, "ROC")
    ax.set_title("ROC curve")


def _pr(ax: Any, y: np.ndarray, p: np.ndarray) -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    if 0 < y.sum() < y.size:
        precision, recall, _ = precision_recall_curve(y, p)
        ap = average_precision_score(y, p)
        ax.step(recall, precision, where="post", color="tab:blue", label=f"AP = {ap:.4f}")
        ax.axhline(y.mean(), color="grey", linestyle="--", linewidth=1, label="base rate")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(loc="upper right")
    else:
        _one_class_note(ax, "Precision-recall")
    ax.set_title("Precision-recall curve")


def _confusion(ax: Any, y: np.ndarray, p: np.ndarray, threshold: float) -> None:
    pred = (p >= threshold).astype(np.int64)
    counts = np.array([[np.sum((y == a) & (pred == b)) for b in (0, 1)] for a in (0, 1)])
    ax.imshow(counts, cmap="Blues")
    for a in (0, 1):
        for b in (0, 1):
            dark = counts[a, b] > counts.max() / 2
            color = "white" if dark else "black"
            ax.text(b, a, f"{counts[a, b]:,}", ha="center", va="center", color=color, fontsize=12)
    ax.set_xticks([0, 1], ["predicted 0", "predicted 1"])
    ax.set_yticks([0, 1], ["actual 0", "actual 1"])
    ax.set_title(f"Confusion matrix at threshold {threshold:.4f}")


def _calibration(axes: Any, y: np.ndarray, p: np.ndarray) -> None:
    table = calibration_table(y, p)
    left, right = axes
    left.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    left.plot(table["mean_predicted"], table["fraction_positive"], marker="o", label="model")
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.set_xlabel("mean predicted probability")
    left.set_ylabel("fraction positive")
    left.set_title(f"Reliability (ECE = {expected_calibration_error(y, p):.4f})")
    left.legend(loc="upper left")
    right.hist(p, bins=20, range=(0, 1), color="tab:blue")
    right.set_xlabel("predicted probability")
    right.set_ylabel("rows")
    right.set_title("Predicted probabilities")


def _predicted_vs_actual(ax: Any, y: np.ndarray, yhat: np.ndarray) -> None:
    ax.scatter(y, yhat, s=4, alpha=0.3, color="tab:blue", rasterized=True)
    lo, hi = float(min(y.min(), yhat.min())), float(max(y.max(), yhat.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title("Predicted vs actual")


def _residuals(axes: Any, y: np.ndarray, yhat: np.ndarray) -> None:
    residual = y - yhat
    left, right = axes
    left.scatter(yhat, residual, s=4, alpha=0.3, color="tab:blue", rasterized=True)
    left.axhline(0, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("predicted")
    left.set_ylabel("actual - predicted")
    left.set_title("Residuals vs predicted")
    right.hist(residual, bins=40, color="tab:blue")
    right.set_xlabel("actual - predicted")
    right.set_ylabel("rows")
    right.set_title("Residual distribution")


# --- Evidently --------------------------------------------------------------------------


def evidently_report(
    task: str,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    target: str,
    prediction: str,
    out_path: Path,
    threshold: float | None = None,
) -> Path:
    """Standalone Evidently quality report (current split against reference) at out_path."""
    _check_task(task)
    for name, frame in (("reference", reference), ("current", current)):
        _require_columns(frame, [target, prediction], f"evidently_report ({name})")
        if frame.empty:
            raise ValueError(f"evidently_report: the {name} frame has no rows")
    from evidently import BinaryClassification, DataDefinition, Dataset, Regression, Report
    from evidently.presets import ClassificationPreset, RegressionPreset

    # Only the label and prediction columns: the preset needs nothing else, and feature
    # columns would only slow the report down (drift has its own report).
    if task == BINARY:
        definition = DataDefinition(
            numerical_columns=[prediction],
            categorical_columns=[target],
            classification=[
                BinaryClassification(target=target, prediction_probas=prediction, pos_label=1)
            ],
        )
        preset: Any = ClassificationPreset(probas_threshold=threshold)

        def prepare(frame: pd.DataFrame) -> pd.DataFrame:
            y, p = _binary(frame[target], frame[prediction], "evidently_report")
            return pd.DataFrame({target: y, prediction: p})
    else:
        definition = DataDefinition(
            numerical_columns=[target, prediction],
            regression=[Regression(target=target, prediction=prediction)],
        )
        preset = RegressionPreset()

        def prepare(frame: pd.DataFrame) -> pd.DataFrame:
            y, yhat = _arrays(frame[target], frame[prediction], "evidently_report")
            return pd.DataFrame({target: y, prediction: yhat})

    from mlops.lake import put_file

    out_path = Path(out_path)
    if task == BINARY:
        one_class = [
            f"{name} split has only class {int(frame[target].iloc[0])} ({len(frame)} rows)"
            for name, frame in (("current", current), ("reference", reference))
            if frame[target].nunique() < 2
        ]
        if one_class:
            # Evidently's classification metrics need both classes; say so in the report
            # instead of failing the evaluation (the metrics gate fails on its own).
            why = "; ".join(one_class)
            put_file(
                out_path,
                "<html><body><h1>Classification report not available</h1>"
                f"<p>Evidently needs both classes in each split: {why}.</p></body></html>",
            )
            return out_path
    snapshot = Report([preset]).run(
        Dataset.from_pandas(prepare(current), data_definition=definition),
        Dataset.from_pandas(prepare(reference), data_definition=definition),
    )
    # Snapshot.save_html silently writes nothing when given a Path, so write the string.
    put_file(out_path, snapshot.get_html_str(as_iframe=False))
    return out_path


# --- model card -------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """Cell text: floats to 4 decimals, NaN/None as n/a, pipes escaped for tables."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if math.isnan(value) else f"{float(value):.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _delta(mine: Any, theirs: Any) -> str:
    try:
        d = float(mine) - float(theirs)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(d) else f"{d:+.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def model_card(
    *,
    spec_name: str,
    model_name: str,
    version: str | int | None,
    task: str,
    estimator: str,
    params: dict,
    data_window: list[str],
    training_rows: dict[str, int],
    features: list[str],
    metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    slices: dict,
    lineage: dict[str, str],
    threshold: float | None,
    limits: list[str],
) -> str:
    """Markdown model card: what was trained on what, how good it is, where it came from."""
    _check_task(task)
    shown_version = "unregistered" if version is None else f"v{version}"
    # The model is fit on the train split; valid (early stopping, threshold) and test
    # (the gates) are counted beside it, never as "trained on".
    summary = f"{estimator} for {task} (spec `{spec_name}`)"
    if "train" in training_rows:
        summary += f", trained on {int(training_rows['train']):,} rows"
    held_out = [f"{int(training_rows[k]):,} {k}" for k in ("valid", "test") if k in training_rows]
    if held_out:
        summary += f" ({' and '.join(held_out)} rows held out)"
    if task == BINARY and threshold is not None:
        summary += f"; decision threshold {_fmt(float(threshold))} (predict 1 when p >= threshold)"
    lines = [f"# Model card: {model_name} {shown_version}", "", summary + ".", ""]

    lines += ["## Data window", ""]
    if data_window:
        span = f"{data_window[0]} to {data_window[-1]}"
        lines.append(
            f"{span} ({len(data_window)} partitions)." if len(data_window) > 2 else f"{span}."
        )
    else:
        lines.append("n/a")
    lines.append("")
    order = {k: i for i, k in enumerate(("train", "valid", "test"))}
    splits = sorted(training_rows.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    lines += _table(["split", "rows"], [[k, f"{int(v):,}"] for k, v in splits])
    lines.append("")

    lines += ["## Features", "", f"{len(features)} features:", ""]
    listed = ", ".join(f"`{f}`" for f in features)
    lines += textwrap.wrap(listed, width=100, break_long_words=False, break_on_hyphens=False)
    lines.append("")

    lines += ["## Parameters", ""]
    lines += _table(["parameter", "value"], [[k, _fmt(v)] for k, v in sorted(params.items())])
    lines.append("")

    lines += ["## Metrics", ""]
    if champion_metrics is None:
        header = ["metric", "this model"]
        rows = [[k, _fmt(v)] for k, v in sorted(metrics.items())]
    else:
        header = ["metric", "this model", "champion", "delta"]
        rows = [
            [k, _fmt(v), _fmt(champion_metrics.get(k)), _delta(v, champion_metrics.get(k))]
            for k, v in sorted(metrics.items())
        ]
    lines += _table(header, rows)
    lines.append("")

    lines += ["## Slices", ""]
    primary = list(PRIMARY_SLICE_METRICS[task])
    if not slices:
        lines += ["No slice columns.", ""]
    for col, per_value in sorted(slices.items()):
        lines += [f"### {col}", ""]
        rows = [
            [_fmt(value), _fmt(m.get("n")), *(_fmt(m.get(k)) for k in primary)]
            for value, m in sorted(per_value.items())
        ]
        lines += _table(["value", "n", *primary], rows)
        lines.append("")
    if slices:
        lines += ["n/a: too few rows in the slice, or the metric is undefined there.", ""]

    lines += ["## Lineage", ""]
    lines += _table(["key", "value"], [[k, _fmt(v)] for k, v in sorted(lineage.items())])
    lines.append("")

    lines += ["## Known limits", ""]
    lines += [f"- {limit}" for limit in limits] or ["- none recorded"]
    return "\n".join(lines) + "\n"
