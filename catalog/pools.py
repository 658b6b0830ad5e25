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
