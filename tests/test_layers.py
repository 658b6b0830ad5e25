"""The layers point one way, read from the source (every import, at any depth of a function).

    mlops  <-  catalog, resources  <-  assets  <-  sensors  <-  orchestration  <-  cli
    mlops  <-  serving  <-  cli                  mlops  <-  deploy
    orchestration  <-  demo  <-  cli  (the embedded example: generator and `make demo`)

mlops/ is the domain library: no Dagster, no wiring, no service. catalog/ holds the names and
partitions the definitions share, so assets and sensors never import orchestration/ (which
imports them). A module cycle anywhere fails too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("mlops", "catalog", "resources", "assets", "sensors", "orchestration", "serving")
PACKAGES += ("deploy", "demo", "cli")
# What each package may import, besides itself and third-party libraries other than Dagster.
ALLOWED = {
    "mlops": set(),
    "catalog": {"mlops", "dagster"},
    "resources": {"mlops", "dagster"},
    "assets": {"mlops", "catalog", "resources", "dagster"},
    "sensors": {"mlops", "catalog", "resources", "dagster"},
    "orchestration": {"mlops", "catalog", "resources", "assets", "sensors", "dagster"},
    "serving": {"mlops"},
    "deploy": {"mlops", "dagster"},
    "demo": {"mlops", "catalog", "orchestration", "dagster"},  # the example, above the product
    "cli": {"mlops", "catalog", "orchestration", "serving", "deploy", "demo", "dagster"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts).removesuffix(".__init__")] = f
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every absolute import in the file: (dotted name, line), `from a import b` as a.b too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def _top(name: str) -> str:
    top = name.split(".")[0]
    return "dagster" if top == "dagster" or top.startswith("dagster_") else top


def test_each_package_imports_only_the_layers_below_it() -> None:
    bad = []
    for mod, path in _modules().items():
        pkg = mod.split(".")[0]
        for name, line in _imports(path):
            top = _top(name)
            if top != pkg and (top in PACKAGES or top == "dagster") and top not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert bad == [], "imports against the layers:\n" + "\n".join(sorted(set(bad)))


def test_no_module_cycle() -> None:
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in modules.items():
        for name, _ in _imports(path):
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a package's __init__ is not an edge from its own submodules
            if target and target != mod and not mod.startswith(target + "."):
                edges[mod].add(target)
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    cycles.append(sorted(comp))
    assert cycles == [], f"module cycles: {cycles}"


def test_the_rules_see_real_imports() -> None:
    """The reader finds imports inside functions too (a rule that reads nothing passes)."""
    found = {n for n, _ in _imports(REPO / "orchestration" / "definitions.py")}
    assert {"dagster", "assets.data", "catalog.jobs"} <= found
    assert any(n.startswith("polars") for n, _ in _imports(REPO / "mlops" / "sources.py")) is False
    assert len(_modules()) > 60
