"""The IoT generator: determinism, bad rows at the reported places, late events, a failure
mechanism that rewards non-linear models, and each kind of drift."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import wasserstein_distance
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from demo.generate import BAD_ROW_KINDS, SENSORS, GenerationReport, generate
from mlops.spec import LabelSpec, Spec, load_spec

SPEC_FILE = Path(__file__).resolve().parents[1] / "specs" / "machine_failure.yaml"


def _spec(root: Path) -> Spec:
    """The embedded spec, loaded from under `root` so its landing paths resolve there."""
    (root / "specs").mkdir(parents=True, exist_ok=True)
    shutil.copy(SPEC_FILE, root / "specs" / SPEC_FILE.name)
    return load_spec(root / "specs" / SPEC_FILE.name)


def _files(report: GenerationReport) -> dict[str, bytes]:
    paths = [*report.readings_files, *report.event_files]
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in paths}


def _readings(report: GenerationReport) -> pl.DataFrame:
    frames = [pl.read_csv(p, try_parse_dates=False) for p in report.readings_files]
    return pl.concat(frames).with_columns(pl.col("timestamp").str.to_datetime())


def _events(report: GenerationReport) -> pl.DataFrame:
    frames = [
        pl.read_csv(p, schema_overrides={"machine_id": pl.String}).with_columns(file=pl.lit(p.name))
        for p in report.event_files
    ]
    return pl.concat(frames).with_columns(
        pl.col("failure_time").str.to_datetime(), pl.col("reported_at").str.to_datetime()
    )


def _labelled(report: GenerationReport, mature_only: bool = True) -> pl.DataFrame:
    """Readings with y = 1 when the same machine fails within (t, t + 24 h]."""
    readings = _readings(report).sort("timestamp")
    events = _events(report).select("machine_id", "failure_time").sort("failure_time")
    out = readings.join_asof(
        events,
        left_on="timestamp",
        right_on="failure_time",
        by="machine_id",
        strategy="forward",
        allow_exact_matches=False,
        check_sortedness=False,
    ).with_columns(
        y=((pl.col("failure_time") - pl.col("timestamp")) <= dt.timedelta(hours=24))
        .fill_null(False)
        .cast(pl.Int8)
    )
    if mature_only:  # the last 3 days' labels may still be on their way (24 h + 48 h late)
        end = readings["timestamp"].max() - dt.timedelta(days=3)
        out = out.filter(pl.col("timestamp") <= end)
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Spec, GenerationReport]:
    """14 days of 80 machines: enough failures to learn from, still well under a second."""
    spec = _spec(tmp_path_factory.mktemp("fleet"))
    return spec, generate(spec, days=14, machines=80, seed=1)


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    args = {"days": 3, "machines": 10, "bad_rows": 0.02, "drift_from": 2, "drift": "covariate"}
    first = _files(generate(_spec(tmp_path / "a"), seed=7, **args))
    second = _files(generate(_spec(tmp_path / "b"), seed=7, **args))
    other = _files(generate(_spec(tmp_path / "c"), seed=8, **args))

    assert first == second
    assert len(first) == 6
    assert first.keys() == other.keys()
    for name in first:
        if name.startswith("readings/"):
            assert first[name] != other[name], name


def test_files_follow_the_spec_layout(fleet: tuple[Spec, GenerationReport]) -> None:
    spec, report = fleet
    names = [p.name for p in report.readings_files]
    assert names[:2] == ["readings_2026-01-01.csv", "readings_2026-01-02.csv"]
    assert all(p.parent == spec.landing_dir for p in report.readings_files)
    assert report.event_files[0].name == "failures_2026-01-01.csv"
    assert all(
        p.parent == spec.resolve(".mlops/landing/machine_failure/events")
        for p in report.event_files
    )

    first = pl.read_csv(report.readings_files[0])
    assert first.columns == ["timestamp", "machine_id", "machine_type", "firmware", *SENSORS]
    assert first.height == 24 * 80
    assert first["machine_id"].n_unique() == 80
    assert first.sort("timestamp", "machine_id", maintain_order=True).equals(first)
    # Each machine reads at its own fixed minute, hourly.
    minutes = first.group_by("machine_id").agg(pl.col("timestamp").str.slice(14, 5).n_unique())
    assert minutes["timestamp"].max() == 1
    assert report.rows == 14 * 24 * 80

    readings = _readings(report)
    for name in SENSORS:
        col = spec.column(name)
        assert readings[name].min() >= col.min and readings[name].max() <= col.max, name
    assert set(readings["machine_type"]) <= {"A", "B", "C"}
    assert set(readings["firmware"].cast(pl.String)) <= {"1.0", "1.1", "2.0"}
    per_machine = readings.group_by("machine_id").agg(pl.col("machine_type", "firmware").n_unique())
    assert per_machine["machine_type"].max() == 1 and per_machine["firmware"].max() == 1


def _problems(
    cells: list[str], spec: Spec, header: list[str], seen: set[tuple[str, str]]
) -> set[tuple[str, str]]:
    """What is wrong with one CSV row, as (kind, column) pairs, judged from the spec alone."""
    found: set[tuple[str, str]] = set()
    row = dict(zip(header, cells, strict=True))
    try:
        dt.datetime.strptime(row["timestamp"], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        found.add(("null" if row["timestamp"] == "" else "unparseable_timestamp", "timestamp"))
    else:
        key = (row["timestamp"], row["machine_id"])
        if key in seen:
            found.add(("duplicate", "machine_id"))
        seen.add(key)
    for name in ("machine_type", "firmware", *SENSORS):
        col, value = spec.column(name), row[name]
        if value == "":
            found.add(("null", name))
        elif col.categories is not None:
            if value not in col.categories:
                found.add(("unknown_category", name))
        else:
            try:
                number = float(value)
            except ValueError:
                found.add(("wrong_type", name))
                continue
            if not col.min <= number <= col.max:  # type: ignore[operator]
                found.add(("out_of_range", name))
    return found


def test_every_bad_row_kind_lands_where_the_report_says(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    report = generate(spec, days=3, machines=20, seed=11, bad_rows=0.05)

    counts = report.bad_row_counts()
    assert list(counts) == list(BAD_ROW_KINDS)
    assert all(n >= 2 for n in counts.values()), counts
    good = 3 * 24 * 20
    assert sum(counts.values()) == round(0.05 * good)
    assert report.rows == good + len(report.bad_rows)

    reported = {(b.file, b.row_number): (b.kind, b.column) for b in report.bad_rows}
    assert len(reported) == len(report.bad_rows)
    total = 0
    for path in report.readings_files:
        lines = path.read_text().splitlines()
        header, seen = lines[0].split(","), set()
        for number, line in enumerate(lines[1:], start=1):
            found = _problems(line.split(","), spec, header, seen)
            expected = reported.get((path.name, number))
            # A bad row has exactly the one reported problem; a good row has none.
            assert found == ({expected} if expected else set()), (path.name, number, line)
            total += 1
    assert total == report.rows


def test_bad_rows_leave_good_rows_and_events_unchanged(tmp_path: Path) -> None:
    clean = generate(_spec(tmp_path / "clean"), days=3, machines=20, seed=5)
    dirty = generate(_spec(tmp_path / "dirty"), days=3, machines=20, seed=5, bad_rows=0.05)

    for good, bad in zip(clean.readings_files, dirty.readings_files, strict=True):
        drop = {b.row_number for b in dirty.bad_rows if b.file == bad.name}
        assert drop
        kept = [line for i, line in enumerate(bad.read_text().splitlines()) if i not in drop]
        assert kept == good.read_text().splitlines()
    for good, bad in zip(clean.event_files, dirty.event_files, strict=True):
        assert good.read_bytes() == bad.read_bytes()


def test_events_arrive_late_in_the_file_of_their_arrival_day(
    fleet: tuple[Spec, GenerationReport],
) -> None:
    _, report = fleet
    assert len(report.event_files) == 14  # one per day, header only when nothing arrived
    events = _events(report)
    assert events.height == report.events > 20
    assert events.columns[:4] == ["machine_id", "failure_time", "reported_at", "failure_mode"]

    lateness = events["reported_at"] - events["failure_time"]
    assert lateness.min() >= dt.timedelta(0) and lateness.max() <= dt.timedelta(hours=48)
    arrival = events["reported_at"].dt.strftime("failures_%Y-%m-%d.csv")
    assert (arrival == events["file"]).all()
    for path in report.event_files:
        part = events.filter(pl.col("file") == path.name)
        assert part.sort("reported_at", "machine_id", maintain_order=True).equals(part)
    # Failures after the last day would not have arrived yet, so none are written.
    assert events["reported_at"].max() < dt.datetime(2026, 1, 15)
    # A repaired machine does not fail again within 24 h.
    gaps = events.sort("failure_time").group_by("machine_id").agg(pl.col("failure_time").diff())
    assert gaps.explode("failure_time")["failure_time"].drop_nulls().min() >= dt.timedelta(hours=24)

    positive_rate = _labelled(report)["y"].mean()
    assert 0.04 <= positive_rate <= 0.12  # type: ignore[operator]


def test_failures_reward_a_non_linear_model(fleet: tuple[Spec, GenerationReport]) -> None:
    _, report = fleet
    data = _labelled(report).sort("timestamp")
    type_code = pl.col("machine_type").replace_strict({"A": 0, "B": 1, "C": 2})
    x = data.select(*SENSORS, type_code).to_numpy()
    y = data["y"].to_numpy()
    cut = int(0.7 * len(y))  # time-ordered: train on the past, test on what follows

    tree = HistGradientBoostingClassifier(random_state=0).fit(x[:cut], y[:cut])
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    linear.fit(x[:cut], y[:cut])
    tree_auc = roc_auc_score(y[cut:], tree.predict_proba(x[cut:])[:, 1])
    linear_auc = roc_auc_score(y[cut:], linear.predict_proba(x[cut:])[:, 1])

    assert tree_auc >= 0.75
    assert tree_auc - linear_auc >= 0.05, (tree_auc, linear_auc)


def _day_means(report: GenerationReport, day: int) -> pl.DataFrame:
    before = dt.datetime(2026, 1, day)
    return (
        _readings(report)
        .with_columns(after=pl.col("timestamp") >= before)
        .group_by("after")
        .agg(pl.col(SENSORS).mean())
        .sort("after")
    )


def test_covariate_drift_shifts_sensors_only_from_drift_from(tmp_path: Path) -> None:
    base = generate(_spec(tmp_path / "base"), days=8, machines=20, seed=2)
    drifted = generate(
        _spec(tmp_path / "drift"), days=8, machines=20, seed=2, drift_from=5, drift="covariate"
    )

    for i in range(4):  # the same world until the drift starts
        assert base.readings_files[i].read_bytes() == drifted.readings_files[i].read_bytes()
    assert base.readings_files[4].read_bytes() != drifted.readings_files[4].read_bytes()
    later = pl.col("timestamp") >= dt.datetime(2026, 1, 5)
    same, after = _readings(base).filter(later), _readings(drifted).filter(later)
    distance = wasserstein_distance(same["temperature"], after["temperature"])
    assert distance / same["temperature"].std() > 0.6
    shift = _day_means(drifted, 5)["temperature"] - _day_means(base, 5)["temperature"]
    assert shift[0] == 0.0
    assert shift[1] > 6.0
    rpm = _day_means(drifted, 5)["rpm"] - _day_means(base, 5)["rpm"]
    assert rpm[1] > 50.0


def test_new_category_drift_reports_unknown_types_from_drift_from(tmp_path: Path) -> None:
    report = generate(
        _spec(tmp_path), days=5, machines=20, seed=4, drift_from=3, drift="new-category"
    )
    for day, path in enumerate(report.readings_files, start=1):
        frame = pl.read_csv(path, schema_overrides={"firmware": pl.String})
        new = frame.filter(pl.col("machine_type") == "D")
        if day < 3:
            assert new.height == 0, path.name
        else:
            assert 0 < new.height < frame.height, path.name
            assert (new["firmware"] == "3.0").all()


def test_concept_drift_keeps_sensors_but_changes_what_precedes_failures(tmp_path: Path) -> None:
    args = {"days": 20, "machines": 40, "seed": 6}
    base = generate(_spec(tmp_path / "base"), **args)
    drifted = generate(_spec(tmp_path / "drift"), drift_from=9, drift="concept", **args)

    # Same days with and without the drift: the sensors barely notice it.
    later = pl.col("timestamp") >= dt.datetime(2026, 1, 9)
    same, after = _readings(base).filter(later), _readings(drifted).filter(later)
    for name in SENSORS:  # covariate drift moves temperature by about 1.0 on this scale
        distance = wasserstein_distance(same[name], after[name]) / same[name].std()
        assert distance < 0.25, (name, distance)

    # A model of the pre-drift mechanism loses its grip on the drifted fleet.
    def auc_after_drift(report: GenerationReport) -> float:
        data = _labelled(report)
        is_train = data["timestamp"] < dt.datetime(2026, 1, 9)
        x = data.select(*SENSORS).to_numpy()
        y = data["y"].to_numpy()
        model = HistGradientBoostingClassifier(random_state=0).fit(x[is_train], y[is_train])
        test = ~is_train.to_numpy()
        return roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])

    assert auc_after_drift(base) - auc_after_drift(drifted) >= 0.1
    modes = _events(drifted).filter(pl.col("failure_time") >= dt.datetime(2026, 1, 11))
    assert modes.height > 0
    assert set(modes["failure_mode"]) <= {"seal_leak", "overload"}


def test_drift_kinds_combine(tmp_path: Path) -> None:
    args = {"days": 8, "machines": 30, "seed": 1}
    base = generate(_spec(tmp_path / "base"), **args)
    both = generate(_spec(tmp_path / "both"), drift_from=3, drift="covariate, concept", **args)

    shift = _day_means(both, 3)["temperature"] - _day_means(base, 3)["temperature"]
    assert shift[0] == 0.0 and shift[1] > 6.0
    # Degradations take at most 32 h, so from day 5 every failure is of the new kinds.
    late = _events(both).filter(pl.col("failure_time") >= dt.datetime(2026, 1, 5))
    assert late.height > 0
    assert set(late["failure_mode"]) <= {"seal_leak", "overload"}


def test_start_moves_every_file(tmp_path: Path) -> None:
    report = generate(_spec(tmp_path), days=2, machines=3, seed=0, start=dt.date(2025, 12, 31))
    assert [p.name for p in report.readings_files] == [
        "readings_2025-12-31.csv",
        "readings_2026-01-01.csv",
    ]
    assert report.event_files[-1].name == "failures_2026-01-01.csv"
    assert pl.read_csv(report.readings_files[0])["timestamp"][0].startswith("2025-12-31T00:")


@pytest.mark.parametrize(
    ("drift_from", "drift", "match"),
    [
        (None, "covariate", "go together"),
        (3, None, "go together"),
        (3, "seasonal", "unknown drift kind 'seasonal'"),
        (0, "concept", "between 1 and 5"),
        (6, "concept", "between 1 and 5"),
    ],
)
def test_invalid_drift_arguments_raise(
    tmp_path: Path, drift_from: int | None, drift: str | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        generate(_spec(tmp_path), days=5, machines=2, seed=0, drift_from=drift_from, drift=drift)


def test_a_spec_without_vibration_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    columns = [c for c in spec.schema_.columns if c.name != "vibration"]
    wrong = spec.model_copy(
        update={"schema_": spec.schema_.model_copy(update={"columns": columns})}
    )
    with pytest.raises(ValueError, match=r"IoT machine-failure schema.*'vibration' is missing"):
        generate(wrong, days=1, machines=1, seed=0)
    assert not spec.landing_dir.exists()


def test_a_spec_without_an_event_feed_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    labels = LabelSpec(kind="column", column="temperature")
    with pytest.raises(ValueError, match="event_feed"):
        generate(spec.model_copy(update={"labels": labels}), days=1, machines=1, seed=0)


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(_spec(tmp_path), days=2, machines=2, seed=0, progress=True)
    captured = capsys.readouterr()
    assert "2/2" in captured.err and captured.out == ""


def test_positive_rate_is_stable_across_seeds(tmp_path: Path) -> None:
    rates = [
        _labelled(generate(_spec(tmp_path / str(seed)), days=10, machines=30, seed=seed))[
            "y"
        ].mean()
        for seed in (21, 22)
    ]
    assert all(0.04 <= r <= 0.12 for r in rates), rates  # type: ignore[operator]
    assert np.ptp(rates) > 0  # different seeds really differ


# --- the demo's days: the last one is yesterday unless --start says otherwise --------------


def _demo_days(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> list[dt.date]:
    """Run `python -m demo`'s main at 3 days x 2 machines up to the backtest (stubbed): the
    days it generated (the staged readings files) and handed to the loop must agree."""
    from demo import run as demo
    from orchestration import backtest
    from tests.conftest import make_project
    from tests.test_definitions import _env

    p = make_project(tmp_path)
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    handed: list[list[dt.date]] = []
    specs: list[Spec] = []

    def loop(spec, feeds, days, opts, reports):
        handed.append(days)
        specs.append(spec)
        return None  # the demo stops here: "error", exit 1

    monkeypatch.setattr(backtest, "run", loop)
    argv = ["--spec", str(p.spec.path), "--days", "3", "--build-days", "1", "--machines", "2"]
    assert demo.main([*argv, "--drift-from", "2", "--trials", "1", *extra]) == 1
    staged = tmp_path / ".mlops" / "staging" / p.spec.name / p.spec.landing_dir.name
    written = sorted(
        dt.date.fromisoformat(f.stem.removeprefix("readings_")) for f in staged.iterdir()
    )
    assert handed == [written], (handed, written)
    # The loop runs on the dated copy that the code location loads afterwards.
    (spec,) = specs
    assert spec.path == tmp_path.resolve() / ".mlops" / "specs" / p.spec.path.name
    assert spec.source.start_date == written[0] and spec.landing_dir == p.spec.landing_dir
    return written


def test_the_demo_ends_yesterday_by_default(tmp_path, monkeypatch):
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    days = _demo_days(tmp_path, monkeypatch)
    assert days == [yesterday - dt.timedelta(days=i) for i in (2, 1, 0)]


def test_after_the_demo_the_ui_lists_partitions_from_its_first_day(tmp_path, monkeypatch):
    """`make demo` then `make ui`: the code location, built as the UI's is (from
    MLOPS_SPECS_DIR), loads the demo's dated copy, so every daily asset's partitions begin
    on the first generated day, not at the checked-in spec's start_date, and run on to
    yesterday; the checked-in spec is untouched."""
    from orchestration.definitions import build_definitions
    from tests.conftest import forget_defs_state_storage

    days = _demo_days(tmp_path, monkeypatch)
    forget_defs_state_storage()
    defs = build_definitions()  # what `defs` in orchestration/definitions.py is
    graph = defs.resolve_asset_graph()
    daily = [graph.get(k).partitions_def for k in graph.get_all_asset_keys()]
    bounds = {(d.get_first_partition_key(), d.get_last_partition_key()) for d in daily if d}
    assert bounds == {(days[0].isoformat(), days[-1].isoformat())}
    assert load_spec(tmp_path / "specs" / "machine_failure.yaml").source.start_date == dt.date(
        2026, 1, 1
    )


def test_the_demos_start_overrides_the_default(tmp_path, monkeypatch):
    days = _demo_days(tmp_path, monkeypatch, "--start", "2026-02-10")
    assert days == [dt.date(2026, 2, 10), dt.date(2026, 2, 11), dt.date(2026, 2, 12)]


def test_the_demo_refuses_days_outside_the_specs_partitions(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _demo_days(tmp_path, monkeypatch, "--start", "2025-12-30")  # the spec starts 2026-01-01
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "2025-12-30..2026-01-01" in err and "source.start_date 2026-01-01" in err
