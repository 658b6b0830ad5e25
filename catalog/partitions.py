"""Partitions, defined once: one daily partition set per spec, from its start date to its
end date when it has one (a finished history), else to the last day that has ended."""

from __future__ import annotations

import datetime as dt
import functools
import warnings

import dagster as dg

from mlops.spec import Spec


@functools.cache
def _daily(start: str, end: str | None) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=start, end_date=end)


def daily_partitions(spec: Spec) -> dg.DailyPartitionsDefinition:
    """source.start_date .. source.end_date, both included (Dagster's end_date is
    exclusive: the day after the last); without an end, open like any live source."""
    last = spec.source.end_date
    end = (last + dt.timedelta(days=1)).isoformat() if last is not None else None
    return _daily(spec.source.start_date.isoformat(), end)


def lookback_mapping(spec: Spec) -> dg.TimeWindowPartitionMapping:
    """A day's features read that day plus the spec's lookback days of valid rows.

    The first days' lookback reaches before the start date: allowed, and the asset clips it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # the flag is beta; we rely on it
        return dg.TimeWindowPartitionMapping(
            start_offset=-spec.features.lookback_days,
            end_offset=0,
            allow_nonexistent_upstream_partitions=True,
        )
