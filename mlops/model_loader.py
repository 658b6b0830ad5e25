"""Load a registered model version for scoring: the one loader for gates, batch and serving.

The model's input layout, task and decision threshold travel in its MLmodel metadata, so a
scorer needs only the registry, not the spec or the training code's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops.modeling import MatrixLayout, model_matrix, predict
from mlops.registry import RegistryError, client

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import pandas as pd
    from mlops.lazy import polars as pl


class ModelRefused(RegistryError):
    """The version's content cannot be served: an unsafe or foreign format, missing metadata,
    a model that does not load or does not score its input example. Retrying will not help."""


class UnsafeModelFormat(ModelRefused):
    """The MLmodel or its files name a format this platform does not write (a pickle): refused
    before any deserializer runs."""


class ArtifactsUnavailable(RegistryError):
    """The version's artifacts could not be fetched (storage or registry unreachable, files
    missing): a transient cause, so a caller may retry with backoff."""


@dataclass
class LoadedModel:
    name: str
    version: int
    run_id: str
    task: str
    estimator: str
    threshold: float | None
    layout: MatrixLayout
    model: Any
    input_example: pd.DataFrame | None

    def matrix(self, features: pl.DataFrame | pd.DataFrame) -> pd.DataFrame:
        return model_matrix(self.layout, features)

    def score_matrix(self, X: pd.DataFrame) -> np.ndarray:
        return predict(self.task, self.model, X)

    def score(self, features: pl.DataFrame | pd.DataFrame) -> np.ndarray:
        """Class-1 probability (classification) or the predicted value (regression)."""
        return self.score_matrix(self.matrix(features))

    def decide(self, scores: np.ndarray) -> np.ndarray:
        if self.task != "binary_classification":
            return scores
        return (scores >= (self.threshold if self.threshold is not None else 0.5)).astype("int8")


# Formats ------------------------------------------------------------------------------------
# What this platform writes (mlops/training.py), and nothing else loads: a registry anyone can
# write to must not be a way to run code on every host that loads its champion.
XGBOOST_CLASSES = {
    "xgboost.sklearn.XGBClassifier": "XGBClassifier",
    "xgboost.sklearn.XGBRegressor": "XGBRegressor",
    "xgboost.core.Booster": "Booster",
}
# Files no deserializer here opens, whatever the MLmodel says: their mere presence in a
# version is refused (a pickle beside a JSON model is someone's way in, or a mistake).
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".cloudpickle", ".dill", ".pt", ".pth", ".sav")
# skops types a platform model may hold: scikit-learn, numpy, scipy and xgboost objects,
# less the parts of those packages that read files or run code.
TRUSTED_MODULES = ("sklearn.", "numpy.", "scipy.", "xgboost.")
UNTRUSTED_MODULES = (
    "numpy.f2py",
    "numpy.distutils",
    "numpy.testing",
    "numpy.ctypeslib",
    "numpy.lib.npyio",
    "numpy.load",
    "numpy.save",
    "numpy.fromfile",
    "numpy.memmap",
    "scipy.io",
    "scipy.weave",
    "sklearn.utils._testing",
    "sklearn.datasets",
    "xgboost.testing",
    "xgboost.callback",
)
PICKLE_MAGIC = b"\x80"  # protocol 2+; protocol 0/1 pickles start with an opcode letter
ZIP_MAGIC = b"PK\x03\x04"  # a skops file is a zip archive


def skops_type_trusted(name: str) -> bool:
    return name.startswith(TRUSTED_MODULES) and not any(
        name == m or name.startswith(m + ".") or name.startswith(m + "_") for m in UNTRUSTED_MODULES
    )


@dataclass(frozen=True)
class ModelFile:
    """The checked model file: which deserializer may open it, and how."""

    flavor: str  # xgboost | sklearn
    path: Path
    xgboost_class: str = ""
    trusted_types: tuple[str, ...] = ()


def check_format(uri: str, local: Path, conf: Any, source: str = "") -> ModelFile:
    """Refuse (UnsafeModelFormat) anything but the formats the platform writes, from the
    MLmodel and the files alone: no deserializer has run when this returns."""
    flavors = dict(conf.flavors or {})
    ours = sorted(set(flavors) & {"xgboost", "sklearn"})
    foreign = sorted(set(flavors) - {"xgboost", "sklearn", "python_function"})
    if len(ours) != 1 or foreign:
        raise UnsafeModelFormat(
            f"{uri} has flavors {sorted(flavors)}: this platform loads exactly one of xgboost "
            "(JSON) or sklearn (skops)"
        )
    flavor = ours[0]
    fc = flavors[flavor] or {}
    for name, c in flavors.items():
        if (c or {}).get("code"):  # code paths go on sys.path before loading: refused
            raise UnsafeModelFormat(f"{uri}: the {name} flavor ships code ({c['code']})")
    pyfunc = flavors.get("python_function") or {}
    if pyfunc and pyfunc.get("loader_module") not in (None, f"mlflow.{flavor}"):
        raise UnsafeModelFormat(
            f"{uri}: python_function loader_module {pyfunc.get('loader_module')!r} is not "
            f"mlflow.{flavor}"
        )
    if flavor == "xgboost":
        fmt, data = fc.get("model_format"), str(fc.get("data") or "")
        if fmt != "json" or not data.endswith(".json"):
            raise UnsafeModelFormat(
                f"{uri}: xgboost model_format {fmt!r} (file {data!r}); this platform writes "
                "and loads only model_format json (model.json)"
            )
        _no_pickles(uri, local, f"xgboost model_format {fmt}")
        cls = str(fc.get("model_class") or "xgboost.core.Booster")
        if cls not in XGBOOST_CLASSES:
            raise UnsafeModelFormat(f"{uri}: xgboost model_class {cls!r} is not an xgboost model")
        path = _inside(uri, local, data, source)
        _expect_magic(uri, path, b"{", "json")
        return ModelFile("xgboost", path, xgboost_class=cls)
    fmt, data = fc.get("serialization_format"), str(fc.get("pickled_model") or "")
    if fmt != "skops" or not data.endswith(".skops"):
        raise UnsafeModelFormat(
            f"{uri}: sklearn serialization_format {fmt!r} (file {data!r}); this platform "
            "writes and loads only serialization_format skops (model.skops)"
        )
    _no_pickles(uri, local, f"sklearn serialization_format {fmt}")
    recorded = fc.get("skops_trusted_types") or []
    if not isinstance(recorded, list) or not all(isinstance(t, str) for t in recorded):
        raise UnsafeModelFormat(f"{uri}: skops_trusted_types is not a list of type names")
    path = _inside(uri, local, data, source)
    _expect_magic(uri, path, ZIP_MAGIC, "skops")
    import skops.io

    try:  # reads the file's schema only: nothing is constructed
        held = skops.io.get_untrusted_types(file=path)
    except Exception as e:
        raise ModelRefused(f"{uri}: {data} is not a readable skops file: {e}") from None
    unrecorded = sorted(set(held) - set(recorded))
    if unrecorded:
        raise UnsafeModelFormat(
            f"{uri}: skops format file {data} holds types its MLmodel does not list as "
            f"trusted: {unrecorded}"
        )
    refused = sorted(t for t in held if not skops_type_trusted(t))
    if refused:
        raise UnsafeModelFormat(
            f"{uri}: skops format file {data} holds types outside scikit-learn, numpy, scipy "
            f"and xgboost: {refused}"
        )
    return ModelFile("sklearn", path, trusted_types=tuple(held))


def _no_pickles(uri: str, local: Path, declared: str) -> None:
    """No pickle-family file, and no link, anywhere in the version's files."""
    for p in sorted(local.rglob("*")):
        if p.is_symlink():
            raise UnsafeModelFormat(f"{uri} ({declared}): {p.relative_to(local)} is a link")
        if p.is_file() and p.name.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeModelFormat(
                f"{uri} ({declared}) also holds {p.relative_to(local)}, a pickle-family file: "
                "this platform loads only xgboost JSON and skops models and refuses versions "
                "that carry pickles"
            )


def _inside(uri: str, local: Path, name: str, source: str) -> Path:
    path = (local / name).resolve()
    if not path.is_relative_to(local.resolve()):
        raise UnsafeModelFormat(f"{uri}: model file {name!r} is outside the model's artifacts")
    if not path.is_file():
        raise ArtifactsUnavailable(
            f"{uri}: its model file {name} is missing from its artifacts at "
            f"{source} (deleted, or not fully uploaded)"
        )
    return path


def _expect_magic(uri: str, path: Path, magic: bytes, fmt: str) -> None:
    """A pickle under a declared format's name is refused as unsafe; other content that is
    not the format is left to the format's own (non-executing) parser to reject."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(PICKLE_MAGIC):
        raise UnsafeModelFormat(f"{uri}: {path.name} is declared {fmt} format but it is a pickle")
    if not head.startswith(magic) and fmt == "skops":
        raise ModelRefused(f"{uri}: {path.name} is not a skops file (not a zip archive)")


def deserialize(uri: str, mf: ModelFile) -> Any:
    """Open a checked model file with its own loader (never pickle); ModelRefused if it
    does not load."""
    try:
        if mf.flavor == "xgboost":
            import xgboost as xgb

            model = getattr(xgb, XGBOOST_CLASSES[mf.xgboost_class])()
            model.load_model(str(mf.path))
            return model
        import skops.io

        return skops.io.load(mf.path, trusted=list(mf.trusted_types))
    except Exception as e:  # a truncated or corrupt file fails in many ways: all refusals
        raise ModelRefused(f"{uri} does not load: {type(e).__name__}: {e}") from None


# Loading ------------------------------------------------------------------------------------


def _source(c: Any, mv: Any) -> str:
    """Where the version's files live: its source and the storage location it resolves to."""
    source = str(mv.source or "") or "(no source recorded)"
    try:
        where = c.get_model_version_download_uri(mv.name, mv.version)
        if where.startswith("runs:/"):
            from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

            where = RunsArtifactRepository.get_underlying_uri(where)
    except Exception:  # only for the message: the download says what is wrong
        return source
    return source if where in (None, "", source) else f"{source} ({where})"


def load_model(
    tracking_uri: str, name: str, version: int | None = None, alias: str | None = None
) -> LoadedModel:
    """Load `models:/<name>/<version>` or `models:/<name>@<alias>`, only in the formats the
    platform writes: checked (check_format) before any deserializer runs.

    Raises UnsafeModelFormat / ModelRefused for content that cannot be served, and
    ArtifactsUnavailable when the registry or the files cannot be reached (retry later)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from mlops.registry import not_found

    c = client(tracking_uri)
    what = f"alias '{alias}'" if alias else f"version {version}"
    try:
        mv = (
            c.get_model_version_by_alias(name, alias)
            if alias
            else c.get_model_version(name, str(version))
        )
    except MlflowException as e:
        if not_found(e):
            raise RegistryError(f"model {name} has no {what}: {e.message}") from None
        raise ArtifactsUnavailable(
            f"cannot read {name} {what} from the registry at {tracking_uri}: {e.message}"
        ) from e
    uri = f"models:/{name}/{mv.version}"
    source = _source(c, mv)
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as e:  # MlflowException, OSError, the object store's client errors
        detail = getattr(e, "message", None) or str(e)
        if "No such artifact" in detail:  # MLflow names the path relative to the root: ''
            detail = "nothing is stored there (moved, deleted, or not uploaded yet)"
        raise ArtifactsUnavailable(
            f"cannot fetch the artifacts of {uri} from {source}: {detail}"
        ) from e
    if not (local / "MLmodel").is_file():
        raise ArtifactsUnavailable(
            f"{uri}: no MLmodel file in its artifacts at {source} (missing or not fully uploaded)"
        )
    try:
        conf = Model.load(str(local))
    except OSError as e:
        raise ArtifactsUnavailable(f"{uri}: cannot read MLmodel at {source}: {e}") from e
    except Exception as e:  # bad YAML, wrong structure: content, not transient
        raise ModelRefused(f"{uri}: its MLmodel is not readable: {type(e).__name__}: {e}") from None
    meta = conf.metadata or {}
    missing = [k for k in ("layout", "task") if k not in meta]
    if missing:
        raise ModelRefused(f"{uri} was not logged by this platform (no {missing} metadata)")
    checked = check_format(uri, local, conf, source)
    model = deserialize(uri, checked)
    example = None
    info = conf.saved_input_example_info
    if info:
        if info.get("type") != "dataframe":
            raise ModelRefused(f"{uri}: its input example is {info.get('type')!r}, not a dataframe")
        try:
            example = conf.load_input_example(str(local))
        except Exception as e:
            raise ModelRefused(f"{uri}: its input example does not load: {e}") from None
    threshold = meta.get("threshold")
    try:
        return LoadedModel(
            name=name,
            version=int(mv.version),
            run_id=mv.run_id,
            task=meta["task"],
            estimator=meta.get("estimator", ""),
            threshold=float(threshold) if threshold is not None else None,
            layout=MatrixLayout.from_dict(meta["layout"]),
            model=model,
            input_example=pd.DataFrame(example) if example is not None else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelRefused(f"{uri}: its platform metadata is malformed: {e!r}") from None


def verify_servable(tracking_uri: str, name: str, version: int) -> LoadedModel:
    """Load `version` and score its input example, as the serving loader does: one finite
    score per row. ModelRefused with the reason when it cannot serve (ArtifactsUnavailable,
    from the load, when its files cannot be reached now)."""
    loaded = load_model(tracking_uri, name, version=version)
    uri = f"models:/{name}/{version}"
    ex = loaded.input_example
    if ex is None or ex.empty:
        raise ModelRefused(f"{uri} has no input example to score")
    if list(ex.columns) != loaded.layout.columns:
        raise ModelRefused(f"{uri}: its input example's columns differ from its input layout")
    try:
        scores = np.asarray(loaded.score_matrix(ex), dtype="float64")
    except Exception as e:  # any failure to score is a refusal
        raise ModelRefused(
            f"{uri}: scoring its input example failed: {type(e).__name__}: {e}"
        ) from None
    if scores.shape != (len(ex),) or not np.all(np.isfinite(scores)):
        raise ModelRefused(
            f"{uri}: its input example does not score one finite value per row "
            f"(shape {scores.shape}, {int(np.sum(~np.isfinite(scores)))} not finite)"
        )
    return loaded
