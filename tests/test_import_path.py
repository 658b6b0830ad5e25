"""The code location loads without the heavy libraries, and reads nothing but the specs.

Every Dagster process (daemon ticks, UI reloads, each run) imports orchestration.definitions,
so what it imports is the platform's start-up time. These run a fresh interpreter: in the test
process the libraries are long loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import REPO, fresh_python

# The list, plus what those bring (numpy, pyarrow, scipy) and the lake's own
# (duckdb, fsspec) and the serving stack's.
HEAVY = (
    "pandas",
    "pandera",
    "polars",
    "mlflow",
    "evidently",
    "xgboost",
    "sklearn",
    "matplotlib",
    "optuna",
    "fastapi",
    "starlette",
    "uvicorn",
    "numpy",
    "pyarrow",
    "scipy",
    "duckdb",
    "fsspec",
    "skops",
    "redis",
)

PROBE = r"""
import json, os, sys
import dagster  # Dagster's own imports and reads are not the code location's
opened, connected = [], []
def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if not path.endswith((".py", ".pyc", ".so", ".pth")) and "__pycache__" not in path:
            opened.append(path)
    elif event in ("socket.connect", "sqlite3.connect"):
        connected.append(event)
sys.addaudithook(audit)
import orchestration.definitions
heavy = json.loads(sys.argv[1])
print(json.dumps({
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
    "opened": opened,
    "connected": connected,
    "assets": len(list(orchestration.definitions.defs.assets or [])),
}))
"""


def _probe(tmp_path: Path, specs: Path) -> dict:
    env = {
        "DAGSTER_HOME": str(tmp_path / "home"),
        "MLOPS_SPECS_DIR": str(specs),
        "MLOPS_LAKE_URL": str(tmp_path / "lake"),
    }
    (tmp_path / "home").mkdir(exist_ok=True)
    out = fresh_python(PROBE, env, json.dumps(HEAVY))
    return json.loads(out.strip().splitlines()[-1])


def test_definitions_load_without_the_heavy_libraries(tmp_path: Path) -> None:
    result = _probe(tmp_path, REPO / "specs")
    assert result["assets"] > 0
    assert result["loaded"] == [], (
        "a module on the definitions import path imports these at top level: "
        f"{sorted({m.split('.')[0] for m in result['loaded']})}; import them inside the "
        "function that uses them, or bind the mlops.lazy stand-in"
    )


def test_definitions_read_each_spec_once_and_nothing_else(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    for p in sorted((REPO / "specs").glob("*.yaml")):
        shutil.copy(p, specs / p.name)
    result = _probe(tmp_path, specs)
    opened = [Path(p).resolve() for p in result["opened"]]
    spec_files = sorted(p.resolve() for p in specs.glob("*.yaml"))
    assert spec_files, "the project ships at least one spec"
    assert sorted(opened) == spec_files, result["opened"]
    assert result["connected"] == []  # no database, store or network at load time
    assert not (tmp_path / "lake").exists()  # and no folder created


def test_the_deferred_module_loads_on_first_use() -> None:
    """The stand-in is the real module once touched (same objects, same behaviour)."""
    out = fresh_python(
        "import sys; from mlops.lazy import polars as pl; "
        "assert 'polars' not in sys.modules; "
        "frame = pl.DataFrame({'a': [1, 2]}); import polars; "
        "assert isinstance(frame, polars.DataFrame) and pl.col is polars.col; print('ok')",
        {},
    )
    assert out.strip() == "ok"
