"""The one settings model (mlops/settings.py): read at call time, checked against the production
profile's example env file, and clear about a wrong value."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from mlops.settings import PREFIX, Settings, SettingsError, settings, unknown, variable
from serving.settings import SETTINGS_ENV, ServeSettings
from tests.conftest import REPO

EXAMPLE = REPO / "deploy" / "prod.env.example"
LINE_RE = re.compile(r"^([A-Z][A-Z0-9_]*)=", re.M)


def _example_keys() -> set[str]:
    return set(LINE_RE.findall(EXAMPLE.read_text()))


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.upper().startswith(PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_variable_of_the_example_is_a_setting():
    ours = {k for k in _example_keys() if k.startswith(PREFIX)}
    assert ours, "the example sets MLOPS_* variables"
    assert unknown(ours) == []


def test_every_setting_is_in_the_example_or_its_default_explained_there():
    keys = _example_keys()
    comments = "\n".join(
        line for line in EXAMPLE.read_text().splitlines() if line.lstrip().startswith("#")
    )
    for field in Settings.model_fields:
        name = variable(field)
        assert name in keys or re.search(rf"\b{name}\b", comments), (
            f"{name}: neither set in {EXAMPLE.name} nor its default explained in a comment"
        )


def test_every_setting_is_documented():
    for field, info in Settings.model_fields.items():
        assert info.description, f"{variable(field)} has no description"


def test_values_are_read_at_call_time(clean_env, tmp_path):
    assert settings().executor == "in_process"
    assert settings().optuna_storage is None
    clean_env.setenv("MLOPS_LAKE_URL", str(tmp_path / "lake"))
    clean_env.setenv("MLOPS_EXECUTOR", " Celery ")
    clean_env.setenv("MLOPS_OPTUNA_STORAGE", "")  # empty: the default
    s = settings()
    assert (s.lake_url, s.executor, s.optuna_storage) == (str(tmp_path / "lake"), "celery", None)
    clean_env.setenv("MLOPS_CELERY_POLL_SECONDS", "1.5")
    assert settings().celery_poll_seconds == 1.5


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("MLOPS_EXECUTOR", "bogus", "use in_process"),
        ("MLOPS_MULTIPROCESS_START_METHOD", "fork", "use spawn"),
        ("MLOPS_CELERY_POLL_SECONDS", "-1", "more than 0 and at most 10"),
        ("MLOPS_CELERY_POLL_SECONDS", "soon", "more than 0 and at most 10"),
        ("MLOPS_DAGSTER_UI_PORT", "abc", "valid integer"),
        ("MLOPS_CELERY_WORKERS", "0", "greater than or equal to 1"),
    ],
)
def test_a_wrong_value_names_the_variable_the_value_and_what_to_use(clean_env, name, value, says):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"{name}={value!r}: .*{says}"):
        settings()
    clean_env.delenv(name)
    settings()  # and the next call, with the variable gone, is fine


def test_the_env_file_wins_over_the_environment(clean_env, tmp_path):
    f = tmp_path / "prod.env"
    f.write_text("# a comment\nMLOPS_EXECUTOR=celery\nMLOPS_PG_PASSWORD=\nDAGSTER_HOME=x\n")
    clean_env.setenv("MLOPS_EXECUTOR", "multiprocess")
    clean_env.setenv("MLOPS_PG_PASSWORD", "from-the-shell")
    clean_env.setenv("MLOPS_PG_HOST", "db.example")  # not in the file: the environment's
    s = settings(env_file=f)
    assert (s.executor, s.pg_password, s.pg_host) == ("celery", None, "db.example")
    assert settings().executor == "multiprocess"  # without the file: the environment
    f.write_text("MLOPS_CELERY_POLL_SECONDS=-2\n")
    with pytest.raises(SettingsError, match=r"prod\.env\): MLOPS_CELERY_POLL_SECONDS='-2'"):
        settings(env_file=f)


def test_the_production_profile_reads_its_file_through_the_model(clean_env, tmp_path):
    from deploy import prod

    env, s, path = prod.load_env(EXAMPLE)
    assert path == EXAMPLE
    assert (s.executor, s.pg_port, s.celery_workers) == ("celery", 5432, 2)
    assert prod.workers(s) == ["celery-worker-1", "celery-worker-2"]
    assert prod.ui_url(s) == "http://127.0.0.1:3030"
    assert env["MLOPS_LAKE_URL"] == str(REPO / ".mlops" / "prod" / "lake")  # relative: root
    assert env["DAGSTER_HOME"] == str(REPO / ".mlops" / "prod" / "dagster_home")
    typo = tmp_path / "prod.env"
    typo.write_text(EXAMPLE.read_text() + "MLOPS_EXECUTER=celery\n")
    with pytest.raises(SystemExit, match="MLOPS_EXECUTER: not a setting"):
        prod.load_env(typo)
    bad = tmp_path / "bad.env"
    bad.write_text(EXAMPLE.read_text().replace("MLOPS_PG_PORT=5432", "MLOPS_PG_PORT=54x"))
    with pytest.raises(SystemExit, match="MLOPS_PG_PORT='54x'"):
        prod.load_env(bad)
    missing = tmp_path / "missing.env"
    missing.write_text(EXAMPLE.read_text().replace("MLOPS_PG_HOST=127.0.0.1\n", ""))
    with pytest.raises(SystemExit, match="set MLOPS_PG_HOST"):
        prod.load_env(missing)


def _serve(**kw) -> ServeSettings:
    base = {
        "spec_path": "s.yaml",
        "tracking_uri": "sqlite:///m.db",
        "store_url": "x",
        "log_dir": "l",
    }
    return ServeSettings(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"mode": "blue"}, r"mode\n.*'champion', 'shadow'.*'canary'.*input_value='blue'"),
        ({"canary_fraction": 1.5}, r"canary_fraction\n.*less than or equal to 1.*1\.5"),
        ({"poll_interval_s": 0}, r"poll_interval_s\n.*greater than 0"),
        ({"max_batch": 0}, r"max_batch\n.*greater than or equal to 1"),
        ({"max_future_s": -1}, r"max_future_s\n.*greater than or equal to 0"),
        ({"load_retry_s": 5, "load_retry_max_s": 2}, r"load_retry_s 5\.0 is more than"),
    ],
)
def test_serve_settings_refuse_a_wrong_value_naming_it(kw, says):
    with pytest.raises(ValidationError, match=re.compile(says, re.S)):
        _serve(**kw)


def test_serve_settings_travel_to_the_workers_as_json(monkeypatch):
    s = _serve(mode="canary", canary_fraction=0.25, max_future_s=None)
    monkeypatch.setenv(SETTINGS_ENV, s.to_env())
    assert ServeSettings.from_env() == s
    monkeypatch.setenv(SETTINGS_ENV, '{"spec_path": "s.yaml"}')
    with pytest.raises(RuntimeError, match="does not hold a server's settings"):
        ServeSettings.from_env()
