"""The layout's rules, read from the source: data flows one way and no import cycle exists.

Every ``import`` of the project's packages counts, also those inside functions and under
``TYPE_CHECKING``: a lazy import is still a dependency, and hiding a cycle behind one is how
cycles start. README "How a draft is made" states the same rules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("connectors", "pipeline", "serving", "flows", "medvlm")


def _all_imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def _imports(path: Path) -> Iterator[str]:
    return (name for name in _all_imports(path) if name.split(".")[0] in PACKAGES)


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (``a.b`` for ``from a.b import c``)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts).removesuffix(".__init__")
            graph[module] = set(_imports(path))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module] & graph.keys():
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def _violations(source_package: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        module: sorted(t for t in targets if not t.startswith(allowed))
        for module, targets in import_graph().items()
        if module.startswith(f"{source_package}.")
        and any(not t.startswith(allowed) for t in targets)
    }


def test_there_is_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pipeline_is_pure_domain_logic() -> None:
    # No connectors (I/O), serving (models), flows (Prefect) or CLI: only itself and the errors.
    assert _violations("pipeline", ("pipeline.", "medvlm.errors")) == {}


def test_connectors_never_reach_up_into_flows_serving_or_the_cli() -> None:
    allowed = ("connectors.", "pipeline.", "medvlm.errors", "medvlm.settings", "medvlm.http_edge")
    assert _violations("connectors", allowed) == {}


def test_only_entry_points_choose_implementations() -> None:
    users = {m for m, targets in import_graph().items() if "connectors.factory" in targets}
    assert users and all(m.startswith(("flows.", "medvlm.cli", "medvlm.dev.")) for m in users)


def test_serving_does_not_depend_on_flows_or_connectors() -> None:
    allowed = ("serving.", "pipeline.", "medvlm.errors", "medvlm.settings", "medvlm.http_edge")
    assert _violations("serving", allowed) == {}


def test_production_code_never_needs_the_dev_tooling() -> None:
    """medvlm.dev (dev servers, tiny-model builder, synthetic data, demo) is for development:
    only the CLI's dev, demo and random-weight paths reach it."""
    allowed = {"medvlm.cli"}
    users = {
        module
        for module, targets in import_graph().items()
        if not module.startswith("medvlm.dev") and any(t.startswith("medvlm.dev") for t in targets)
    }
    assert users == allowed


DEV_ONLY_DEPENDENCIES = ("transformers", "tokenizers", "safetensors", "pydicom_data")


def test_dev_only_dependencies_are_imported_by_the_dev_tooling_only() -> None:
    """pyproject puts these in the `dev` extra: a worker image does not have them."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            {n for n in _all_imports(path) if n.split(".")[0] in DEV_ONLY_DEPENDENCIES}
        )
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "dev" not in path.relative_to(ROOT).parts[:2]
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_declared_dependencies_match_the_imports() -> None:
    """deptry (from the registries): nothing imported but undeclared, nothing declared unused
    (the exceptions, each with its reason, are in pyproject's [tool.deptry])."""
    done = subprocess.run(
        [sys.executable, "-m", "deptry", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
