"""Create the concurrency pools' rows on an instance (`python -m orchestration.pools`).

The pool names are catalog/pools.py's.
"""

from catalog.pools import spec_pools
from mlops.spec import Spec


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
