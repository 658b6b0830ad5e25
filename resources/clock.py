"""The clock sensors read "today" from: the wall clock, or a simulated day in a backtest."""

from __future__ import annotations

import datetime as dt

import dagster as dg


class ClockResource(dg.ConfigurableResource):
    """`today` (YYYY-MM-DD) pins the date a sensor sees; empty = the wall clock (UTC).

    Only what polls by date needs it (a SQL source's recent days): everything else follows
    the partitions in the lake, never the clock.
    """

    today: str = ""

    def date(self) -> dt.date:
        return dt.date.fromisoformat(self.today) if self.today else dt.datetime.now(dt.UTC).date()
