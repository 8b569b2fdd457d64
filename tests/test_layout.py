"""Pins the package's shape: no import cycles, no reaching into a sibling feature
package's private modules, modules of a readable size.

The graph is built from the source (``ast``), so it sees every import: module level,
inside functions (lazy imports) and under ``TYPE_CHECKING``. A cycle through any of them
is a design dependency both ways, whatever Python tolerates at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "personalize_middleware"
ROOT = "personalize_middleware"
#: Subpackages that are features of their own; the rest of the top level is the core
#: (models, interfaces, config, ...) every feature may use.
FEATURES = ("cache", "devtools", "jinja", "local", "telemetry", "tracking", "upstream")
MAX_LINES = 400
REASON_MARK = "Longer than"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(imported module, line, the name imported) for each package-internal import."""
    found: list[tuple[str, int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if not target.startswith(ROOT):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, node.lineno, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(ROOT):
                    found.append((alias.name, node.lineno, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _, _ in _imports(name, path, modules) if target != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _feature(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FEATURES else None


def test_the_package_has_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The checker itself: a two-module and a three-module cycle are named.
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def test_no_module_reaches_into_a_sibling_feature_package() -> None:
    modules = _modules()
    offences = []
    for name, path in modules.items():
        own = _feature(name)
        for target, line, imported in _imports(name, path, modules):
            other = _feature(target)
            if other is None or other == own:
                continue
            private_module = any(part.startswith("_") for part in target.split(".")[2:])
            if private_module or imported.startswith("_"):
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_modules_stay_readable_or_say_why(path: Path) -> None:
    text = path.read_text()
    lines = text.count("\n")
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_LINES or REASON_MARK in docstring, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it, or say why in "
        f"its docstring ('{REASON_MARK} ~{MAX_LINES} lines because ...')"
    )


def test_every_module_is_on_the_architecture_map() -> None:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and f" {path.name} " not in text.replace("\n", " \n")
    ]
    assert not missing, f"docs/architecture.md does not list: {missing}"
