"""The spec model and `mlops spec check`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli.main import main
from mlops.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, data: dict) -> Path:
    (tmp_path / "specs").mkdir(exist_ok=True)
    p = tmp_path / "specs" / "x.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _base() -> dict:
    return yaml.safe_load((REPO / "specs" / "machine_failure.yaml").read_text())


def test_embedded_spec_is_valid_and_summarized():
    result = CliRunner().invoke(main, ["spec", "check", str(REPO / "specs/machine_failure.yaml")])
    assert result.exit_code == 0, result.output
    assert "machine_failure/training_set" in result.output
    assert "spec ok" in result.output
    assert len(result.output.splitlines()) < 25  # one screen


@pytest.mark.parametrize(
    ("path", "typo", "where"),
    [
        ((), "nmae", "nmae"),
        (("source",), "file_patern", "source.file_patern"),
        (("features",), "lookback_dayz", "features.lookback_dayz"),
        (("model", "candidates", 0), "serch_space", "model.candidates.0.serch_space"),
    ],
)
def test_typo_field_fails_with_its_path(tmp_path, path, typo, where):
    data = _base()
    node = data
    for part in path:
        node = node[part]
    node[typo] = 1
    p = _write(tmp_path, data)
    result = CliRunner().invoke(main, ["spec", "check", str(p)])
    assert result.exit_code == 1
    assert where in result.output
    assert "unknown field" in result.output


def test_every_problem_is_reported_with_path_and_expectation(tmp_path):
    data = _base()
    data["name"] = "Bad-Name"
    data["schema"]["columns"][4]["min"] = 500  # min above max
    data["model"]["candidates"][0]["estimator"] = "xgbost"
    data["source"]["start_date"] = "2026-13-01"
    p = _write(tmp_path, data)
    with pytest.raises(SpecError) as err:
        load_spec(p)
    where = [loc for loc, _ in err.value.problems]
    assert {"name", "schema.columns.4", "model.candidates.0.estimator", "source.start_date"} <= set(
        where
    )
    text = str(err.value)
    assert "'xgboost'" in text and "greater than max" in text


def test_cross_references_are_checked(tmp_path):
    data = _base()
    data["features"]["passthrough"].append("humidity")
    data["features"]["aggregates"][0]["windows"] = ["3d"]
    p = _write(tmp_path, data)
    with pytest.raises(SpecError) as err:
        load_spec(p)
    problems = dict(err.value.problems)
    assert problems["features.passthrough"] == "'humidity' is not in schema.columns"
    assert "longer than the lookback" in problems["features.aggregates.0.windows"]


def test_label_kinds_need_their_fields(tmp_path):
    data = _base()
    data["labels"] = {"kind": "column"}
    with pytest.raises(SpecError, match="needs 'column'"):
        load_spec(_write(tmp_path, data))


def test_cli_entry_point_reports_without_traceback(tmp_path):
    data = _base()
    data["sourc"] = data.pop("source")
    p = _write(tmp_path, data)
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "spec", "check", str(p)], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "sourc: unknown field" in out.stderr
    assert "source: required field is missing" in out.stderr


@pytest.mark.parametrize(
    ("end", "expected"),
    [
        ("2025-12-31", "is before source.start_date 2026-01-01"),  # the day before the start
        ("2026-02-30", "valid date"),
        ("2200-01-01", "less than or equal to 2100-12-31"),
    ],
)
def test_a_bad_end_date_is_refused_naming_the_field(tmp_path, end, expected):
    data = _base()
    data["source"]["end_date"] = end
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, data))
    problems = dict(err.value.problems)
    assert list(problems) == ["source.end_date"], problems
    assert expected in problems["source.end_date"]


def test_an_end_date_on_or_after_the_start_bounds_the_history(tmp_path):
    data = _base()
    data["source"]["end_date"] = "2026-01-01"  # a one-day history
    spec = load_spec(_write(tmp_path, data))
    assert spec.source.end_date == spec.source.start_date
    result = CliRunner().invoke(main, ["spec", "check", str(tmp_path / "specs" / "x.yaml")])
    assert result.exit_code == 0, result.output
    assert "daily partitions from 2026-01-01 to 2026-01-01" in result.output
    assert load_spec(REPO / "specs" / "machine_failure.yaml").source.end_date is None
