"""Lineage a user can query: what made a model version, what a data partition touched, and
whether a version can be rebuilt exactly from what it recorded."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops import registry
from mlops.lake import Lake, sha256_bytes
from mlops.registry_reader import RegistryReader
from mlops.spec import Spec, load_spec

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
else:
    from mlops.lazy import numpy as np
    from mlops.lazy import polars as pl

PREDICTIONS = "batch_predictions"


def changed_inputs(spec: Spec, lake: Lake, lin: dict[str, Any]) -> dict[str, str]:
    """Input partitions whose lake file no longer has the recorded data version."""
    changed = {}
    for asset, parts in lin["data_versions"].items():
        for part, recorded in parts.items():
            exists = lake.exists(spec.name, asset, part)
            now = lake.content_hash(spec.name, asset, part) if exists else None
            if now != recorded:
                changed[f"{asset}/{part}"] = "missing" if now is None else "changed"
    return changed


def lineage(spec: Spec, lake: Lake, reg: RegistryReader, version: int) -> dict[str, Any]:
    """The chain for one version: data partitions -> training set -> runs -> evaluation."""
    from mlops.model_evaluation import load_evaluation
    from mlops.promotion import GATE_STATUS_TAG, decision_text

    name = spec.registered_model_name
    mv = next((v for v in reg.versions(name) if v.version == version), None)
    if mv is None:
        raise registry.RegistryError(f"model {name} has no version {version}")
    tags = mv.tags
    lin = registry.lineage_from_tags(tags, reg.data_versions(mv))
    aliases = sorted(mv.aliases)
    changed = changed_inputs(spec, lake, lin)
    evaluation = load_evaluation(lake, spec, version)
    run_id = tags.get(f"{registry.TAG}mlflow_run_id", mv.run_id)
    return {
        "model": name,
        "version": version,
        "aliases": aliases,
        "registered_at": mv.creation_timestamp,
        "estimator": tags.get(f"{registry.TAG}estimator"),
        "mlflow_run_id": run_id,
        "dagster_run_id": lin.get("dagster_run_id"),
        "spec_name": lin.get("spec_name"),
        "spec_hash": lin.get("spec_hash"),
        "code_version": lin.get("code_version"),
        "seed": lin.get("seed"),
        "trials": lin.get("trials"),
        "training_partitions": lin.get("training_partitions", []),
        "training_set_hash": lin.get("training_set_hash"),
        "data_versions": lin["data_versions"],
        # sha256 of the data versions' canonical JSON (None: a version from before the digest)
        "data_versions_digest": lin.get("data_versions_digest"),
        "data_changed_since": changed,
        "evaluation": (evaluation or {}).get("challenger", {}).get("metrics"),
        "gate_status": tags.get(GATE_STATUS_TAG),
        "promotion": tags.get(f"{registry.TAG}promotion"),
        # promote: ... | force_promote: ... | refused: <reason> | None (not decided yet)
        "decision": decision_text(tags),
    }


def format_lineage(d: dict[str, Any]) -> str:
    parts = d["training_partitions"]
    digest = f", digest {d['data_versions_digest'][:16]}" if d.get("data_versions_digest") else ""
    lines = [
        f"{d['model']} v{d['version']}  {' '.join('@' + a for a in d['aliases'])}".rstrip(),
        f"  estimator        {d['estimator']}",
        f"  spec             {d['spec_name']} (hash {str(d['spec_hash'])[:12]})",
        f"  code version     {d['code_version']}",
        f"  dagster run      {d['dagster_run_id']}",
        f"  mlflow run       {d['mlflow_run_id']}",
        f"  training window  {parts[0] if parts else '-'} .. {parts[-1] if parts else '-'} "
        f"({len(parts)} partitions), seed {d['seed']}, {d['trials']} trials",
        f"  training set     {d['training_set_hash']}",
        f"  input partitions (data versions{digest}):",
    ]
    for asset, versions in d["data_versions"].items():
        for part, h in versions.items():
            flag = d["data_changed_since"].get(f"{asset}/{part}")
            lines.append(f"    {asset}/{part}  {h[:16]}{'  <- ' + flag + ' since' if flag else ''}")
    if d["evaluation"]:
        shown = ", ".join(
            f"{k} {v:.4f}"
            for k, v in sorted(d["evaluation"].items())
            if isinstance(v, float)
            and k in ("roc_auc", "pr_auc", "f1", "recall", "log_loss", "brier", "rmse", "mae", "r2")
        )
        lines.append(f"  evaluation       {shown}")
    lines.append(f"  gate             {d['gate_status'] or '-'}; {d['decision'] or 'not decided'}")
    return "\n".join(lines)


def impact(spec: Spec, lake: Lake, reg: RegistryReader, partition: str) -> dict[str, Any]:
    """Model versions trained on a partition's data, and the prediction partitions they (or
    that partition's own features) produced. Each version's data versions come from its run's
    lineage artifact (its tags for versions older than the digest): reg.data_versions."""
    name = spec.registered_model_name
    versions = []
    for mv in reg.versions(name):
        used = sorted(a for a, parts in reg.data_versions(mv).items() if partition in parts)
        if used:
            versions.append(
                {
                    "version": mv.version,
                    "assets": used,
                    "aliases": mv.aliases,
                }
            )
    impacted = {v["version"] for v in versions}
    predictions = []
    days = lake.partitions(spec.name, PREDICTIONS)
    if days:
        sql = (
            f"SELECT filename, list(DISTINCT model_version ORDER BY model_version) AS v "
            f"FROM {lake.relation_sql(spec.name, PREDICTIONS, days)[:-1]}, filename = true) "
            "GROUP BY filename"
        )
        by_file = dict(lake.query(sql).iter_rows())
        for day in days:
            used = by_file.get(lake.url(spec.name, PREDICTIONS, day), [])
            hit = sorted(set(used) & impacted)
            if hit or day == partition:
                predictions.append(
                    {
                        "partition": day,
                        "model_versions": used,
                        "why": "features of this partition"
                        if day == partition
                        else f"scored by v{', v'.join(map(str, hit))}",
                    }
                )
    return {
        "spec": spec.name,
        "partition": partition,
        "model_versions": versions,
        "prediction_partitions": predictions,
    }


def format_impact(d: dict[str, Any]) -> str:
    lines = [f"{d['spec']}: what used data partition {d['partition']}"]
    if not d["model_versions"]:
        lines.append("  model versions: none")
    for v in d["model_versions"]:
        aliases = " ".join("@" + a for a in v["aliases"])
        lines.append(f"  model v{v['version']} {aliases} trained on its {', '.join(v['assets'])}")
    if not d["prediction_partitions"]:
        lines.append("  prediction partitions: none")
    for p in d["prediction_partitions"]:
        lines.append(f"  {PREDICTIONS}/{p['partition']}: {p['why']}")
    return "\n".join(lines)


def frame_hash(df: pl.DataFrame) -> str:
    """The lake's content hash of a frame, without writing it."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    return sha256_bytes(buf.getvalue())


def reproduce(spec: Spec, lake: Lake, tracking_uri: str, version: int) -> dict[str, Any]:
    """Retrain from the recorded partitions, spec and seed; compare test predictions."""
    import mlflow

    from mlops import modeling, training, training_set
    from mlops.model_loader import load_model

    name = spec.registered_model_name
    lin = registry.version_lineage(tracking_uri, name, version)
    run_id = lin.get("mlflow_run_id")
    registry.client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        spec_dir = Path(tmp) / "specs"
        spec_dir.mkdir()
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/spec/spec.yaml")
        (spec_dir / f"{spec.name}.yaml").write_text(text)
        recorded_spec = load_spec(spec_dir / f"{spec.name}.yaml")
    report: dict[str, Any] = {
        "model": name,
        "version": version,
        "spec_hash_matches": recorded_spec.content_hash == lin.get("spec_hash"),
    }
    changed = changed_inputs(spec, lake, lin)
    report["inputs_unchanged"] = not changed
    report["changed_inputs"] = sorted(changed)
    window = training_set.TrainingWindow(
        days=lin["training_partitions"], feature_partitions=sorted(lin["data_versions"]["features"])
    )
    frame = training_set.build_training_set(recorded_spec, lake, window)
    report["training_set_hash_matches"] = frame_hash(frame) == lin["training_set_hash"]
    fit = training.fit_best(recorded_spec, frame, trials=int(lin["trials"]))
    X_test, _, _ = fit.frames["test"]
    rebuilt = modeling.predict(recorded_spec.model.task, fit.model, X_test)
    registered = load_model(tracking_uri, name, version=version).score_matrix(X_test)
    report["test_rows"] = len(rebuilt)
    report["max_abs_difference"] = (
        float(np.max(np.abs(rebuilt - registered))) if len(rebuilt) else 0.0
    )
    report["predictions_equal"] = training.same_predictions(rebuilt, registered)
    report["exact"] = bool(
        report["predictions_equal"]
        and report["training_set_hash_matches"]
        and report["inputs_unchanged"]
        and report["spec_hash_matches"]
    )
    report["estimator"] = fit.best.estimator
    return report
