"""Batch scoring: the champion over a day's feature rows (the batch_predictions asset).

`score_frame` is the contract the online service must match row for row
(tests/test_serving.py): the input rows' keys, the score, the decision and the model version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlops import registry
from mlops.labels import entity_column
from mlops.model_loader import ArtifactsUnavailable, LoadedModel, ModelRefused, load_model
from mlops.spec import Spec

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl


class ChampionUnavailable(RuntimeError):
    """No champion can score: the message says why and what to do."""


def load_champion(spec: Spec, tracking_uri: str) -> LoadedModel:
    """The version the champion alias names, loaded and checked (mlops.model_loader)."""
    try:
        return load_model(tracking_uri, spec.registered_model_name, alias=registry.CHAMPION)
    except ModelRefused as e:
        raise ChampionUnavailable(
            f"the champion cannot score: {e}. Roll back to a former champion "
            "(mlops rollback) or promote another version."
        ) from None
    except ArtifactsUnavailable as e:
        raise ChampionUnavailable(f"{e}. Check the artifact store, then re-run the day.") from None
    except registry.RegistryError as e:
        raise ChampionUnavailable(
            f"{e}. Promote a champion first (champion_model or mlops promote)."
        ) from None


def score_frame(spec: Spec, model: Any, feats: pl.DataFrame) -> pl.DataFrame:
    """Keys of the input rows, score, decision and model version: output keys = input keys."""
    keys = [entity_column(spec), spec.source.timestamp_column]
    scores = model.score(feats) if feats.height else []
    return feats.select(keys).with_columns(
        pl.Series("score", scores, dtype=pl.Float64),
        pl.Series("decision", model.decide(scores) if feats.height else [], dtype=pl.Float64),
        pl.lit(model.version, dtype=pl.Int64).alias("model_version"),
    )
