"""Runs and ticks that the Dagster UI lists as the daemon's, for runs this process executes.

The daemon launches a run from the code location the workspace loads (workspace.yaml), so the
run carries that location's origin: the UI's job pages, the Overview timeline and a sensor's
runs select runs by it (the hidden `.dagster/repository` tag, `<repository>@<location>`). It
also records every sensor and schedule evaluation as a tick. A run that `execute_in_process` or
`execute_job` starts has neither, so the UI showed the demo's and `mlops backtest`'s history
nowhere but the global runs list, and every sensor "has never run".

`Origin` names the workspace's code location as the daemon's launch would, and `record_tick`
writes a tick as the daemon's sensor and schedule loops do (keyed by the instigator's
selector, which is what the UI reads ticks by). Dagster has no public API for either, hence
the `dagster._core` imports below.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import yaml

from mlops.config import PROJECT_ROOT

SENSOR, SCHEDULE = "sensor", "schedule"


@dataclass(frozen=True)
class Origin:
    """The code location the UI loads: its name, the module it imports, where from."""

    location: str
    module: str
    working_directory: str
    repository: str = "__repository__"  # Dagster's name for a Definitions' repository

    @classmethod
    def of_workspace(cls, path: Path = PROJECT_ROOT / "workspace.yaml") -> Origin:
        """The workspace's one python_module entry (DESIGN §2: one target only)."""
        entries = (yaml.safe_load(path.read_text()) or {}).get("load_from") or []
        modules = [e["python_module"] for e in entries if "python_module" in e]
        if len(modules) != 1:
            raise ValueError(f"{path}: expected one python_module entry, found {len(modules)}")
        entry = modules[0]
        module = entry if isinstance(entry, str) else entry["module_name"]
        location = module if isinstance(entry, str) else entry.get("location_name", module)
        return cls(location, module, str(path.parent))

    def _repository_origin(self):
        from dagster._core.remote_origin import (
            ManagedGrpcPythonEnvCodeLocationOrigin,
            RemoteRepositoryOrigin,
        )
        from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

        target = LoadableTargetOrigin(
            executable_path=sys.executable,
            module_name=self.module,
            working_directory=self.working_directory,
        )
        location = ManagedGrpcPythonEnvCodeLocationOrigin(target, self.location)
        return RemoteRepositoryOrigin(location, self.repository)

    def job(self, name: str):
        """The RemoteJobOrigin a daemon-launched run of job `name` carries."""
        return self._repository_origin().get_job_origin(name)

    def instigator(self, name: str) -> tuple[str, str]:
        """(origin id, selector id) of a sensor or schedule, as the daemon stores its ticks."""
        origin = self._repository_origin().get_instigator_origin(name)
        return origin.get_id(), origin.get_selector().get_id()


@contextlib.contextmanager
def launched_from(instance: dg.DagsterInstance, origin: Origin, job: str) -> Iterator[None]:
    """While open, runs this process creates on `instance` carry the workspace's origin for
    `job`, as a daemon launch would give them (and the job's code origin when the executor did
    not set one: the run worker's way to reload it).

    Both `execute_in_process` and `execute_job` create their run through
    `instance.create_run_for_job` and take no origin, so the instance's method is wrapped for
    the length of one run: the run is then executed exactly as before.
    """
    from orchestration.executors import recon_job

    create = instance.create_run_for_job
    remote = origin.job(job)
    code = recon_job(job).get_python_origin()

    def with_origin(*args, **kwargs):
        kwargs["remote_job_origin"] = kwargs.get("remote_job_origin") or remote
        kwargs["job_code_origin"] = kwargs.get("job_code_origin") or code
        return create(*args, **kwargs)

    instance.create_run_for_job = with_origin  # type: ignore[method-assign]
    try:
        yield
    finally:
        del instance.create_run_for_job  # the class's method again


def record_tick(
    instance: dg.DagsterInstance,
    origin: Origin,
    kind: str,
    name: str,
    started: float,
    run_ids: Sequence[str] = (),
    run_keys: Sequence[str] = (),
    skip_reason: str | None = None,
    cursor: str | None = None,
    error: BaseException | None = None,
) -> None:
    """One evaluation of sensor or schedule `name` as the daemon records it: SUCCESS with the
    runs it started, SKIPPED with the reason when it started none, FAILURE with the error."""
    from dagster._core.scheduler.instigation import InstigatorType, TickData, TickStatus
    from dagster._utils.error import serializable_error_info_from_exc_info

    origin_id, selector_id = origin.instigator(name)
    if error is not None:
        status = TickStatus.FAILURE
        info = serializable_error_info_from_exc_info((type(error), error, error.__traceback__))
    else:
        status, info = (TickStatus.SUCCESS if run_ids else TickStatus.SKIPPED), None
    instance.create_tick(
        TickData(
            instigator_origin_id=origin_id,
            instigator_name=name,
            instigator_type=InstigatorType.SENSOR if kind == SENSOR else InstigatorType.SCHEDULE,
            status=status,
            timestamp=started,
            end_timestamp=time.time(),
            run_ids=list(run_ids),
            run_keys=list(run_keys),
            error=info,
            skip_reason=(skip_reason or "No run requested")
            if status == TickStatus.SKIPPED
            else None,
            cursor=cursor,
            selector_id=selector_id,
        )
    )
