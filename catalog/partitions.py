"""Partitions, defined once: one daily partition set per spec, from its start date."""

from __future__ import annotations

import functools
import warnings

import dagster as dg

from mlops.spec import Spec


@functools.cache
def _daily(start: str) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=start)


def daily_partitions(spec: Spec) -> dg.DailyPartitionsDefinition:
    return _daily(spec.source.start_date.isoformat())


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
