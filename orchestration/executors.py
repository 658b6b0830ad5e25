"""How steps execute: the step executor of every job, from the environment.

MLOPS_EXECUTOR picks the step executor of every job in the code location:
- unset or `in_process` (the default profile): every step of a run in turn inside the run
  worker, which imports the code location once. Measured by bench/startup.py (b): a daily data
  run through the daemon took 4.2 s in process, 20.4 s with a fresh interpreter per step and
  9.2 s with forkserver. The jobs are chains of short steps with nothing to run in parallel
  inside a run; parallelism comes from runs in flight (the instance's run queue limits). The
  training job gains nothing from a process per step either (its four steps run one after the
  other, and the run worker's memory goes when the run ends);
- `multiprocess`: Dagster's multiprocess executor (each step in a child process of the run, a
  fresh interpreter; MLOPS_MULTIPROCESS_START_METHOD=forkserver forks the steps from a server
  process that imported the code location once per run);
- `celery`: dagster-celery. Each step is a task on the broker (MLOPS_CELERY_BROKER, default
  redis://127.0.0.1:6379/1), run by `dagster-celery worker` processes on any machine that has
  this code and the same MLOPS_* settings; step results come back through
  MLOPS_CELERY_BACKEND (default redis://127.0.0.1:6379/2). MLOPS_CELERY_KEY_PREFIX, when set,
  namespaces every broker key, so several deployments (or test runs) can share one Redis;
  workers must be started with the same prefix (deploy/celery.yaml, `config_source`).
  MLOPS_CELERY_POLL_SECONDS (default 0.2) is how often a run checks its steps' results.
The values come from the settings model (mlops/settings.py), which rejects a wrong one with the
variable's name.
"""

from __future__ import annotations

import warnings

import dagster as dg

from mlops.settings import settings

# Broker retries as dagster-celery's defaults (a config_source entry replaces the whole dict).
_TRANSPORT = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def celery_settings() -> dict:
    """The celery executor's config from the environment (the workers read the same values
    through deploy/celery.yaml)."""
    s = settings()
    transport = dict(_TRANSPORT)
    if s.celery_key_prefix:
        transport["global_keyprefix"] = s.celery_key_prefix
    return {
        "broker": s.celery_broker,
        "backend": s.celery_backend,
        "config_source": {"broker_transport_options": transport},
    }


def step_executor() -> dg.ExecutorDefinition | None:
    """The executor for every job, from MLOPS_EXECUTOR (see the module docstring).

    - unset or `in_process`: `dg.in_process_executor`;
    - `multiprocess`: Dagster's multiprocess executor (None: Dagster's default), or its
      forkserver variant when MLOPS_MULTIPROCESS_START_METHOD=forkserver;
    - `celery`: dagster-celery.
    """
    s = settings()  # a wrong MLOPS_EXECUTOR or start method fails here, naming it
    if s.executor == "in_process":
        return dg.in_process_executor
    if s.executor == "multiprocess" and s.multiprocess_start_method == "spawn":
        return None
    if s.executor == "multiprocess":
        # Preload the code location itself: Dagster preloads only its own executor module
        # for a job reconstructed from a repository.
        preload = {"preload_modules": ["orchestration.definitions"]}
        return dg.multiprocess_executor.configured(
            {"start_method": {"forkserver": preload}}, name="multiprocess"
        )
    from dagster_celery import celery_executor

    _poll_faster(s.celery_poll_seconds)
    # dagster-celery re-declares its task for every step; celery 5.7 warns each time.
    warnings.filterwarnings("ignore", message=r"Task name '\w+' is already registered")
    return celery_executor.configured(celery_settings(), name="celery")


def _poll_faster(seconds: float) -> None:
    """The run process checks its steps' results every MLOPS_CELERY_POLL_SECONDS (default
    0.2) instead of dagster-celery's fixed second: a daily run is a chain of 5 short steps,
    and waiting a whole second after each one made runs 3x longer than their steps. A poll
    is one Redis GET per step in flight.

    A patch, kept because there is no setting for it: dagster-celery 0.29's executor config
    has broker, backend, include, config_source and retries only, and its execution loop
    sleeps `core_execution_loop.TICK_SECONDS` (a module constant, read on every tick) between
    polls. It changes that constant in the process that builds the celery executor (a run
    worker, the daemon-free backfill), nothing else; drop it when dagster-celery makes the
    interval configurable.
    """
    import dagster_celery.core_execution_loop as loop

    loop.TICK_SECONDS = seconds


def recon_job(job_name: str):
    """The job as every process reloads it: orchestration.definitions:defs, job by name (the
    run process and each celery worker import the module with their own MLOPS_* settings)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from mlops.config import PROJECT_ROOT

    repo = ReconstructableRepository.for_module(
        "orchestration.definitions", "defs", working_directory=str(PROJECT_ROOT)
    )
    return repo.get_reconstructable_job(job_name)
