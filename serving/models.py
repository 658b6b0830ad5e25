"""The models a server scores with: a fast scorer per loaded version, explanations, and the
manager that follows the registry aliases and swaps versions off the request path.

A new version is loaded through mlops.model_loader.load_model (the loader the promotion
gate smoke-tests), smoke-scored on its input example in the manager's thread, and only then
published by replacing one reference (`ModelManager.snapshot`). A request reads the
snapshot once, so it is scored, explained and logged by one version, whatever happens to
the aliases meanwhile. A version that fails to load or to score for its content (it does
not deserialize, an unsafe format, missing metadata, its input example does not score) is
refused: the old one keeps serving, the refusal is logged and counted, and the version is
not retried. A version that could not be loaded for a transient cause (the registry or the
artifact store unreachable, its artifacts missing) is not refused: it is tried again with
backoff (doubling from `retry_s` up to `retry_max_s`), and served once it loads.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlops.model_loader import ArtifactsUnavailable, LoadedModel, ModelRefused
from mlops.registry import CHALLENGER, CHAMPION
from mlops.spec import Spec

log = logging.getLogger("mlops.serving")
FAST_PATH_TOLERANCE = 1e-9


class Refused(Exception):
    """A registered version the server will not serve; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unavailable(RuntimeError):
    """A version could not be loaded for a transient cause: nothing is known about the
    version itself, so it is not refused; it is tried again with backoff."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RegistryUnavailable(Unavailable):
    """The tracking server could not be reached while loading a version."""


class ArtifactsMissing(Unavailable):
    """The version's artifacts could not be fetched (storage unreachable, files missing)."""


# Requests to the tracking server from a serving worker. MLflow's defaults (7 retries with
# exponential backoff, 120 s timeout) keep one poll blocked for minutes while the server is
# down, and asleep in a long backoff after it is back: the poller itself retries every
# --poll-interval, so a poll should fail within seconds. The environment still overrides.
REGISTRY_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def bound_registry_requests() -> None:
    """Set REGISTRY_HTTP_DEFAULTS in this (worker) process where they are not set."""
    import os

    for key, value in REGISTRY_HTTP_DEFAULTS.items():  # MLflow's variables, not settings
        os.environ.setdefault(key, value)


def registry_unreachable(error: BaseException) -> bool:
    """True when `error`, or an error it wraps, is a failure to reach the tracking server
    (refused, reset, timed out, retries exhausted) rather than a problem with the version.
    MLflow wraps these in MlflowException (and the loader in RegistryError) with the
    original kept as the context."""
    import requests

    transient = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        requests.exceptions.ChunkedEncodingError,
        ConnectionError,
        TimeoutError,
    )
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, transient):
            return True
        text = str(e)
        if "API request to" in text and ("Max retries exceeded" in text or "timeout" in text):
            return True
        e = e.__cause__ or e.__context__
    return False


# Scoring ---------------------------------------------------------------------------------------


class Scorer:
    """Feature dicts -> the model matrix (mlops.modeling.model_matrix's columns and values)
    -> scores. For xgboost the booster predicts in place on a numpy row (no pandas, one
    thread); other estimators go through the loader's own path. The fast path is used only
    if it reproduces the loader's scores on the input example (`check`)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        lay = loaded.layout
        self.columns = lay.columns
        self.numeric = list(lay.numeric)
        self.onehot: list[tuple[str, dict[str, int]]] = []
        j = len(self.numeric)
        for col, cats in lay.categorical.items():
            self.onehot.append((col, {c: j + k for k, c in enumerate(cats)}))
            j += len(cats)
        self.width = j
        self.kind = "loader"
        self.iteration_range = (0, 0)
        self._fast: Callable[[np.ndarray], np.ndarray] | None = None
        model = loaded.model
        if hasattr(model, "get_booster"):
            booster = model.get_booster()
            booster.set_param({"nthread": 1})  # one row at a time: threads only add latency
            best = _best_iteration(model)  # early stopping: predict with the best trees only
            rng = self.iteration_range = (0, best + 1) if best is not None else (0, 0)

            def fast(X: np.ndarray) -> np.ndarray:
                out = booster.inplace_predict(X, iteration_range=rng, validate_features=False)
                return np.asarray(out, dtype="float64").reshape(len(X))

            self._fast = fast
            self.kind = "xgboost_inplace"

    def matrix(self, rows: list[dict[str, Any]]) -> np.ndarray:
        X = np.zeros((len(rows), self.width), dtype="float64")
        nan = float("nan")
        for i, f in enumerate(rows):
            x = X[i]
            for j, c in enumerate(self.numeric):
                v = f.get(c)
                x[j] = nan if v is None else v
            for col, index in self.onehot:
                k = index.get(f.get(col))  # an unknown category (or none) is all zeros
                if k is not None:
                    x[k] = 1.0
        return X

    def matrix_from_columns(self, columns: dict[str, np.ndarray], n: int) -> np.ndarray:
        """`matrix` of n rows from feature columns (the kernel's outputs, NaN = missing):
        the same values, a column at a time instead of a row at a time."""
        X = np.zeros((n, self.width), dtype="float64")
        for j, c in enumerate(self.numeric):
            v = columns.get(c)
            X[:, j] = np.nan if v is None else v
        for col, index in self.onehot:
            v = columns.get(col)
            if v is None:
                continue
            for category, k in index.items():  # an unknown category (or none) is all zeros
                X[:, k] = v == category
        return X

    def reference(self, X: np.ndarray) -> np.ndarray:
        import pandas as pd

        return self.loaded.score_matrix(pd.DataFrame(X, columns=self.columns))

    def score(self, X: np.ndarray) -> np.ndarray:
        return self._fast(X) if self._fast is not None else self.reference(X)

    def decide(self, scores: np.ndarray) -> list[Any]:
        out = self.loaded.decide(scores)
        return (
            [int(d) for d in out]
            if self.loaded.task == "binary_classification"
            else list(map(float, out))
        )

    def check(self) -> None:
        """Smoke-score the input example through the loader; raise Refused when it cannot."""
        ex = self.loaded.input_example
        if ex is None or ex.empty:
            raise Refused("it has no input example to smoke-score")
        if list(ex.columns) != self.columns:
            raise Refused(
                f"its input example's columns {list(ex.columns)[:5]}... differ from its layout"
            )
        try:
            want = self.loaded.score_matrix(ex)
        except Exception as e:  # any failure to score is a refusal, not a crash
            raise Refused(f"scoring its input example failed: {type(e).__name__}: {e}") from None
        if want.shape != (len(ex),) or not np.all(np.isfinite(want)):
            raise Refused(f"its input example scores are not one finite value per row: {want!r}")
        if self._fast is not None:
            try:
                got = self._fast(ex.to_numpy(dtype="float64"))
                same = float(np.max(np.abs(got - want))) <= FAST_PATH_TOLERANCE
            except Exception as e:
                log.warning("fast path unavailable (%s); scoring through the loader", e)
                same = False
            if not same:
                log.warning("fast path disagrees with the loader; scoring through the loader")
                self._fast, self.kind = None, "loader"


def _best_iteration(model: Any) -> int | None:
    try:
        best = model.best_iteration
    except AttributeError:
        return None
    return None if best is None else int(best)


# Explanations ----------------------------------------------------------------------------------


class Explainer:
    """Top feature contributions of each row: `method` says how they were computed and
    `space` in what unit (log_odds, the margin, or the score itself)."""

    method = ""
    space = ""

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n x p contributions, n base values)."""
        raise NotImplementedError

    def explain(self, X: np.ndarray, columns: list[str], top: int) -> list[dict[str, Any]]:
        contrib, base = self.contributions(X)
        out = []
        for i in range(len(X)):
            c = contrib[i]
            order = np.argsort(-np.abs(c), kind="stable")[:top]
            out.append(
                {
                    "method": self.method,
                    "space": self.space,
                    "base_value": float(base[i]),
                    "top": [
                        {
                            "feature": columns[j],
                            "value": None if np.isnan(X[i, j]) else float(X[i, j]),
                            "contribution": float(c[j]),
                        }
                        for j in order
                    ],
                    "rest": float(c.sum() - c[order].sum()),
                }
            )
        return out


class XGBoostContributions(Explainer):
    """xgboost's own pred_contribs (TreeSHAP): contributions + base = the margin."""

    method = "xgboost_pred_contribs"

    def __init__(self, scorer: Scorer, task: str):
        import xgboost as xgb

        self._xgb = xgb
        self.booster = scorer.loaded.model.get_booster()
        self.range = scorer.iteration_range
        self.space = "log_odds" if task == "binary_classification" else "prediction"

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dm = self._xgb.DMatrix(X, feature_names=self.booster.feature_names)
        out = self.booster.predict(dm, pred_contribs=True, iteration_range=self.range)
        return out[:, :-1], out[:, -1]


class LinearContributions(Explainer):
    """Linear models (logistic regression, ridge) behind an imputer and a scaler:
    contribution = coefficient x the standardized (imputed, scaled) value; with the
    intercept as base they add up to the log-odds (or the prediction)."""

    method = "linear_coef_x_standardized_value"

    def __init__(self, scorer: Scorer, task: str):
        from sklearn.pipeline import Pipeline

        model = scorer.loaded.model
        self.pre = Pipeline(model.steps[:-1]) if len(model.steps) > 1 else None
        est = model.steps[-1][1]
        self.coef = np.asarray(est.coef_, dtype="float64").reshape(-1)
        self.intercept = float(np.asarray(est.intercept_).reshape(-1)[0])
        self.columns = scorer.columns
        self.space = "log_odds" if task == "binary_classification" else "prediction"

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import pandas as pd

        Z = X
        if self.pre is not None:
            Z = np.asarray(self.pre.transform(pd.DataFrame(X, columns=self.columns)), "float64")
        return Z * self.coef, np.full(len(X), self.intercept)


class OcclusionContributions(Explainer):
    """Any other estimator: contribution = score(x) - score(x with the feature set to the
    input example's median), one extra score per feature; base = score at the median."""

    method = "occlusion_vs_input_example_median"
    space = "score"

    def __init__(self, scorer: Scorer):
        ex = scorer.loaded.input_example
        self.scorer = scorer
        self.baseline = np.nanmedian(ex.to_numpy(dtype="float64"), axis=0)

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, p = X.shape
        out = np.zeros((n, p))
        for i in range(n):
            rows = np.repeat(X[i : i + 1], p + 1, axis=0)
            rows[np.arange(p), np.arange(p)] = self.baseline
            s = self.scorer.score(rows)
            out[i] = s[p] - s[:p]
        base = self.scorer.score(self.baseline.reshape(1, -1).repeat(n, axis=0))
        return out, base


def make_explainer(scorer: Scorer) -> Explainer:
    model, task = scorer.loaded.model, scorer.loaded.task
    if hasattr(model, "get_booster"):
        return XGBoostContributions(scorer, task)
    steps = getattr(model, "steps", None)
    if steps and hasattr(steps[-1][1], "coef_"):
        return LinearContributions(scorer, task)
    return OcclusionContributions(scorer)


# A served version ------------------------------------------------------------------------------


@dataclass
class ServedModel:
    alias: str
    version: int
    scorer: Scorer
    explainer: Explainer | None
    explain_error: str | None
    info: dict[str, Any]

    @property
    def loaded(self) -> LoadedModel:
        return self.scorer.loaded


def lineage_summary(tags: dict[str, str]) -> dict[str, Any]:
    from mlops.registry import DATA_PARTITIONS_TAG, lineage_from_tags

    lin = lineage_from_tags(tags)
    parts = lin.get("training_partitions") or []
    return {
        "spec_name": lin.get("spec_name"),
        "spec_hash": (lin.get("spec_hash") or "")[:12] or None,
        "dagster_run_id": lin.get("dagster_run_id"),
        "mlflow_run_id": lin.get("mlflow_run_id"),
        "training_window": [parts[0], parts[-1]] if parts else None,
        "training_days": len(parts),
        "training_set_hash": (lin.get("training_set_hash") or "")[:16] or None,
        "code_version": lin.get("code_version"),
        # The count tag (the hashes are in the run's lineage artifact); older versions: a tag each.
        "input_partitions": int(
            tags.get(DATA_PARTITIONS_TAG)
            or sum(len(v) for v in lin.get("data_versions", {}).values())
        ),
        "deployed_at": lin.get("deployed_at"),
        "deployment_reason": lin.get("deployment_reason"),
    }


def load_served(tracking_uri: str, spec: Spec, alias: str, version: int) -> ServedModel:
    """Load and smoke-score one version; raise Refused with the reason when it cannot serve,
    RegistryUnavailable when the tracking server could not be reached (retried next poll:
    a registry restart during a load must not refuse a good version for good)."""
    from mlops.model_loader import load_model
    from mlops.registry import version_tags

    name = spec.registered_model_name
    try:
        loaded = load_model(tracking_uri, name, version=version)
    except ModelRefused as e:
        raise Refused(f"it did not load: {type(e).__name__}: {e}") from None
    except Exception as e:  # a broken artifact fails in many ways: all but these are refusals
        if registry_unreachable(e):
            raise RegistryUnavailable(f"loading {name} v{version}: {e}") from e
        if isinstance(e, ArtifactsUnavailable):
            raise ArtifactsMissing(f"its artifacts cannot be fetched: {e}") from e
        raise Refused(f"it did not load: {type(e).__name__}: {e}") from None
    scorer = Scorer(loaded)
    scorer.check()
    explainer, explain_error = None, None
    try:
        explainer = make_explainer(scorer)
        explainer.explain(loaded.input_example.head(1).to_numpy(dtype="float64"), scorer.columns, 1)
    except Exception as e:  # explanations are optional: serve without them, say why
        explainer, explain_error = None, f"{type(e).__name__}: {e}"
        log.warning("%s v%s: explanations unavailable (%s)", name, version, explain_error)
    try:
        lineage = lineage_summary(version_tags(tracking_uri, name, version))
    except Exception as e:
        if registry_unreachable(e):  # else it would serve without lineage for good
            raise RegistryUnavailable(f"reading the tags of {name} v{version}: {e}") from e
        lineage = {"error": f"tags unavailable: {e}"}
    info = {
        "name": name,
        "version": version,
        "run_id": loaded.run_id,
        "task": loaded.task,
        "estimator": loaded.estimator,
        "threshold": loaded.threshold,
        "features": len(scorer.columns),
        "scorer": scorer.kind,
        "explanations": explainer.method if explainer else f"unavailable: {explain_error}",
        "loaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "lineage": lineage,
    }
    return ServedModel(alias, version, scorer, explainer, explain_error, info)


# Following the aliases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What requests score with; replaced as a whole, never changed in place."""

    champion: ServedModel | None = None
    challenger: ServedModel | None = None


@dataclass
class Retry:
    """A version that could not be loaded for a transient cause, and when to try again."""

    reason: str
    attempts: int
    delay_s: float
    next_at: float  # time.monotonic()

    def info(self, alias: str, version: int) -> dict[str, Any]:
        return {
            "alias": alias,
            "version": version,
            "reason": self.reason,
            "attempts": self.attempts,
            "next_retry_in_s": round(max(0.0, self.next_at - time.monotonic()), 1),
        }


@dataclass
class ManagerEvents:
    swaps: int = 0
    refusals: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=20))


class ModelManager:
    """Polls the registry aliases every `interval_s` in a daemon thread; loads, checks and
    publishes new versions there, so requests never wait for a load."""

    def __init__(
        self,
        spec: Spec,
        tracking_uri: str,
        interval_s: float,
        with_challenger: bool,
        on_swap: Callable[[str, int], None] | None = None,
        on_refusal: Callable[[str, int, str], None] | None = None,
        loader: Callable[[str, Spec, str, int], ServedModel] = load_served,
        retry_s: float = 1.0,
        retry_max_s: float = 60.0,
        on_retry: Callable[[str, int, str], None] | None = None,
    ):
        self.spec, self.tracking_uri, self.interval_s = spec, tracking_uri, interval_s
        self.aliases = (CHAMPION, CHALLENGER) if with_challenger else (CHAMPION,)
        self.snapshot = Snapshot()
        self.refused: dict[tuple[str, int], str] = {}  # for its content: never retried
        self.retrying: dict[tuple[str, int], Retry] = {}  # for a transient cause
        self.retry_s, self.retry_max_s, self._on_retry = retry_s, retry_max_s, on_retry
        self.events = ManagerEvents()
        self.last_poll_error: str | None = None
        self._on_swap, self._on_refusal, self._loader = on_swap, on_refusal, loader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
                self.last_poll_error = None
            except Exception as e:  # the registry may be briefly unreachable: try again
                self.last_poll_error = f"{type(e).__name__}: {e}"
                log.warning("registry poll failed (will retry): %s", self.last_poll_error)
            self._stop.wait(self.interval_s)

    def alias_versions(self) -> dict[str, int]:
        from mlflow.exceptions import MlflowException

        from mlops.registry import client

        try:
            model = client(self.tracking_uri).get_registered_model(self.spec.registered_model_name)
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
                return {}  # nothing registered yet
            raise
        return {a: int(v) for a, v in (model.aliases or {}).items()}

    def poll_once(self) -> None:
        """Follow the aliases once. A registry that could not be reached during a load
        fails the poll (after the other alias had its turn), so readiness reports it."""
        wanted = self.alias_versions()
        unreachable: RegistryUnavailable | None = None
        for alias in self.aliases:
            version = wanted.get(alias)
            for key in [k for k in self.retrying if k[0] == alias and k[1] != version]:
                del self.retrying[key]  # the alias moved on
            current: ServedModel | None = getattr(self.snapshot, alias)
            if version is None:
                if alias == CHALLENGER and current is not None:
                    self._publish(alias, None)  # the challenger alias was removed
                continue  # a removed champion alias: keep serving what is loaded
            if current is not None and current.version == version:
                continue
            if (alias, version) in self.refused:
                continue
            retry = self.retrying.get((alias, version))
            if retry is not None and time.monotonic() < retry.next_at:
                continue  # backing off
            other: ServedModel | None = (
                self.snapshot.challenger if alias == CHAMPION else self.snapshot.champion
            )
            if other is not None and other.version == version:
                served = dataclasses.replace(other, alias=alias)  # e.g. a promoted challenger
            else:
                try:
                    served = self._loader(self.tracking_uri, self.spec, alias, version)
                except Refused as e:
                    self.retrying.pop((alias, version), None)
                    self._refuse(alias, version, e.reason, current)
                    continue
                except Unavailable as e:
                    self._defer(alias, version, e.reason, current)
                    if isinstance(e, RegistryUnavailable):
                        unreachable = unreachable or e
                    continue
            self.retrying.pop((alias, version), None)
            self._publish(alias, served)
        if unreachable is not None:
            raise unreachable

    def _defer(self, alias: str, version: int, reason: str, current: ServedModel | None) -> None:
        """Try the version again later: after retry_s, doubling up to retry_max_s."""
        before = self.retrying.get((alias, version))
        attempts = before.attempts + 1 if before else 1
        delay = min(self.retry_s * 2 ** (attempts - 1), self.retry_max_s)
        self.retrying[(alias, version)] = Retry(reason, attempts, delay, time.monotonic() + delay)
        keeps = f"v{current.version} keeps serving" if current else "nothing is serving"
        if before is None:
            self.events.recent.append(
                {
                    "event": "retry",
                    "alias": alias,
                    "version": version,
                    "reason": reason,
                    "at": _now(),
                }
            )
        log.warning(
            "could not load %s v%s as %s (attempt %d, next in %.1f s): %s; %s",
            self.spec.registered_model_name,
            version,
            alias,
            attempts,
            delay,
            reason,
            keeps,
        )
        if self._on_retry is not None:
            self._on_retry(alias, version, reason)

    def _publish(self, alias: str, served: ServedModel | None) -> None:
        before = getattr(self.snapshot, alias)
        self.snapshot = dataclasses.replace(self.snapshot, **{alias: served})  # the one swap
        # What is loaded now lives as long as the process: keep it out of the garbage
        # collector's full passes, which otherwise stall a request now and then. (No
        # gc.collect() first: a full pass here would hold the GIL against requests.)
        gc.freeze()
        if served is None:
            log.info("%s alias removed: no longer scoring v%s", alias, before.version)
            return
        self.events.swaps += 1
        what = f"v{before.version} -> v{served.version}" if before else f"v{served.version}"
        self.events.recent.append({"event": "swap", "alias": alias, "detail": what, "at": _now()})
        log.info(
            "%s %s: %s now serving (%s)",
            self.spec.registered_model_name,
            alias,
            what,
            served.scorer.kind,
        )
        if self._on_swap is not None:
            self._on_swap(alias, served.version)

    def _refuse(self, alias: str, version: int, reason: str, current: ServedModel | None) -> None:
        self.refused[(alias, version)] = reason
        self.events.refusals += 1
        keeps = f"v{current.version} keeps serving" if current else "nothing is serving"
        self.events.recent.append(
            {"event": "refusal", "alias": alias, "version": version, "reason": reason, "at": _now()}
        )
        log.error(
            "refused %s v%s as %s: %s; %s",
            self.spec.registered_model_name,
            version,
            alias,
            reason,
            keeps,
        )
        if self._on_refusal is not None:
            self._on_refusal(alias, version, reason)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
