"""Calendar helpers shared by the feeds, the features and the SQL source."""

from __future__ import annotations

import datetime as dt


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """A daily partition's [start, end) as naive datetimes: the rows a day's features
    cover, and the values of a SQL source's :start and :end."""
    start = dt.datetime.combine(day, dt.time())
    return start, start + dt.timedelta(days=1)
