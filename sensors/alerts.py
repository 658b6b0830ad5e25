"""Run-failure alerts: any failed run of the spec's jobs goes to the alerting resource."""

import dagster as dg

from mlops.spec import Spec
from resources.alerting import AlertingResource


def run_failure_sensor_name(spec: Spec) -> str:
    return f"{spec.name}_run_failure_sensor"


def build_failure_sensor(spec: Spec, jobs: list) -> dg.SensorDefinition:
    @dg.run_failure_sensor(
        name=run_failure_sensor_name(spec),
        monitored_jobs=jobs,
        description=f"{spec.name}: alert on every failed run (log; webhook when configured).",
    )
    def run_failure_sensor(context: dg.RunFailureSensorContext, alerting: AlertingResource):
        """Alert with the job, partition, error and trigger of a failed run."""
        run = context.dagster_run
        error = context.failure_event.message or "run failed"
        fields = {
            "spec": spec.name,
            "job": run.job_name,
            "run_id": run.run_id,
            "partition": run.tags.get("dagster/partition"),
            "trigger": run.tags.get("mlops/trigger"),
        }
        alerting.alert(f"[{spec.name}] {run.job_name} failed", error, fields)

    return run_failure_sensor
