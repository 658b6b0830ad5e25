"""The one Definitions: one asset graph, job set and resource set per spec in specs/.

Set MLOPS_SPECS_DIR to load another folder of specs and MLOPS_LAKE_URL to move the lake
(any fsspec URL); both default to this project's specs/ and .mlops/lake. MLOPS_EXECUTOR=celery
runs every step on dagster-celery workers (orchestration/executors.py, deploy/).

A spec that `make demo` replayed is loaded as the demo's dated copy (`load_specs`): the same
spec with source.start_date on the first day of the generated data, so the daily partitions
begin where the data does.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import dagster as dg

from assets.data import build_data_assets
from assets.model import build_model_assets
from assets.monitoring import build_monitoring_assets
from assets.serving import build_serving_assets
from catalog.jobs import data_job_name, labels_job_name, scoring_job_name, training_job_name
from mlops.settings import settings
from mlops.spec import Spec, find_specs, load_spec
from orchestration.executors import step_executor
from orchestration.jobs import build_jobs
from orchestration.schedules import build_schedules
from resources.alerting import AlertingResource
from resources.clock import ClockResource
from resources.lake import LakeResource
from resources.mlflow import MlflowResource
from resources.online_store import OnlineStoreResource
from sensors.alerts import build_failure_sensor
from sensors.feedback import build_feedback_sensor
from sensors.monitoring import build_monitoring_sensor
from sensors.new_data import build_new_data_sensor
from sensors.retrain import build_retrain_sensors

DATED_FOLDER = Path(".mlops") / "specs"  # under a specs folder's project root
_MADE_FROM = re.compile(r"# dated copy of (?P<path>.+) \(sha256 (?P<hash>[0-9a-f]{64})\)")


def dated_copy_path(spec: Spec) -> Path:
    """Where `make demo` writes its dated copy of `spec`: <project root>/.mlops/specs/."""
    return spec.root / DATED_FOLDER / spec.path.name


def dated_header(spec: Spec) -> str:
    """The first line of a dated copy: the spec file it was made from, as it was then."""
    return f"# dated copy of {spec.path} (sha256 {spec.content_hash})"


def load_specs(specs_dir: Path) -> list[Spec]:
    """The specs in `specs_dir`, each replaced by its dated copy where `make demo` wrote one
    (orchestration/backtest.py `dated_spec`) from the spec file as it is now. A copy made
    from an earlier text of the spec, or from another file, is ignored with a warning: an
    edit to the spec shows at once, and `make demo` writes a new copy."""
    return [_dated(spec) for spec in find_specs(specs_dir)]


def _dated(spec: Spec) -> Spec:
    copy = dated_copy_path(spec)
    if not copy.is_file():
        return spec
    with copy.open(encoding="utf-8", errors="replace") as f:
        made = _MADE_FROM.match(f.readline())
    if made and made["path"] == str(spec.path) and made["hash"] == spec.content_hash:
        return load_spec(copy)
    warnings.warn(
        f"{copy} ignored: not `make demo`'s dated copy of {spec.path} as it is now (the spec "
        "changed since, or the copy was made elsewhere); `make demo` writes a new one, or "
        "delete it",
        stacklevel=2,
    )
    return spec


def build_definitions(
    specs_path: Path | None = None,
    lake_base_url: str | None = None,
    tracking_uri: str | None = None,
    artifact_root: str | None = None,
    online_url: str | None = None,
) -> dg.Definitions:
    s = settings()  # the MLOPS_* variables of this process, validated
    specs = load_specs(specs_path or s.specs_dir)
    assets, checks, jobs, sensors, schedules = [], [], [], [], []
    for spec in specs:
        with warnings.catch_warnings():
            # Partitioned asset checks are a Dagster preview feature; every process that
            # loads the code location would print this warning otherwise.
            warnings.simplefilter("ignore", dg.PreviewWarning)
            built = [
                *build_data_assets(spec),
                *build_model_assets(spec),
                *build_monitoring_assets(spec),
                *build_serving_assets(spec),
            ]
        spec_jobs = build_jobs(spec)
        for d in built:
            if isinstance(d, dg.AssetChecksDefinition):
                checks.append(d)
            elif isinstance(d, dg.JobDefinition):
                spec_jobs.append(d)
            else:
                assets.append(d)
        jobs.extend(spec_jobs)
        by_name = {j.name: j for j in spec_jobs}
        sensors.append(
            build_new_data_sensor(
                spec,
                [by_name[n(spec)] for n in (data_job_name, labels_job_name, scoring_job_name)],
            )
        )
        sensors.append(
            build_monitoring_sensor(
                spec, [by_name[n(spec)] for n in (scoring_job_name, labels_job_name)]
            )
        )
        if spec.labels.uses_feedback:
            sensors.append(build_feedback_sensor(spec, by_name[labels_job_name(spec)]))
        sensors.extend(build_retrain_sensors(spec, by_name[training_job_name(spec)]))
        sensors.append(build_failure_sensor(spec, spec_jobs))
        schedules.extend(
            build_schedules(spec, by_name[scoring_job_name(spec)], by_name[training_job_name(spec)])
        )
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        executor=step_executor(),  # MLOPS_EXECUTOR=celery in the production profile
        resources={
            "clock": ClockResource(),
            "alerting": AlertingResource(webhook_url=s.alert_webhook_url),
            "lake": LakeResource(base_url=lake_base_url or s.lake_url),
            "online_store": OnlineStoreResource(url=online_url or s.online_store_url),
            "mlflow": MlflowResource(
                tracking_uri=tracking_uri or s.mlflow_tracking_uri,
                artifact_root=artifact_root or s.mlflow_artifact_root,
                ui_url=s.mlflow_ui_url,
                dagster_ui_url=s.dagster_url,
            ),
        },
    )


defs = build_definitions()
