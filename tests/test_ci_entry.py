"""`.ci/run` itself sets CI=true, so no runner can turn the real-service tests into skips."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text(f"#!/usr/bin/env bash\n{body}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_ci_entry_point_exports_ci_true_to_make_test(tmp_path):
    # Stand-ins for chromium, prometheus and node (so nothing is installed) and make (records what
    # it was given).
    seen = tmp_path / "seen"
    for tool in ("chromium", "promtool", "prometheus", "node", "npm"):
        _tool(tmp_path, tool, "exit 0")
    _tool(tmp_path, "make", f'echo "CI=${{CI:-unset}} args=$*" > {seen}')
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert seen.read_text().split() == ["CI=true", "args=test"]
