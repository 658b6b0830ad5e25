"""Deferred imports of the data libraries, so the Dagster code location loads without them.

Every Dagster process imports the code location: the daemon's ticks, the UI's reloads, each run
worker. polars, numpy, pandas, pandera, duckdb and fsspec together cost more than Dagster's own
import there, yet most of those processes never touch a frame. Modules on the definitions path
bind these stand-ins instead (the real module under TYPE_CHECKING, for the type checkers):

    if TYPE_CHECKING:
        import polars as pl
    else:
        from mlops.lazy import polars as pl

The real module is imported on the first attribute access (`pl.col`), from inside the function
that uses it, and the stand-in keeps it from then on. Python's import lock makes the first access
thread-safe. Nothing at module level may touch an attribute (no `pl.Float64` in a constant, no
frame class as a base): that would import the library when definitions load, which
`tests/test_import_path.py` catches.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A module imported on first use; `getattr` falls through to the real one."""

    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def load(self) -> ModuleType:
        module = self._module
        if module is None:
            module = importlib.import_module(self._name)
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(
            f"{self._name} is a deferred import; set attributes on the real module"
        )

    def __dir__(self) -> list[str]:
        return dir(self.load())

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<deferred module {self._name!r} ({state})>"


duckdb = LazyModule("duckdb")
fsspec = LazyModule("fsspec")
numpy = LazyModule("numpy")
pandas = LazyModule("pandas")
pandera = LazyModule("pandera.pandas")
polars = LazyModule("polars")
