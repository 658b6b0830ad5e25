"""The clock sensors read "today" from: the wall clock, or a simulated day in a backtest."""

from __future__ import annotations

import datetime as dt

import dagster as dg


class ClockResource(dg.ConfigurableResource):
    """`today` (YYYY-MM-DD) pins the date a sensor sees; empty = the wall clock (UTC).

    The new-data sensor reads it for the last day it may request (files dated later wait for
    their partition) and for the days a SQL source is polled up to; everything else follows
    the partitions in the lake, never the clock.
    """

    today: str = ""

    def date(self) -> dt.date:
        return dt.date.fromisoformat(self.today) if self.today else dt.datetime.now(dt.UTC).date()
