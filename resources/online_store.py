"""The online feature store as a Dagster resource: a URL, opened when a step uses it."""

import dagster as dg

from mlops.online_store import OnlineStore, make_store


class OnlineStoreResource(dg.ConfigurableResource):
    """`sqlite:///path/online.db` (embedded default, safe across worker processes on one
    machine) or `redis://host:6379/0` (production)."""

    url: str

    def get(self) -> OnlineStore:
        return make_store(self.url)
