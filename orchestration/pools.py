"""Concurrency pools: steps that write one shared thing run one at a time across all runs.

The production profile's dagster.yaml sets `pools: default_limit: 1`; the default profile sets
no limit, so there the pools only label the steps. The daily lake partitions need no pool:
each run writes its own day, and `dagster/partition` limits runs per day to one.
"""

from mlops.spec import Spec


def online_store_pool(spec: Spec) -> str:
    """Entity states in the online store: two days written at once could interleave."""
    return f"{spec.name}/online_store"


def registry_pool(spec: Spec) -> str:
    """The registered model's versions and aliases: registration, promotion, rollback."""
    return f"{spec.name}/registry"


def spec_pools(spec: Spec) -> list[str]:
    return [online_store_pool(spec), registry_pool(spec)]


def initialize_pools(instance, specs: list[Spec]) -> list[str]:
    """Create each pool's row at the instance's default limit, from one process.

    Dagster creates a pool's row the first time a step claims it; on PostgreSQL two runs
    doing that at once make one fail (UniqueViolation, then InFailedSqlTransaction:
    dagster-io/dagster#33552). `make prod-up`, the daemon-free backfill and the demo call this
    before they start runs; after adding a spec, run `python -m orchestration.pools`.
    Returns the pools it created.
    """
    storage = instance.event_log_storage
    if instance.global_op_concurrency_default_limit is None:
        return []  # no default limit (the default profile): nothing is claimed
    if not storage.supports_global_concurrency_limits:
        return []
    have = storage.get_concurrency_keys()
    created = []
    for spec in specs:
        for pool in spec_pools(spec):
            if pool not in have:
                storage.initialize_concurrency_limit_to_default(pool)
                created.append(pool)
    return created


if __name__ == "__main__":
    import dagster as dg

    from mlops.config import specs_dir
    from mlops.spec import find_specs

    with dg.DagsterInstance.get() as inst:  # also creates the instance's tables
        made = initialize_pools(inst, find_specs(specs_dir()))
        limit = inst.global_op_concurrency_default_limit
        print(f"pools created at limit {limit}: {', '.join(made) or 'none needed'}")
