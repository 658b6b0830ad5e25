"""MLflow tracking and registry: experiments, aliases, lineage tags, deployment history.

mlflow is imported inside functions: this module is imported by every Dagster process and
the CLI, and mlflow takes seconds to import.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mlops.lake import Lake

if TYPE_CHECKING:
    import polars as pl
else:
    from mlops.lazy import polars as pl

CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "mlops."  # every tag this project writes starts with it
HISTORY_ASSET = "deployments"  # the single-file history of earlier versions, read only
HISTORY_LOG_ASSET = "deployment_log"  # one file per entry: appends never race
# Actions that moved the champion alias; a `refused` row records a challenger the gate kept
# out (to_version: the refused version, from_version: the champion that kept serving).
MOVES = ("promote", "force_promote", "rollback", "force_rollback")
PROMOTIONS = ("promote", "force_promote")
REFUSED = "refused"
# Lineage tags every model version carries (DESIGN §5). The data version of each input
# partition is not a tag: the mapping {asset: {partition: content hash}} is the
# `data_versions` entry of the training run's artifact LINEAGE_ARTIFACT, and the run and the
# version carry two tags about it: DATA_VERSIONS_DIGEST_TAG (the sha256 of the mapping's
# canonical JSON, data_versions_digest) and DATA_PARTITIONS_TAG (how many partitions).
# Versions registered before that carry one tag per partition instead,
# mlops.data_version.<asset>.<partition> (LEGACY_DATA_VERSION_TAG): still read.
LINEAGE_TAGS = (
    "spec_name",
    "spec_hash",
    "dagster_run_id",
    "training_partitions",
    "training_set_hash",
    "code_version",
    "seed",
    "trials",
    # What started the training (DESIGN §6): a sensor, a schedule or a person.
    "trigger",
    "trigger_reason",
)
# Written when known: the partition whose evidence started it (sensor-started runs), and the
# Dagster run's page (mlops.dagster_run_url: the MLflow UI's way back to Dagster).
OPTIONAL_LINEAGE_TAGS = ("trigger_day", "dagster_run_url")
LINEAGE_ARTIFACT = "lineage/lineage.json"  # the run's lineage dict, data versions included
DATA_VERSIONS_DIGEST_TAG = f"{TAG}data_versions_digest"
DATA_PARTITIONS_TAG = f"{TAG}data_partitions"
LEGACY_DATA_VERSION_TAG = f"{TAG}data_version."  # + <asset>.<partition>: before the digest


# The MLflow UI's experiment kind (MLflow 3): without it an experiment opens in GenAI mode.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class RegistryError(ValueError):
    pass


def history_schema() -> dict[str, pl.DataType]:
    """The deployment history's columns (a function: polars loads only when it is read)."""
    return {
        "time": pl.Datetime("us", "UTC"),
        "action": pl.String,  # promote | force_promote | rollback | force_rollback | refused
        "from_version": pl.Int64,
        "to_version": pl.Int64,
        "reason": pl.String,
        "dagster_run_id": pl.String,
        "mlflow_run_id": pl.String,
        "actor": pl.String,
    }


def client(tracking_uri: str):
    import os

    # MLflow's own variable, set for it (not a platform setting: mlops/settings.py).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str) -> str:
    """The spec's experiment, with artifacts under artifact_root/<name> (created once), of
    the classic model-development kind (EXPERIMENT_KIND_TAG), so the MLflow UI opens it on
    its runs, not on the GenAI traces page."""
    import mlflow

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        # A URI (file://, s3://, the server's mlflow-artifacts:/) as given; a path made absolute.
        scheme = urlsplit(artifact_root).scheme
        location = artifact_root if len(scheme) > 1 else Path(artifact_root).resolve().as_uri()
        exp_id = c.create_experiment(
            name,
            artifact_location=f"{location.rstrip('/')}/{name}",
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    else:
        exp_id = exp.experiment_id
        if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) is None:  # made by an earlier release
            c.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def not_found(e: Exception) -> bool:
    """Is this MlflowException "no such model / version / alias" (and not an outage)?

    MLflow 3 answers a missing model or version with RESOURCE_DOES_NOT_EXIST and a missing
    alias of an existing model with INVALID_PARAMETER_VALUE "Registered model alias ... not
    found" (the same codes over the REST API)."""
    code = str(getattr(e, "error_code", ""))
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return code == "INVALID_PARAMETER_VALUE" and "not found" in str(getattr(e, "message", e))


def _unavailable(tracking_uri: str, what: str, e: Exception) -> RegistryError:
    return RegistryError(
        f"cannot read {what} from the MLflow registry at {tracking_uri}: "
        f"{getattr(e, 'message', e)}; check that the tracking server is up and "
        "MLOPS_MLFLOW_TRACKING_URI is right, then retry"
    )


def alias_version(tracking_uri: str, model_name: str, alias: str) -> int | None:
    """The version `alias` names; None only when the model or the alias does not exist.
    Any other failure (the registry unreachable, ...) raises RegistryError: a gate must not
    take an outage for "no champion yet"."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        return int(c.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as e:
        if not_found(e):
            return None
        raise _unavailable(tracking_uri, f"alias {model_name}@{alias}", e) from e


def set_alias(tracking_uri: str, model_name: str, alias: str, version: int) -> None:
    client(tracking_uri).set_registered_model_alias(model_name, alias, str(version))


def delete_alias(tracking_uri: str, model_name: str, alias: str) -> None:
    from contextlib import suppress

    from mlflow.exceptions import MlflowException

    with suppress(MlflowException):  # no such alias (or model): nothing to delete
        client(tracking_uri).delete_registered_model_alias(model_name, alias)


def _model_version(tracking_uri: str, model_name: str, version: int) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_model_version(model_name, str(version))
    except MlflowException as e:
        if not_found(e):
            raise RegistryError(f"model {model_name} has no version {version}") from None
        raise _unavailable(tracking_uri, f"{model_name} v{version}", e) from e


def version_tags(tracking_uri: str, model_name: str, version: int) -> dict[str, str]:
    return dict(_model_version(tracking_uri, model_name, version).tags)


def tag_version(tracking_uri: str, model_name: str, version: int, tags: dict[str, Any]) -> None:
    c = client(tracking_uri)
    for k, v in tags.items():
        c.set_model_version_tag(model_name, str(version), k, _tag_value(v))


def describe_version(tracking_uri: str, model_name: str, version: int, text: str) -> None:
    """The version's description (Markdown on the MLflow UI's version page)."""
    client(tracking_uri).update_model_version(model_name, str(version), description=text)


def candidate_description(lineage: dict[str, Any], estimator: str) -> str:
    """A new version's description until the gate decides: what trained it, from what."""
    window = lineage.get("training_partitions") or []
    span = f"{window[0]} to {window[-1]}" if window else "-"
    lines = [
        f"**Candidate** ({estimator}), not decided by the promotion gate yet.",
        "",
        f"Trained on {span}; started by {lineage.get('trigger') or 'manual'}: "
        f"{lineage.get('trigger_reason') or '-'}.",
    ]
    if lineage.get("dagster_run_url"):
        lines += [
            "",
            f"Dagster run: [{lineage.get('dagster_run_id', '')[:8]}]({lineage['dagster_run_url']})",
        ]
    return "\n".join(lines)


def _tag_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def data_versions_digest(versions: dict[str, dict[str, str]]) -> str:
    """The sha256 of the data versions' canonical JSON (sorted keys, no spaces): what
    DATA_VERSIONS_DIGEST_TAG holds, whatever the layout the artifact was written with."""
    text = json.dumps(versions, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """Flatten a lineage dict into MLflow tags. The input partitions' data versions are left
    to the run's LINEAGE_ARTIFACT (written from the same dict): here only their digest and
    count, so a version carries a fixed number of tags however long its training window."""
    tags = {f"{TAG}{k}": _tag_value(lineage[k]) for k in LINEAGE_TAGS if k in lineage}
    tags.update({f"{TAG}{k}": str(lineage[k]) for k in OPTIONAL_LINEAGE_TAGS if lineage.get(k)})
    if "data_versions" in lineage:
        versions = lineage["data_versions"]
        tags[DATA_VERSIONS_DIGEST_TAG] = data_versions_digest(versions)
        tags[DATA_PARTITIONS_TAG] = str(sum(len(p) for p in versions.values()))
    return tags


def _sorted_versions(versions: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {a: dict(sorted(p.items())) for a, p in sorted(versions.items())}


def legacy_data_versions(tags: dict[str, str]) -> dict[str, dict[str, str]] | None:
    """The data versions a version's own tags hold: the per-partition tags of a version
    registered before the digest, or {} when it recorded none. None when the tags name a
    digest: the mapping is in the run's artifact (data_versions_from_artifact)."""
    if DATA_VERSIONS_DIGEST_TAG in tags:
        return None
    versions: dict[str, dict[str, str]] = {}
    for k, v in tags.items():
        if k.startswith(LEGACY_DATA_VERSION_TAG):
            asset, part = k.removeprefix(LEGACY_DATA_VERSION_TAG).split(".", 1)
            versions.setdefault(asset, {})[part] = v
    return _sorted_versions(versions)


def lineage_from_tags(
    tags: dict[str, str], data_versions: dict[str, dict[str, str]] | None = None
) -> dict[str, Any]:
    """The lineage dict back from a version's (or run's) tags. `data_versions` is the mapping
    read from the run's artifact; without it, a version that records a digest has no
    "data_versions" key (only "data_versions_digest" and "data_partitions"), so that a caller
    who forgot the artifact fails instead of reading "no inputs"."""
    out: dict[str, Any] = {}
    for k, v in tags.items():
        if not k.startswith(TAG) or k.startswith(LEGACY_DATA_VERSION_TAG):
            continue
        key = k.removeprefix(TAG)
        if key in ("training_partitions", "seed", "trials", "data_partitions"):
            out[key] = json.loads(v)
        else:
            out[key] = v
    versions = data_versions if data_versions is not None else legacy_data_versions(tags)
    if versions is not None:
        out["data_versions"] = _sorted_versions(versions)
        out.setdefault("data_partitions", sum(len(p) for p in versions.values()))
    return out


def data_versions_from_artifact(text: str, digest: str, where: str) -> dict[str, dict[str, str]]:
    """The `data_versions` of a LINEAGE_ARTIFACT's text, checked against the digest tag;
    RegistryError when it lacks them or they are not the ones registered (`where` names the
    file in the message)."""
    try:
        versions = json.loads(text)["data_versions"]
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryError(
            f"{where} holds no data_versions mapping ({type(e).__name__}: {e}); the lineage "
            "of this version cannot be read: restore the artifact from a backup"
        ) from None
    got = data_versions_digest(versions)
    if got != digest:
        raise RegistryError(
            f"{where}: its data_versions hash to {got[:16]}, but the version's "
            f"{DATA_VERSIONS_DIGEST_TAG} tag says {digest[:16]}: the artifact was changed after "
            "the version was registered; restore it from a backup"
        )
    return _sorted_versions(versions)


def load_data_versions(
    tracking_uri: str, run_id: str | None, digest: str
) -> dict[str, dict[str, str]]:
    """The data versions in run `run_id`'s LINEAGE_ARTIFACT, through MLflow (any artifact
    store: the server's mlflow-artifacts:/, S3, a local folder), checked against `digest`."""
    import tempfile

    from mlflow.exceptions import MlflowException

    where = f"run {run_id}'s artifact {LINEAGE_ARTIFACT}"
    if not run_id:
        raise RegistryError(f"a version records {DATA_VERSIONS_DIGEST_TAG} but names no run")
    c = client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, LINEAGE_ARTIFACT, tmp)
            text = Path(path).read_text()
        except (MlflowException, OSError) as e:
            raise RegistryError(
                f"cannot read {where} from {tracking_uri}: {getattr(e, 'message', e)}; check "
                "that the artifact store is reachable and the run's artifacts were not deleted"
            ) from e
    return data_versions_from_artifact(text, digest, where)


def run_id_of(tags: dict[str, str], run_id: str | None = None) -> str | None:
    """The training run of a version: the one it records, else the one MLflow links."""
    return tags.get(f"{TAG}mlflow_run_id") or run_id


def version_lineage(tracking_uri: str, model_name: str, version: int) -> dict[str, Any]:
    """A version's whole lineage through MLflow: its tags and, when they name a digest, the
    data versions from its run's artifact (older versions: from their per-partition tags)."""
    mv = _model_version(tracking_uri, model_name, version)
    tags = dict(mv.tags)
    versions = legacy_data_versions(tags)
    if versions is None:
        run_id = run_id_of(tags, mv.run_id)
        versions = load_data_versions(tracking_uri, run_id, tags[DATA_VERSIONS_DIGEST_TAG])
    return lineage_from_tags(tags, versions)


def aliases(tracking_uri: str, model_name: str) -> dict[int, list[str]]:
    """Version -> its aliases, in one call (version searches carry no aliases)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client(tracking_uri).get_registered_model(model_name)
    except MlflowException as e:
        if not_found(e):
            return {}
        raise _unavailable(tracking_uri, f"the aliases of {model_name}", e) from e
    out: dict[int, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        out.setdefault(int(version), []).append(alias)
    return out


def search_versions(tracking_uri: str, model_name: str) -> list[Any]:
    c = client(tracking_uri)
    return sorted(c.search_model_versions(f"name = '{model_name}'"), key=lambda mv: int(mv.version))


# Deployment history --------------------------------------------------------------------------


@dataclass
class Deployment:
    action: str
    from_version: int | None
    to_version: int
    reason: str
    dagster_run_id: str = ""
    mlflow_run_id: str = ""
    actor: str = "dagster"


def deployment_history(lake: Lake, spec_name: str) -> pl.DataFrame:
    """Every recorded alias move and refusal, oldest first.

    One file per entry (HISTORY_LOG_ASSET, named by time and a random id), so concurrent
    writers never overwrite each other; the single file older versions rewrote on each
    entry (HISTORY_ASSET) is read first when present."""
    frames = []
    if lake.exists(spec_name, HISTORY_ASSET):
        frames.append(lake.read(spec_name, HISTORY_ASSET).with_columns(pl.lit("").alias("_key")))
    keys = lake.partitions(spec_name, HISTORY_LOG_ASSET)
    frames += [
        lake.read(spec_name, HISTORY_LOG_ASSET, k).with_columns(pl.lit(k).alias("_key"))
        for k in keys
    ]
    if not frames:
        return pl.DataFrame(schema=history_schema())
    history = pl.concat([f.select([*history_schema(), "_key"]) for f in frames], how="vertical")
    # The legacy file's rows keep their order; entries sort by time, then their file name.
    return history.with_row_index("_at").sort("time", "_key", "_at").select(list(history_schema()))


def record_deployment(lake: Lake, spec_name: str, d: Deployment) -> pl.DataFrame:
    """Append one alias move, or one refusal, to the history: its own file, written with the
    lake's atomic put, so appends from several processes (mlops promote while champion_model
    runs) never lose one another's entry. Returns the history after it."""
    import uuid

    now = dt.datetime.now(dt.UTC)
    row = pl.DataFrame(
        [
            {
                "time": now,
                "action": d.action,
                "from_version": d.from_version,
                "to_version": d.to_version,
                "reason": d.reason,
                "dagster_run_id": d.dagster_run_id,
                "mlflow_run_id": d.mlflow_run_id,
                "actor": d.actor,
            }
        ],
        schema=history_schema(),
    )
    key = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}"
    lake.write(spec_name, HISTORY_LOG_ASSET, row, key)
    return deployment_history(lake, spec_name)


def recorded_champion(history: pl.DataFrame) -> int | None:
    """The version the history last moved `champion` to (None: it never moved)."""
    moves = history.filter(pl.col("action").is_in(MOVES))
    return int(moves["to_version"][-1]) if moves.height else None


def moved_outside(current: int | None, history: pl.DataFrame) -> dict | None:
    """The registry's `champion` (`current`) when it differs from the last move the history
    recorded (someone set or deleted the alias in MLflow directly): {"alias", "version",
    "recorded"}; None when they agree. MLflow keeps no time or actor for an alias change, so
    none is given. (`challenger` is moved by training without a history entry: not compared.)"""
    recorded = recorded_champion(history)
    if current == recorded:
        return None
    return {"alias": CHAMPION, "version": current, "recorded": recorded}


def move_champion(
    tracking_uri: str, lake: Lake, spec_name: str, model_name: str, d: Deployment
) -> None:
    """Point `champion` at d.to_version, tag the version, and write the history entry."""
    set_alias(tracking_uri, model_name, CHAMPION, d.to_version)
    tag_version(
        tracking_uri,
        model_name,
        d.to_version,
        {
            f"{TAG}deployed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            f"{TAG}deployment_reason": f"{d.action}: {d.reason}",
        },
    )
    record_deployment(lake, spec_name, d)


def previous_champion(lake: Lake, spec_name: str, current: int | None) -> int | None:
    """The champion before the current one was promoted (rollbacks walk further back)."""
    h = deployment_history(lake, spec_name)
    if current is None or h.height == 0:
        return None
    # Only promotions made `current` champion: rollbacks walk back, refusals moved nothing.
    promotions = h.filter(pl.col("action").is_in(PROMOTIONS))
    moves = promotions.filter(pl.col("to_version") == current).sort("time")
    if moves.height == 0:
        return None
    return moves["from_version"][-1]


def reassign_challenger(tracking_uri: str, model_name: str, refused: int) -> int | None:
    """After `refused` was refused: if `challenger` names it, point the alias at the newest
    version still a candidate (registered after the champion, no promotion decision yet), or
    remove it. Returns the version `challenger` names afterwards."""
    current = alias_version(tracking_uri, model_name, CHALLENGER)
    if current != refused:
        return current  # a newer candidate already took the alias
    champion = alias_version(tracking_uri, model_name, CHAMPION)
    candidates = [
        int(mv.version)
        for mv in search_versions(tracking_uri, model_name)
        if int(mv.version) != refused
        and int(mv.version) > (champion or 0)
        and f"{TAG}promotion" not in (mv.tags or {})
    ]
    if candidates:
        set_alias(tracking_uri, model_name, CHALLENGER, candidates[-1])
        return candidates[-1]
    delete_alias(tracking_uri, model_name, CHALLENGER)
    return None
