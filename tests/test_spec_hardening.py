"""A spec is untrusted input: paths stay in the project, the loader is bounded in time and
memory, numbers are bounded, and nothing but SpecError comes out of load_spec."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mlops.spec import MAX_SPEC_CHARS, Spec, SpecError, load_spec, summary

REPO = Path(__file__).resolve().parent.parent
BASE_TEXT = (REPO / "specs" / "machine_failure.yaml").read_text()
BASE: dict = yaml.safe_load(BASE_TEXT)


def _write(root: Path, data: dict | str, name: str = "x.yaml") -> Path:
    (root / "specs").mkdir(parents=True, exist_ok=True)
    p = root / "specs" / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def _set(data: dict, dotted: str, value: Any) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(SpecError) as err:
        load_spec(path)
    return dict(err.value.problems)


# --- 3b: landing folders stay inside the project root ---------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source.path", "/etc"),
        ("source.path", "../../etc"),
        ("source.path", "data/../../.."),
        ("labels.events.path", "/etc"),
        ("labels.events.path", "../outside"),
    ],
)
def test_landing_path_outside_the_project_root_is_refused(tmp_path, field, value):
    root = tmp_path / "project"
    problems = _problems(_write(root, _set(BASE, field, value)))
    msg = problems[field]
    resolved = (root / value).resolve() if not value.startswith("/") else Path(value).resolve()
    assert str(resolved) in msg
    assert f"project root {root.resolve()}" in msg
    assert f"{field.removesuffix('.path')}.allow_outside_project: true" in msg


def test_a_symlink_out_of_the_project_is_outside(tmp_path):
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "landing").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    problems = _problems(_write(root, _set(BASE, "source.path", "data/landing")))
    assert str((tmp_path / "elsewhere").resolve()) in problems["source.path"]


def test_paths_that_stay_inside_the_root_load(tmp_path):
    data = _set(BASE, "source.path", "data/../landing/readings")
    data = _set(data, "labels.events.path", str(tmp_path / "events"))  # absolute, inside
    spec = load_spec(_write(tmp_path, data))
    assert spec.landing_dir == tmp_path / "data/../landing/readings"
    assert spec.outside_project() == []
    assert "warning" not in summary(spec)


def test_allow_outside_project_loads_and_spec_check_warns(tmp_path):
    outside = tmp_path / "shared" / "readings"
    data = _set(BASE, "source.path", str(outside))
    data = _set(data, "source.allow_outside_project", True)
    spec = load_spec(_write(tmp_path / "project", data))
    assert spec.landing_dir == outside
    assert spec.outside_project() == [("source.path", outside.resolve())]
    warnings = [line for line in summary(spec).splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "source.path" in warnings[0] and str(outside.resolve()) in warnings[0]
    # The flag is per feed: the label feed is still held to the root.
    data = _set(data, "labels.events.path", "/etc")
    assert list(_problems(_write(tmp_path / "project", data))) == ["labels.events.path"]


def test_the_rule_holds_for_every_loader_not_only_load_spec(tmp_path):
    data = _set(BASE, "source.path", "/etc")
    with pytest.raises(ValueError, match="allow_outside_project"):
        Spec.model_validate({**data, "root": tmp_path})


def test_a_backtest_copy_lands_inside_its_own_root(tmp_path):
    from orchestration.backtest import staged_spec

    spec = load_spec(_write(tmp_path / "project", BASE, "machine_failure.yaml"))
    landed = staged_spec(spec, tmp_path / "state")
    assert landed.root == (tmp_path / "state").resolve()
    assert landed.landing_dir.is_relative_to(landed.root)


# --- 10: the loader is bounded in size, nesting, aliases and echoed values ------------------

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

# Loads a spec in a child with 2 GiB of address space and 20 s of CPU, so a regression
# fails the test instead of hanging the suite or the machine.
BOUNDED = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
    from mlops.spec import SpecError, load_spec
    try:
        load_spec(sys.argv[1])
    except SpecError as e:
        print("SpecError", e.problems)
        sys.exit(0)
    print("loaded")
    sys.exit(3)
    """
)


def _load_bounded(path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", BOUNDED, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    return out.stdout


def test_an_alias_bomb_is_a_spec_error_not_a_hang(tmp_path):
    # The bomb on a typed field, the way it ran load_spec out of memory.
    text = BASE_TEXT.replace(
        "description: IoT fleet - predict machine failure within 24 h from hourly sensor readings",
        "description: *i",
    )
    out = _load_bounded(_write(tmp_path, BILLION_LAUGHS + text))
    assert "alias" in out and "(file)" in out


def test_a_fifo_in_place_of_a_spec_is_refused_without_blocking(tmp_path):
    (tmp_path / "specs").mkdir()
    os.mkfifo(tmp_path / "specs" / "x.yaml")
    assert "not a regular file" in _load_bounded(tmp_path / "specs" / "x.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "contains it"),
        ("a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper"),
        (
            "a: &a [[[[[[[[[[1]]]]]]]]]]\nb: &b [[[[[[[[[[*a]]]]]]]]]]\nc: &c [[[[[[[[[[*b]]]]]]]]]]\n"
            "d: &d [[[[[[[[[[*c]]]]]]]]]]\ne: &e [[[[[[[[[[*d]]]]]]]]]]\nf: [[[[[[[[[[*e]]]]]]]]]]\n",
            "deeper than 50 levels through aliases",
        ),
        ("trials: " + "9" * 5000 + "\n", "not valid YAML"),
        ("start: !!timestamp 2026-99-99\n", "not valid YAML"),
    ],
)
def test_hostile_yaml_is_a_spec_error(tmp_path, text, message):
    assert message in _problems(_write(tmp_path, text))["(file)"]


def test_an_oversized_or_binary_file_is_refused(tmp_path):
    big = _write(tmp_path, "# " + "x" * MAX_SPEC_CHARS + "\n" + BASE_TEXT, "big.yaml")
    assert "larger than" in _problems(big)["(file)"]
    binary = tmp_path / "specs" / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00")
    assert "not UTF-8" in _problems(binary)["(file)"]
    assert "regular file" in _problems(tmp_path / "specs")["(file)"]


def test_a_wrong_value_is_echoed_in_a_few_characters(tmp_path):
    data = _set(BASE, "model.trials", "x" * 20_000)
    data = _set(data, "source.format", list(range(5_000)))
    data = _set(data, "monitoring.drift_method", {"k": ["v" * 1000] * 20})
    problems = _problems(_write(tmp_path, data))
    assert problems.keys() >= {"model.trials", "source.format", "monitoring.drift_method"}
    assert all(len(m) < 250 for m in problems.values()), problems


def test_a_flood_of_problems_is_listed_up_to_a_cap(tmp_path):
    data = _set(BASE, "schema.columns", [{"name": f"c{i}", "type": "nope"} for i in range(500)])
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, data))
    assert len(err.value.problems) >= 500  # all kept for callers
    assert len(str(err.value).splitlines()) <= 52 and "more" in str(err.value)


# --- 11: every number and duration is bounded -----------------------------------------------

SEARCH = "model.candidates.0.search_space"


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("model.trials", 100_000_000_000, "model.trials"),
        ("model.seed", -1, "model.seed"),
        ("model.training_window_days", 1_000_000, "model.training_window_days"),
        ("model.split", [math.nan, 0.5, 0.5], "model.split.0"),
        (f"{SEARCH}.max_depth", {"type": "int", "low": 8, "high": 3}, f"{SEARCH}.max_depth"),
        (f"{SEARCH}.max_depth", {"type": "int", "low": 3}, f"{SEARCH}.max_depth"),
        (f"{SEARCH}.max_depth", {"type": "int", "low": 2.5, "high": 3}, f"{SEARCH}.max_depth"),
        (
            f"{SEARCH}.subsample",
            {"type": "float", "low": 0, "high": 1, "log": True},
            f"{SEARCH}.subsample",
        ),
        (
            f"{SEARCH}.subsample",
            {"type": "float", "low": -math.inf, "high": 1},
            f"{SEARCH}.subsample.low",
        ),
        (f"{SEARCH}.subsample", {"type": "categorical"}, f"{SEARCH}.subsample"),
        ("model.candidates.0.params.n_estimators", math.inf, "model.candidates.0.params"),
        ("gates.thresholds.roc_auc", math.inf, "gates.thresholds.roc_auc"),
        ("gates.min_improvement", math.nan, "gates.min_improvement"),
        ("gates.slice_tolerance", -1, "gates.slice_tolerance"),
        ("gates.latency_budget_ms", math.inf, "gates.latency_budget_ms"),
        ("monitoring.drift_threshold", math.nan, "monitoring.drift_threshold"),
        ("monitoring.column_drift_threshold", math.inf, "monitoring.column_drift_threshold"),
        ("monitoring.metric_decline_tolerance", math.inf, "monitoring.metric_decline_tolerance"),
        (
            "monitoring.retrain_cooldown_partitions",
            100_000,
            "monitoring.retrain_cooldown_partitions",
        ),
        ("monitoring.consecutive_drift_days", 100_000, "monitoring.consecutive_drift_days"),
        ("monitoring.drift_sample_rows", 10**12, "monitoring.drift_sample_rows"),
        ("monitoring.max_attempts_per_episode", 10**6, "monitoring.max_attempts_per_episode"),
        ("features.lookback_days", 5000, "features.lookback_days"),
        ("labels.horizon", "100000d", "labels.horizon"),
        ("labels.maturity", "99999999999999999999d", "labels.maturity"),
        ("labels.horizon", "0m", "labels.horizon"),
        (
            "features.aggregates.0.windows",
            ["99999999999999999999d"],
            "features.aggregates.0.windows.0",
        ),
        ("features.aggregates.0.windows", ["0h"], "features.aggregates.0.windows.0"),
        ("schema.columns.4.min", math.nan, "schema.columns.4.min"),
        ("source.start_date", "0001-01-01", "source.start_date"),
        ("source.settle_seconds", math.inf, "source.settle_seconds"),
        ("source.encoding", "base64", "source.encoding"),
        ("source.date_format", "%Y-%m", "source.date_format"),
    ],
)
def test_values_that_cannot_work_fail_with_their_path(tmp_path, field, value, where):
    problems = _problems(_write(tmp_path, _set(BASE, field, value)))
    assert any(loc.startswith(where) for loc in problems), problems


CRONS = [
    "0 2 * * *",
    "@daily",
    "*/5 * * * MON-FRI",
    "15,45 9-17 * * 1-5",
    "0 0 1-31/2 JAN-MAR SUN",
    "0 0 L * *",
    "0 0 * * 0#2",
    "0 0 ? * *",
    "0 2 * *",
    "every day",
    "0 25 * * *",
    "60 * * * *",
    "0 0 0 * *",
    "0 0 * 13 *",
    "@reboot",
]


def _dagster_takes(cron: str) -> bool:
    """Does Dagster accept `cron` for a schedule (its public definition API)?"""
    import dagster as dg

    try:
        dg.ScheduleDefinition(name="probe", cron_schedule=cron, target=dg.AssetSelection.all())
    except dg.DagsterInvalidDefinitionError:
        return False
    return True


@pytest.mark.parametrize("cron", CRONS)
def test_a_schedule_dagster_would_refuse_fails_spec_check(tmp_path, cron):
    data = _set(BASE, "monitoring.retraining_schedule", cron)
    if _dagster_takes(cron):
        assert load_spec(_write(tmp_path, data)).monitoring.retraining_schedule == cron
    else:
        assert (
            "not a cron schedule"
            in _problems(_write(tmp_path, data))["monitoring.retraining_schedule"]
        )


def test_the_shipped_spec_is_within_every_bound():
    spec = load_spec(REPO / "specs" / "machine_failure.yaml")
    assert spec.model.trials == 10 and spec.outside_project() == []


# --- fuzz: nothing but SpecError, in bounded time -------------------------------------------

TOKENS = [
    *"abc01 :-[]{},&*!|>'\"#\n\t?%@`.",
    "\n  ",
    "name: ",
    "source: ",
    "kind: sql",
    "path: ",
    "- ",
    "&x ",
    "*x",
    "<<: *x",
    "!!str ",
    "!!binary ",
    "!!python/object:os.system ",
    ".inf",
    ".nan",
    "1e400",
    "2026-02-30",
    "99999999999999999999d",
    "\x00",
    "\ufeff",
    "---\n",
    "...\n",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["24h", "0m", "100000d", "/etc", "../..", "sql", "files", "*_{date}.csv"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for k, v in items:
        out.extend(_paths(v, (*prefix, k)))
    return out


SQL_BASE = {
    **BASE,
    "source": {
        "kind": "sql",
        "url": "postgresql+psycopg2://etl:${DB_PASSWORD}@db/iot",
        "query": "SELECT * FROM readings WHERE timestamp >= :start AND timestamp < :end",
        "timestamp_column": "timestamp",
        "entity_column": "machine_id",
        "start_date": "2026-01-01",
    },
}
FUZZ_DIR = Path(tempfile.mkdtemp(prefix="spec-fuzz-"))


def _must_only_raise_spec_error(text: str) -> None:
    path = _write(FUZZ_DIR, text)
    t0 = time.process_time()
    with contextlib.suppress(SpecError):
        load_spec(path)
    # A guard against runaway work (CPU time, so a busy machine cannot fail it), not a
    # timing target: one load takes milliseconds.
    assert time.process_time() - t0 < 5


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_fuzz_yaml_ish_documents(text):
    _must_only_raise_spec_error(text)


def _edits(base: dict):
    op = st.sampled_from(["set", "delete", "extra"])
    edit = st.tuples(st.sampled_from([p for p in _paths(base) if p]), op, VALUES)
    return st.tuples(st.just(base), st.lists(edit, min_size=1, max_size=3))


@settings(max_examples=60, deadline=None, database=None)
@given(st.sampled_from([BASE, SQL_BASE]).flatmap(_edits))
def test_fuzz_mutations_of_the_shipped_spec(base_and_edits):
    base, edits = base_and_edits
    data = copy.deepcopy(base)
    for path, op, value in edits:
        node: Any = data
        try:
            for part in path[:-1]:
                node = node[part]
            if op == "set":
                node[path[-1]] = value
            elif op == "delete":
                del node[path[-1]]
            elif isinstance(node, dict):
                node["zz_extra"] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this branch
    _must_only_raise_spec_error(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


@settings(max_examples=40, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(BASE_TEXT)),
            st.integers(min_value=0, max_value=20),
            st.sampled_from(TOKENS),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_text_edits_of_the_shipped_spec(edits):
    text = BASE_TEXT
    for at, cut, token in edits:
        text = text[:at] + token + text[at + cut :]
    _must_only_raise_spec_error(text)


def test_the_replays_schedule_ticks_are_dagsters():
    """orchestration.schedules.next_fire (public API) fires where Dagster's internal cron
    iterator, which the replay used before, does: every valid cron above, random instants
    over two decades, on and off the ticks."""
    import datetime as dt
    import random

    legacy = pytest.importorskip("dagster._utils.schedules")
    from orchestration.schedules import next_fire

    rng = random.Random(15)
    crons = [c for c in CRONS if legacy.is_valid_cron_string(c)]
    crons += ["@weekly", "@monthly", "@hourly", "@yearly", "30 6 * * 1", "0 0 29 2 *"]
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    for cron in crons:
        for i in range(60):
            at = start + dt.timedelta(minutes=rng.randrange(20 * 365 * 1440))
            at = at.replace(minute=0, hour=rng.choice([0, 2, 9])) if i % 3 == 0 else at
            at = at.replace(second=17) if i % 7 == 0 else at
            expected = next(legacy.cron_string_iterator(at.timestamp(), cron, "UTC"))
            assert next_fire(cron, at) == expected, (cron, at)
