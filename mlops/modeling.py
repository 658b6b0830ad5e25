"""Model matrices, estimators and the Optuna search over the spec's candidates.

No MLflow and no Dagster here: the same functions serve training, evaluation, reproduction
and the benchmark's plain-script baseline. Categorical features are one-hot encoded from
the spec's category lists (not fitted), so serving needs no fitted preprocessing beyond the
model itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# OpenMP threads that spin while they wait make xgboost 5x slower whenever another process
# holds a core (parallel test workers, a Dagster run beside the webserver). Must be set
# before xgboost's OpenMP runtime starts, i.e. before the first fit in this process. OpenMP's
# own variable, not a platform setting: set for the libraries, not read (mlops/settings.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mlops.features import feature_names
from mlops.spec import CandidateSpec, Spec
from mlops.training_set import SAMPLE_WEIGHT

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import pandas as pd
    from mlops.lazy import polars as pl

XGBOOST = "xgboost"


@dataclass(frozen=True)
class MatrixLayout:
    """How a feature frame becomes the model's input: stored with the model (MLmodel metadata)."""

    numeric: list[str]
    categorical: dict[str, list[str]]

    @property
    def columns(self) -> list[str]:
        cols = list(self.numeric)
        for col, cats in self.categorical.items():
            cols.extend(f"{col}={c}" for c in cats)
        return cols

    def to_json(self) -> str:
        # Categorical columns as [name, categories] pairs: MLmodel metadata is YAML, whose
        # mappings come back with sorted keys, and column order is part of the model.
        pairs = [[k, v] for k, v in self.categorical.items()]
        return json.dumps({"numeric": self.numeric, "categorical": pairs})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatrixLayout:
        cats = d["categorical"]
        pairs = cats.items() if isinstance(cats, dict) else cats
        return cls(numeric=list(d["numeric"]), categorical={k: list(v) for k, v in pairs})


def layout(spec: Spec) -> MatrixLayout:
    cats = {c: list(spec.column(c).categories or []) for c in spec.features.categorical}
    numeric = [n for n in feature_names(spec) if n not in cats]
    return MatrixLayout(numeric=numeric, categorical=cats)


def model_matrix(lay: MatrixLayout, frame: pl.DataFrame | pd.DataFrame) -> pd.DataFrame:
    """Feature rows -> float64 matrix in the layout's column order (unknown category = all 0)."""
    df = frame if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)
    missing = [c for c in [*lay.numeric, *lay.categorical] if c not in df.columns]
    if missing:
        raise ValueError(f"feature frame lacks model input column(s) {missing}")
    exprs = [pl.col(c).cast(pl.Float64) for c in lay.numeric]
    for col, cats in lay.categorical.items():
        exprs += [
            (pl.col(col) == c).fill_null(False).cast(pl.Float64).alias(f"{col}={c}") for c in cats
        ]
    out = df.select(exprs).to_pandas()
    return out.astype("float64")


# Estimators --------------------------------------------------------------------------------


def make_estimator(task: str, name: str, params: dict[str, Any], seed: int):
    """The estimator `name` with the platform's defaults, which the spec's `params` override
    (a candidate may set n_estimators or max_iter)."""
    is_clf = task == "binary_classification"
    if name == XGBOOST:
        import xgboost as xgb

        p = {
            "tree_method": "hist",
            "n_estimators": 300,
            "random_state": seed,
            "n_jobs": 2,
            **params,
        }
        if is_clf:
            return xgb.XGBClassifier(eval_metric="logloss", **p)
        return xgb.XGBRegressor(eval_metric="rmse", **p)
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "logistic_regression":
        from sklearn.linear_model import LogisticRegression

        if not is_clf:
            raise ValueError("logistic_regression is a classifier: use ridge for regression")
        est = LogisticRegression(**{"max_iter": 1000, "random_state": seed, **params})
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), est)
    if name == "ridge":
        from sklearn.linear_model import Ridge

        if is_clf:
            raise ValueError("ridge is a regressor: use logistic_regression for classification")
        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), Ridge(**params))
    if name == "random_forest":
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        cls = RandomForestClassifier if is_clf else RandomForestRegressor
        defaults = {"n_estimators": 200, "random_state": seed, "n_jobs": 2, "min_samples_leaf": 5}
        est = cls(**{**defaults, **params})
        return make_pipeline(SimpleImputer(strategy="median"), est)
    if name == "hist_gradient_boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        cls = HistGradientBoostingClassifier if is_clf else HistGradientBoostingRegressor
        return cls(**{"random_state": seed, **params})
    raise ValueError(f"unknown estimator {name}")


def fit(
    task: str,
    name: str,
    params: dict[str, Any],
    seed: int,
    X_train: pd.DataFrame,
    y_train: np.ndarray,
    X_valid: pd.DataFrame,
    y_valid: np.ndarray,
    w_train: np.ndarray | None = None,
):
    """Fit one estimator; xgboost stops early on the validation split. `w_train`: sample
    weights (a retraining after a change weighs the post-change rows up)."""
    params = dict(params)
    if name == XGBOOST:
        rounds = params.pop("early_stopping_rounds", 30)
        est = make_estimator(task, name, {**params, "early_stopping_rounds": rounds}, seed)
        est.fit(
            X_train, y_train, sample_weight=w_train, eval_set=[(X_valid, y_valid)], verbose=False
        )
        return est
    est = make_estimator(task, name, params, seed)
    if w_train is None:
        est.fit(X_train, y_train)
    elif hasattr(est, "steps"):  # a pipeline: the weights go to its last step, the estimator
        est.fit(X_train, y_train, **{f"{est.steps[-1][0]}__sample_weight": w_train})
    else:
        est.fit(X_train, y_train, sample_weight=w_train)
    return est


def sample_weights(part: pl.DataFrame) -> np.ndarray | None:
    """The training set's per-row weights, when it has any (None: all rows count alike)."""
    if SAMPLE_WEIGHT not in part.columns:
        return None
    return part[SAMPLE_WEIGHT].cast(pl.Float64).fill_null(1.0).to_numpy()


def predict(task: str, model, X: pd.DataFrame) -> np.ndarray:
    """Class-1 probability for classification, the value for regression."""
    if task == "binary_classification":
        return np.asarray(model.predict_proba(X))[:, 1].astype("float64")
    return np.asarray(model.predict(X)).astype("float64")


def feature_importance(model, columns: list[str]) -> dict[str, float]:
    """Gain importance for xgboost; impurity or |coefficient| for scikit-learn."""
    est = model.steps[-1][1] if hasattr(model, "steps") else model
    if hasattr(est, "get_booster"):
        gain = est.get_booster().get_score(importance_type="gain")
        return {c: float(gain.get(c, 0.0)) for c in columns}
    if hasattr(est, "feature_importances_"):
        return {c: float(v) for c, v in zip(columns, est.feature_importances_, strict=True)}
    if hasattr(est, "coef_"):
        coef = np.abs(np.asarray(est.coef_)).reshape(-1, len(columns)).mean(axis=0)
        return {c: float(v) for c, v in zip(columns, coef, strict=True)}
    return {}


# Metric used for the search -----------------------------------------------------------------


def search_score(task: str, metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn import metrics as m

    if task == "binary_classification":
        if len(np.unique(y)) < 2:
            return float("nan")
        if metric == "pr_auc":
            return float(m.average_precision_score(y, pred))
        if metric == "log_loss":
            return float(m.log_loss(y, np.clip(pred, 1e-15, 1 - 1e-15)))
        return float(m.roc_auc_score(y, pred))
    if metric == "mae":
        return float(m.mean_absolute_error(y, pred))
    if metric == "r2":
        return float(m.r2_score(y, pred))
    return float(np.sqrt(m.mean_squared_error(y, pred)))


def direction(metric: str) -> str:
    return "minimize" if metric in ("log_loss", "brier", "rmse", "mae") else "maximize"


# Search ---------------------------------------------------------------------------------------


@dataclass
class Trial:
    number: int
    estimator: str
    params: dict[str, Any]
    value: float
    seconds: float
    best_iteration: int | None = None


@dataclass
class SearchResult:
    metric: str
    best: Trial
    trials: list[Trial] = field(default_factory=list)


def _suggest(trial, cand: CandidateSpec) -> dict[str, Any]:
    params: dict[str, Any] = dict(cand.params)
    for pname, sp in cand.search_space.items():
        key = f"{cand.estimator}.{pname}"
        if sp.type == "int":
            params[pname] = trial.suggest_int(key, int(sp.low), int(sp.high), log=sp.log)
        elif sp.type == "float":
            params[pname] = trial.suggest_float(key, float(sp.low), float(sp.high), log=sp.log)
        else:
            params[pname] = trial.suggest_categorical(key, sp.choices)
    return params


def search(
    spec: Spec,
    X_train: pd.DataFrame,
    y_train: np.ndarray,
    X_valid: pd.DataFrame,
    y_valid: np.ndarray,
    on_trial: Callable[[Trial], None] | None = None,
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    w_train: np.ndarray | None = None,
) -> SearchResult:
    """Optuna TPE over the spec's candidates and search spaces, seeded: same data, same trials.

    Trials live in memory unless `storage` (or MLOPS_OPTUNA_STORAGE, e.g. postgresql://...)
    names a shared Optuna storage, where every search is its own study (`study_name`, else a
    fresh one) that optuna-dashboard and other processes can read; the results are the same.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task, metric = spec.model.task, primary_metric(spec)
    if task == "binary_classification":
        for split, y in (("train", y_train), ("valid", y_valid)):
            if len(np.unique(y)) < 2:
                raise ValueError(
                    f"the {split} split has {len(y)} rows of one class only: no model can be "
                    "trained or compared on it. Widen model.training_window_days or add data."
                )
    cands = {c.estimator: c for c in spec.model.candidates}
    sampler = optuna.samplers.TPESampler(seed=spec.model.seed)
    storage = storage or optuna_storage()
    study = optuna.create_study(
        direction=direction(metric), sampler=sampler, storage=storage, study_name=study_name
    )
    done: list[Trial] = []

    def objective(trial) -> float:
        name = trial.suggest_categorical("estimator", sorted(cands))
        params = _suggest(trial, cands[name])
        t0 = time.perf_counter()
        model = fit(
            task, name, params, spec.model.seed, X_train, y_train, X_valid, y_valid, w_train
        )
        value = search_score(task, metric, y_valid, predict(task, model, X_valid))
        best_iter = getattr(model, "best_iteration", None) if name == XGBOOST else None
        t = Trial(trial.number, name, params, value, time.perf_counter() - t0, best_iter)
        done.append(t)
        if on_trial is not None:
            on_trial(t)
        return value

    study.optimize(objective, n_trials=trials or spec.model.trials)
    best = done[study.best_trial.number]
    return SearchResult(metric=metric, best=best, trials=done)


def optuna_storage() -> str | None:
    """The shared Optuna storage URL (MLOPS_OPTUNA_STORAGE), or None: trials in memory."""
    from mlops.settings import settings

    return settings().optuna_storage


def primary_metric(spec: Spec) -> str:
    if spec.model.task == "regression" and spec.gates.primary_metric in ("roc_auc", "pr_auc", "f1"):
        return "rmse"
    return spec.gates.primary_metric


def split_frames(spec: Spec, training_set: pl.DataFrame, lay: MatrixLayout):
    """(X, y) for train, valid and test, from the training set's split column."""
    label = spec.labels.name
    out = {}
    for s in ("train", "valid", "test"):
        part = training_set.filter(pl.col("split") == s)
        y = part[label].cast(pl.Float64).to_numpy()
        if spec.model.task == "binary_classification":
            y = y.astype("int64")
        out[s] = (model_matrix(lay, part), y, part)
    return out
