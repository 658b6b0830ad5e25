"""The rules the assets call, tested without Dagster: reconciliation, the features' lookback
plan, the online state's never-back-in-time refresh, the training set's versioned copy."""

from __future__ import annotations

import datetime as dt

import polars as pl

from mlops import features as feats
from mlops import online, training_set, validation
from mlops.ingest import ROW_NUMBER, SOURCE_FILE
from mlops.online_store import EntityState, make_store
from mlops.training_set import TrainingWindow
from tests.conftest import make_project, small_data


def _ids(*rows: tuple[str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        {SOURCE_FILE: [r[0] for r in rows], ROW_NUMBER: [r[1] for r in rows]},
        schema={SOURCE_FILE: pl.String, ROW_NUMBER: pl.Int64},
    )


def test_reconcile_counts_every_way_a_row_can_go_missing_or_appear() -> None:
    raw = _ids(("a.csv", 1), ("a.csv", 2), ("a.csv", 3))
    whole = validation.reconcile(raw, _ids(("a.csv", 1), ("a.csv", 3)), _ids(("a.csv", 2)))
    assert whole.ok and (whole.rows_in, whole.rows_valid, whole.rows_quarantined) == (3, 2, 1)
    lost = validation.reconcile(raw, _ids(("a.csv", 1)), _ids(("a.csv", 2)))
    assert not lost.ok and lost.lost == 1 and lost.in_both == lost.unknown == 0
    both = validation.reconcile(
        raw, _ids(("a.csv", 1), ("a.csv", 2)), _ids(("a.csv", 2), ("a.csv", 3))
    )
    assert not both.ok and both.in_both == 1 and both.lost == 0
    # The counts add up, yet a row came from nowhere and another is gone: still not ok.
    swapped = validation.reconcile(raw, _ids(("a.csv", 1), ("b.csv", 9)), _ids(("a.csv", 2)))
    assert not swapped.ok and swapped.unknown == 1 and swapped.lost == 1
    assert validation.quarantine_rate(0, 0) == 0.0 and validation.quarantine_rate(3, 1) == 0.25


def test_lookback_plan_builds_days_with_data_first_and_skips_days_without(tmp_path) -> None:
    p = make_project(tmp_path)
    small_data(p, days=4, machines=2)
    start = p.spec.source.start_date
    day = start + dt.timedelta(days=3)
    window = [d.isoformat() for d in feats.lookback_days(p.spec, day)]
    assert window[-1] == day.isoformat() and len(window) >= 2
    # Nothing built: every day with a landing file must be built first; days before the
    # first landing file have no data anywhere, so they are gaps.
    plan = feats.plan_lookback(p.spec, lambda d: False, day)
    with_files = {(start + dt.timedelta(days=i)).isoformat() for i in range(4)}
    assert plan.unbuilt == [d for d in window if d in with_files]
    assert plan.gaps == [d for d in window if d not in with_files]
    assert plan.read == plan.unbuilt
    # All built: read the window, nothing to build, no gaps among the built days.
    done = feats.plan_lookback(p.spec, lambda d: d in with_files, day)
    assert done.unbuilt == [] and done.read == [d for d in window if d in with_files]


def test_refresh_never_moves_a_state_back_in_time(tmp_path) -> None:
    p = make_project(tmp_path)
    small_data(p, days=1, machines=3)
    p.run_day(p.spec.source.start_date.isoformat())
    rows = p.lake.read(p.spec.name, "validated_data", p.spec.source.start_date.isoformat())
    store = make_store(f"sqlite:///{tmp_path / 'online.db'}")
    try:
        states = online.states_from_rows(p.spec, rows)
        ahead = states[0]
        later = ahead.as_of + dt.timedelta(hours=5)
        store.write_states(p.spec.name, [EntityState(ahead.entity, later, ahead.rows[-1:])])
        done = online.refresh_states(p.spec, store, rows)
        assert done.entities_skipped == 1 and done.entities_written == len(states) - 1
        assert done.rows_written == sum(len(s.rows) for s in states[1:])
        assert store.get_state(p.spec.name, ahead.entity).as_of == later  # kept
        for s in states[1:]:
            assert store.get_state(p.spec.name, s.entity).as_of == s.as_of
    finally:
        store.close()


def test_training_set_save_keeps_a_copy_named_by_its_hash(tmp_path) -> None:
    p = make_project(tmp_path)
    df = pl.DataFrame({"x": [1.0, 2.0], "split": ["train", "test"]})
    window = TrainingWindow(days=[], feature_partitions=[])
    saved = training_set.save(p.spec, p.lake, window, df)
    version = saved.written.content_hash[:16]
    assert p.lake.read(p.spec.name, "training_set", version).equals(df)
    assert saved.versioned_url == p.lake.url(p.spec.name, "training_set", version)
    assert saved.input_versions == {"labels": {}, "features": {}}
    again = training_set.save(p.spec, p.lake, window, df)
    assert again.input_digest == saved.input_digest and again.versioned_url == saved.versioned_url
