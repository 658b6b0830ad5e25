"""Data drift between a reference window and a current partition: per-column scores and an
Evidently HTML report.

How the numbers are made, and why:
- Each side is cut down to a seeded uniform sample of `sample_rows` rows first. A day can
  hold a million rows; drift scores settle long before that, and the cost must not grow
  with the day's size.
- Per-column scores come from Evidently's own stat-test implementations (the registry that
  DataDriftPreset and ValueDrift call), run directly on the sampled columns with nulls and
  infinities dropped exactly as Evidently drops them. So `method` accepts any Evidently
  stat-test name (wasserstein, ks, psi, jensenshannon, ...) with Evidently's default
  thresholds and drift rules (distances drift when score >= threshold, p-value tests when
  p < threshold), and a score here equals Evidently's score on the same rows.
- The HTML is Evidently's DataDriftPreset (plus a ValueDrift for the prediction) with the
  same methods and thresholds, run on a nested subsample of at most `html_rows` rows per
  side: its plotly rendering, not the tests, is the cost (about 2 s for 30 columns at
  5,000 rows and about 2x that at 20,000 on a 2-core machine, against ~0.3 s for all the
  scores on 20,000 rows). When sample_rows <= html_rows the report runs
  on exactly the scored rows and shows exactly these scores; otherwise its scores are the
  same tests on fewer rows, which a banner at the top of the report says.
- Categorical columns use Jensen-Shannon distance (threshold 0.1), which is what Evidently
  picks by default for categoricals once the reference has more than 1,000 rows; fixing it
  keeps the test the same whatever the sample size. When `method` itself applies to
  categoricals (jensenshannon, psi, hellinger, kl_div, ...) categoricals use it and
  `column_threshold` too. A category that appears only in current counts as a bin with
  zero reference mass, so it raises the distance.
- The prediction column (a score in [0, 1]) is tested like a numeric feature with `method`
  but reported on its own and left out of the drift share: the share says how much of the
  input moved, the prediction says whether the model's output moved.

No Dagster here; evidently is imported inside the functions that need it, because every
Dagster process imports this module and importing evidently takes 7-10 s on a 2-core
machine (paid once per process, on the first compute_drift call).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from mlops import model_loader, registry
from mlops.features import feature_names
from mlops.labels import entity_column
from mlops.lake import Lake, write_json
from mlops.monitoring import DRIFT_REPORT, scored_rows, scored_version
from mlops.spec import Spec

NUM = "num"
CAT = "cat"
CATEGORICAL_DEFAULT = "jensenshannon"
HTML_ROWS = 5_000
COLUMN_SCHEMA = {
    "column": pl.String,
    "kind": pl.String,
    "method": pl.String,
    "score": pl.Float64,
    "threshold": pl.Float64,
    "drifted": pl.Boolean,
    "p_value": pl.Float64,
}
# Stat tests whose score is already a p-value: they account for the sample size themselves.
P_VALUE_TESTS = {
    "ks",
    "chisquare",
    "z",
    "t_test",
    "fisher_exact",
    "mannw",
    "anderson",
    "cramer_von_mises",
    "g_test",
    "epps_singleton",
    "empirical_mmd",
}


@dataclass
class DriftResult:
    """Drift of current against reference; `columns` holds one row per tested feature."""

    columns: pl.DataFrame  # column, kind ("num"|"cat"), method, score, threshold, drifted
    drift_share: float  # drifted columns / tested columns (0.0 when none was tested)
    # drift_share >= share_threshold, the same ">=" rule as Evidently's dataset drift, so
    # a threshold of 0.3 with 3 of 10 columns drifted is dataset drift.
    dataset_drift: bool
    prediction: dict[str, Any] | None  # column, method, score, threshold, drifted
    reference_rows: int  # rows compared per side, after sampling
    current_rows: int
    reference_total: int  # rows before sampling
    current_total: int
    skipped_columns: list[str]  # over the column limit, all-null or constant; why in notes
    notes: list[str]
    html: str = field(repr=False)
    share_threshold: float = 0.3
    html_rows: tuple[int, int] = (0, 0)  # (reference, current) rows behind the HTML

    @property
    def drifted_columns(self) -> list[str]:
        return self.columns.filter(pl.col("drifted"))["column"].to_list()

    def summary(self) -> dict[str, Any]:
        """JSON-safe figures for Dagster metadata and the lake (no HTML)."""
        return {
            "drift_share": _num(self.drift_share),
            "share_threshold": _num(self.share_threshold),
            "dataset_drift": bool(self.dataset_drift),
            "tested_columns": self.columns.height,
            "drifted_columns": self.drifted_columns,
            "columns": [
                {k: _num(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in self.columns.to_dicts()
            ],
            "prediction": None
            if self.prediction is None
            else {k: _num(v) if isinstance(v, float) else v for k, v in self.prediction.items()},
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "reference_total": self.reference_total,
            "current_total": self.current_total,
            "html_reference_rows": self.html_rows[0],
            "html_current_rows": self.html_rows[1],
            "skipped_columns": list(self.skipped_columns),
            "notes": list(self.notes),
        }


def _num(value: float) -> float | None:
    """A float JSON can hold: NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def drift_config(spec: Spec) -> dict[str, Any]:
    """compute_drift's settings from spec.monitoring, so every caller tests alike."""
    m = spec.monitoring
    return {
        "method": m.drift_method,
        "column_threshold": m.column_drift_threshold,
        "share_threshold": m.drift_threshold,
        "sample_rows": m.drift_sample_rows,
        "max_columns": m.drift_max_columns,
        "significance": m.drift_significance,
    }


def drift_columns(spec: Spec) -> dict[str, list[str]]:
    """The spec's feature columns a drift report tests, split into numeric and categorical.

    Without an entity the data is one series, and its rolling aggregates are a smooth path:
    one day of a 6-hour mean is not a sample of its distribution over the training days, so
    a two-sample test calls it drifted every day. There, when the spec has row-level
    features (passthrough, categorical, transforms), the aggregates are left out and the
    inputs they summarize are tested instead of them."""
    f = spec.features
    cats = set(f.categorical)
    names = feature_names(spec)
    row_level = set(f.passthrough) | cats | {t.name for t in f.transforms}
    if spec.source.entity_column is None and row_level:
        names = [n for n in names if n in row_level]
    return {
        "numeric": [c for c in names if c not in cats],
        "categorical": [c for c in names if c in cats],
    }


# --- inputs -----------------------------------------------------------------------------


def _check_inputs(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    numeric: list[str],
    categorical: list[str],
    prediction_column: str | None,
    sample_rows: int,
    max_columns: int,
    html_rows: int,
) -> None:
    """Fail before any work, naming the column and the side."""
    if sample_rows < 1:
        raise ValueError(f"compute_drift: sample_rows must be >= 1, got {sample_rows}")
    if html_rows < 1:
        raise ValueError(f"compute_drift: html_rows must be >= 1, got {html_rows}")
    if max_columns < 1:
        raise ValueError(f"compute_drift: max_columns must be >= 1, got {max_columns}")
    both = set(numeric) & set(categorical)
    if both:
        raise ValueError(
            f"compute_drift: column(s) {sorted(both)} listed as both numeric and categorical"
        )
    for name, cols in (("numeric", numeric), ("categorical", categorical)):
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        if dupes:
            raise ValueError(f"compute_drift: column(s) {dupes} listed twice in {name}")
    if prediction_column is not None and prediction_column in {*numeric, *categorical}:
        raise ValueError(
            f"compute_drift: the prediction column {prediction_column!r} is also listed as a "
            "feature; it is tested separately, so leave it out of numeric/categorical"
        )
    wanted = [*numeric, *categorical, *([prediction_column] if prediction_column else [])]
    for side, frame in (("reference", reference), ("current", current)):
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise ValueError(
                f"compute_drift: column(s) {missing} missing from the {side} frame "
                f"(it has {len(frame.columns)} columns: {sorted(frame.columns)[:20]}"
                f"{' ...' if len(frame.columns) > 20 else ''})"
            )
    if current.height == 0:
        raise ValueError(
            "no rows to compare: the current frame is empty (nothing arrived for this "
            "partition, or every row was quarantined)"
        )
    if reference.height == 0:
        raise ValueError(
            "no rows to compare: the reference frame is empty (the reference window holds "
            "no rows; check the training window's partitions)"
        )


def _ordered(numeric: list[str], categorical: list[str], order: list[str] | None) -> list[str]:
    """Features in test priority: column_order's order first, the rest as given after."""
    given = [*numeric, *categorical]
    if not order:
        return given
    known = set(given)
    first = list(dict.fromkeys(c for c in order if c in known))
    placed = set(first)
    return first + [c for c in given if c not in placed]


def _sample_index(n: int, k: int, seed: np.random.SeedSequence) -> np.ndarray | None:
    """Sorted row positions of a uniform sample of k of n rows; None = keep all rows."""
    if n <= k:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False))


def _sample(frame: pl.DataFrame, cols: list[str], idx: np.ndarray | None) -> pl.DataFrame:
    out = frame.select(cols)
    return out if idx is None else out.select(pl.all().gather(idx))


def _as_types(frame: pl.DataFrame, numeric: set[str], side: str) -> pl.DataFrame:
    """Numeric columns as Float64 (NaN as null), the others as text categories."""
    exprs = []
    for c in frame.columns:
        if c in numeric:
            dtype = frame.schema[c]
            if not (dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null):
                raise ValueError(
                    f"compute_drift: numeric column {c!r} holds {dtype} in the {side} frame; "
                    "list it under categorical or fix its type"
                )
            exprs.append(pl.col(c).cast(pl.Float64).fill_nan(None))
        else:
            exprs.append(pl.col(c).cast(pl.String))
    return frame.select(exprs)


def _values(series: pl.Series) -> pl.Series:
    """The values a test sees: nulls, NaN and infinities dropped, as Evidently drops them."""
    out = series.drop_nulls()
    if out.dtype == pl.Float64:
        out = out.filter(out.is_finite())
    return out


def _unusable(
    name: str, ref: pl.Series, cur: pl.Series, ref_rows: int, cur_rows: int
) -> str | None:
    """Why a column cannot be tested (all-null on a side, constant on both), or None."""
    if ref.len() == 0:
        return f"{name}: no non-null values in the {ref_rows:,} sampled reference rows"
    if cur.len() == 0:
        return f"{name}: no non-null values in the {cur_rows:,} sampled current rows"
    if pl.concat([ref, cur]).n_unique() == 1:
        return f"{name}: constant ({ref[0]!r}) on both sides, nothing to compare"
    return None


# --- tests ------------------------------------------------------------------------------


def _stattests(method: str) -> tuple[Any, Any]:
    """(numeric test, categorical test) as Evidently StatTest objects, or a clear error."""
    from evidently.legacy.calculations.stattests.registry import (
        StatTestInvalidFeatureTypeError,
        StatTestNotFoundError,
        get_registered_stattest,
    )
    from evidently.legacy.core import ColumnType

    try:
        num = get_registered_stattest(method, ColumnType.Numerical)
    except (StatTestNotFoundError, StatTestInvalidFeatureTypeError) as exc:
        raise ValueError(
            f"compute_drift: drift method {method!r} cannot test numeric columns ({exc}); "
            "set monitoring.drift_method to an Evidently stat test such as wasserstein, ks, "
            "psi or jensenshannon"
        ) from exc
    try:
        cat = get_registered_stattest(method, ColumnType.Categorical)
    except (StatTestNotFoundError, StatTestInvalidFeatureTypeError):
        cat = get_registered_stattest(CATEGORICAL_DEFAULT, ColumnType.Categorical)
    return num, cat


def _test(
    stat: Any,
    kind: str,
    ref: pl.Series,
    cur: pl.Series,
    threshold: float | None,
    significance: float | None = None,
):
    """One Evidently stat test on two cleaned columns -> (score, threshold, drifted, p).

    With `significance`, a distance (Wasserstein, Jensen-Shannon, PSI...) counts as drift
    only when a two-sample test also rejects "same distribution" at that level (KS for
    numbers, chi-square for categories): between two samples of a few hundred rows from one
    distribution a distance can pass its threshold by chance, and a drifted day would then
    retrain a model that was fine. On large samples the distance decides, as before."""
    from evidently.legacy.core import ColumnType

    column_type = ColumnType.Numerical if kind == NUM else ColumnType.Categorical
    result = stat(ref.to_pandas(), cur.to_pandas(), column_type, threshold)
    drifted, p = bool(result.drifted), None
    if significance is not None and stat.name not in P_VALUE_TESTS:
        p = _p_value(kind, ref, cur)
        drifted = drifted and p < significance
    return float(result.drift_score), float(result.actual_threshold), drifted, p


def _p_value(kind: str, ref: pl.Series, cur: pl.Series) -> float:
    """Two-sample test that both columns come from one distribution."""
    from scipy import stats

    if kind == NUM:
        return float(stats.ks_2samp(ref.to_numpy(), cur.to_numpy()).pvalue)
    a, b = ref.cast(pl.String).value_counts(), cur.cast(pl.String).value_counts()
    table = a.join(b, on=a.columns[0], how="full", coalesce=True).fill_null(0)
    counts = table.select(table.columns[1:]).to_numpy()
    counts = counts[counts.sum(axis=1) > 0]
    if counts.shape[0] < 2:
        return 1.0
    return float(stats.chi2_contingency(counts)[1])


# --- the report -------------------------------------------------------------------------


def compute_drift(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    *,
    numeric: list[str],
    categorical: list[str],
    method: str = "wasserstein",
    column_threshold: float | None = None,
    share_threshold: float = 0.3,
    prediction_column: str | None = None,
    sample_rows: int = 20_000,
    max_columns: int = 50,
    column_order: list[str] | None = None,
    seed: int = 0,
    html_rows: int = HTML_ROWS,
    significance: float | None = None,
) -> DriftResult:
    """Per-column drift of `current` against `reference`, the drift share and the HTML.

    column_threshold: the numeric (and, when the method applies, categorical) test
    threshold; None = the method's default. column_order: features by priority (the
    champion's importance); the first max_columns testable ones are tested. Same inputs
    and seed -> the same samples and scores.
    """
    numeric, categorical = list(numeric), list(categorical)
    _check_inputs(
        reference,
        current,
        numeric,
        categorical,
        prediction_column,
        sample_rows,
        max_columns,
        html_rows,
    )
    num_test, cat_test = _stattests(method)
    cat_threshold = column_threshold if cat_test.name == num_test.name else None

    wanted = [*numeric, *categorical, *([prediction_column] if prediction_column else [])]
    ref_seed, cur_seed, html_seed = np.random.SeedSequence(seed).spawn(3)
    ref_idx = _sample_index(reference.height, sample_rows, ref_seed)
    cur_idx = _sample_index(current.height, sample_rows, cur_seed)
    numeric_set = set(numeric) | ({prediction_column} if prediction_column else set())
    ref = _as_types(_sample(reference, wanted, ref_idx), numeric_set, "reference")
    cur = _as_types(_sample(current, wanted, cur_idx), numeric_set, "current")

    notes: list[str] = []
    if ref_idx is not None or cur_idx is not None:
        notes.append(
            f"sampled {ref.height:,} of {reference.height:,} reference and {cur.height:,} of "
            f"{current.height:,} current rows (seed {seed})"
        )

    # Columns that cannot be tested leave the queue first, so they do not take the slots
    # of testable ones; then the column limit applies in priority order.
    skipped: list[str] = []
    testable: list[str] = []
    cleaned: dict[str, tuple[pl.Series, pl.Series]] = {}
    for name in _ordered(numeric, categorical, column_order):
        r, c = _values(ref[name]), _values(cur[name])
        why = _unusable(name, r, c, ref.height, cur.height)
        if why:
            skipped.append(name)
            notes.append(f"skipped {why}")
        else:
            testable.append(name)
            cleaned[name] = (r, c)
    tested, over = testable[:max_columns], testable[max_columns:]
    if over:
        skipped.extend(over)
        notes.append(
            f"skipped {len(over)} column(s) over the limit of {max_columns} tested columns "
            f"(lowest priority): {', '.join(over)}"
        )

    cat_set = set(categorical)
    rows = []
    for name in tested:
        kind = CAT if name in cat_set else NUM
        stat, threshold = (cat_test, cat_threshold) if kind == CAT else (num_test, column_threshold)
        score, used, drifted, p = _test(stat, kind, *cleaned[name], threshold, significance)
        rows.append((name, kind, stat.name, score, used, drifted, p))
    columns = pl.DataFrame(rows, schema=COLUMN_SCHEMA, orient="row")
    n_drifted = int(columns["drifted"].sum()) if columns.height else 0
    drift_share = n_drifted / columns.height if columns.height else 0.0
    if not columns.height:
        notes.append("no column could be tested; drift share is 0")

    prediction = None
    if prediction_column is not None:
        r, c = _values(ref[prediction_column]), _values(cur[prediction_column])
        why = _unusable(prediction_column, r, c, ref.height, cur.height)
        if why:
            notes.append(f"prediction not tested: {why}")
        else:
            score, used, drifted, p = _test(num_test, NUM, r, c, column_threshold, significance)
            prediction = {
                "column": prediction_column,
                "method": num_test.name,
                "score": score,
                "threshold": used,
                "drifted": drifted,
                "p_value": p,
            }

    # The HTML runs on a nested subsample of the scored rows (see the module docstring).
    html_ref_seed, html_cur_seed = html_seed.spawn(2)
    in_html = tested + ([prediction_column] if prediction is not None else [])
    html_ref = _sample(ref, in_html, _sample_index(ref.height, html_rows, html_ref_seed))
    html_cur = _sample(cur, in_html, _sample_index(cur.height, html_rows, html_cur_seed))
    if html_ref.height < ref.height or html_cur.height < cur.height:
        notes.append(
            f"the HTML report shows the same tests on {html_ref.height:,} reference and "
            f"{html_cur.height:,} current rows of the scored sample"
        )
    html = _html(
        html_ref,
        html_cur,
        numeric=[c for c in tested if c not in cat_set],
        categorical=[c for c in tested if c in cat_set],
        prediction=prediction_column if prediction is not None else None,
        num_method=num_test.name,
        cat_method=cat_test.name,
        num_threshold=column_threshold,
        cat_threshold=cat_threshold,
        share_threshold=share_threshold,
        banner=_banner(ref.height, cur.height, html_ref.height, html_cur.height, skipped),
    )
    return DriftResult(
        columns=columns,
        drift_share=drift_share,
        dataset_drift=bool(columns.height) and drift_share >= share_threshold,
        prediction=prediction,
        reference_rows=ref.height,
        current_rows=cur.height,
        reference_total=reference.height,
        current_total=current.height,
        skipped_columns=skipped,
        notes=notes,
        html=html,
        share_threshold=share_threshold,
        html_rows=(html_ref.height, html_cur.height),
    )


def _banner(ref_rows: int, cur_rows: int, html_ref: int, html_cur: int, skipped: list[str]) -> str:
    """A line atop the HTML saying which rows it shows, so it is never read as the scores'."""
    import html as html_lib

    text = (
        f"Drift scores in the run's metadata: {ref_rows:,} reference vs {cur_rows:,} current rows."
    )
    if (html_ref, html_cur) != (ref_rows, cur_rows):
        text += (
            f" This report runs the same tests on a subsample of {html_ref:,} vs {html_cur:,} rows, "
            "so its scores can differ slightly."
        )
    if skipped:
        text += f" Not tested: {', '.join(skipped)} (see the run's notes)."
    return (
        '<div style="font-family:sans-serif;padding:8px 16px;background:#fff8e1;'
        f'border-bottom:1px solid #ccc">{html_lib.escape(text)}</div>'
    )


@functools.cache
def _lean_preset() -> type:
    """DataDriftPreset without its per-column ValueDrift metrics.

    The preset's page is drawn by its own render() from Evidently's drift table; the
    ValueDrift children it also generates build plotly widgets that page never shows, which
    is about 40% of the report's time. The HTML is the same (checked on evidently 0.7.23).
    """
    from evidently.metrics.column_statistics import DriftedColumnsCount
    from evidently.presets import DataDriftPreset

    class LeanDataDriftPreset(DataDriftPreset):
        def generate_metrics(self, context: Any) -> Any:
            metrics = super().generate_metrics(context)
            counts = [m for m in metrics if isinstance(m, DriftedColumnsCount)]
            return counts or metrics  # another evidently layout: keep the preset whole

    return LeanDataDriftPreset


def _html(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    *,
    numeric: list[str],
    categorical: list[str],
    prediction: str | None,
    num_method: str,
    cat_method: str,
    num_threshold: float | None,
    cat_threshold: float | None,
    share_threshold: float,
    banner: str,
) -> str:
    """Evidently's data drift report (DataDriftPreset + a ValueDrift for the prediction)."""
    if not numeric and not categorical and prediction is None:
        return (
            f"<html><body>{banner}<h1>Data drift report not available</h1>"
            "<p>No column could be tested; see the run's notes.</p></body></html>"
        )
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    metrics: list[Any] = []
    if numeric or categorical:
        metrics.append(
            _lean_preset()(
                columns=[*numeric, *categorical],
                drift_share=share_threshold,
                num_method=num_method,
                cat_method=cat_method,
                num_threshold=num_threshold,
                cat_threshold=cat_threshold,
            )
        )
    if prediction is not None:
        metrics.append(ValueDrift(column=prediction, method=num_method, threshold=num_threshold))
    definition = DataDefinition(
        numerical_columns=[*numeric, *([prediction] if prediction else [])],
        categorical_columns=categorical,
    )
    snapshot = Report(metrics).run(
        Dataset.from_pandas(current.to_pandas(), data_definition=definition),
        Dataset.from_pandas(reference.to_pandas(), data_definition=definition),
    )
    page = snapshot.get_html_str(as_iframe=False)
    at = page.find("<body")
    at = page.find(">", at) + 1 if at >= 0 else 0
    return page[:at] + banner + page[at:]


# --- a day's drift report (the drift_report asset's logic) ----------------------------------


class NothingToCompare(ValueError):
    """The day has no scored rows, or the champion that scored it records no training set."""


@dataclass
class DriftDay:
    result: DriftResult
    summary: dict[str, Any]  # what the lake's JSON summary (and the retraining rules) read
    champion_version: int
    training_set_hash: str
    source: str  # "served" or "batch"
    mlflow_run_id: str = ""  # the training run of the champion that scored the day


def drift_day(spec: Spec, lake: Lake, tracking_uri: str, day: str) -> DriftDay:
    """The day's scored inputs against a sample of the training set of the champion that
    scored them, the prediction column included (the champion scores the sample)."""
    preds, source = scored_rows(lake, spec, day)
    if preds.height == 0:
        raise NothingToCompare(f"{spec.name} {day}: no scored rows ({source}): nothing to compare")
    model_name = spec.registered_model_name
    version = scored_version(preds)
    tags = registry.version_tags(tracking_uri, model_name, version)
    ts_hash = registry.lineage_from_tags(tags).get("training_set_hash")
    if not ts_hash:
        raise NothingToCompare(f"{model_name} v{version} has no training_set_hash tag")
    reference = lake.read(spec.name, "training_set", ts_hash[:16])
    model = model_loader.load_model(tracking_uri, model_name, version=version)
    sample = reference.sample(
        min(reference.height, spec.monitoring.drift_sample_rows), seed=0, shuffle=False
    )
    sample = sample.with_columns(pl.Series("score", model.score(sample), dtype=pl.Float64))
    if source == "served":  # what the service actually saw and answered
        current = preds
    else:
        keys = [entity_column(spec), spec.source.timestamp_column]
        current = lake.read(spec.name, "features", day).join(
            preds.select(*keys, "score"), on=keys, how="inner"
        )
    cols = drift_columns(spec)
    result = compute_drift(
        sample,
        current,
        numeric=cols["numeric"],
        categorical=cols["categorical"],
        prediction_column="score",
        **drift_config(spec),
    )
    summary = {
        **result.summary(),
        "partition": day,
        "champion_version": version,
        "reference_training_set_hash": ts_hash,
        "threshold": spec.monitoring.drift_threshold,
        "source": source,
    }
    run_id = tags.get(f"{registry.TAG}mlflow_run_id", "")
    return DriftDay(result, summary, version, ts_hash, source, run_id)


def save_drift_day(lake: Lake, spec: Spec, day: str, d: DriftDay) -> tuple[Any, str]:
    """The column table, the JSON summary and the HTML report, each written atomically (a
    failed write leaves the previous report whole). Returns (the table's write, HTML path)."""
    written = lake.write(spec.name, DRIFT_REPORT, d.result.columns, day)
    write_json(lake, spec.name, DRIFT_REPORT, day, d.summary)
    html = lake.put_text(f"{spec.name}/{DRIFT_REPORT}/{day}.html", d.result.html)
    return written, html


@dataclass
class LoggedReport:
    experiment_id: str
    run_id: str
    path: str  # in the run's artifacts


def log_drift_report(tracking_uri: str, day: str, d: DriftDay) -> LoggedReport | None:
    """The day's HTML report, also as an artifact of the champion's training run
    (`monitoring/drift_report/<day>.html`): the MLflow UI renders it, so the asset page links
    there (a lake path does not open from a browser). None when the version names no run."""
    if not d.mlflow_run_id:
        return None
    c = registry.client(tracking_uri)
    path = f"monitoring/{DRIFT_REPORT}/{day}.html"
    c.log_text(d.mlflow_run_id, d.result.html, path)
    return LoggedReport(c.get_run(d.mlflow_run_id).info.experiment_id, d.mlflow_run_id, path)
