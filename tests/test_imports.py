"""The package's import structure: no import circle anywhere in `solversearch` (lazy imports inside
functions count: a circle hidden in a function still ties two modules into one), every module imports
first in a fresh interpreter, and no module — tests included — imports another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "solversearch"


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name → (file, whether it is a package's __init__)."""
    found = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """(module imported from, name taken from it or None) for one import statement, relative ones resolved."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join(here + ([node.module] if node.module else []))
    return [(base, alias.name) for alias in node.names]


def import_statements(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import in the file: at module level and inside functions, classes and conditionals."""
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def owner(name: str, known: dict) -> str | None:
    """The package module that defines `name`: the longest dotted prefix that is a module."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules importing it runs. Importing `a.b.c` runs the packages `a.b` (its
    __init__) first, unless they are the importer's own packages (already being imported)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in known.items():
        own = set(ancestors(module))
        targets = set()
        for node in import_statements(path):
            for source, name in imported_names(node, module, is_package):
                target = owner(f"{source}.{name}" if name else source, known)
                if target is None:
                    continue
                targets |= {target, *ancestors(target)}
        graph[module] = {t for t in targets if t != module and t not in own and t in known}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that returns to its start), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module)
            if circle:
                return circle
    return None


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "solversearch.search.registry" in graph["solversearch.search.experiment"]  # relative, module level
    assert "solversearch.search.runner" in graph["solversearch.cli"]  # `from .search.runner import` in a function
    assert "solversearch.search" in graph["solversearch.cli"]  # running the sub-package's __init__ first


def test_there_is_no_import_circle_in_the_package():
    assert find_circle(import_graph()) is None, " → ".join(find_circle(import_graph()) or [])


def test_a_circle_would_be_found():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


FIRST_IMPORTS = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "solversearch" or m.startswith("solversearch.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.timeout(600)
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module is imported with no solversearch module loaded before it (third-party libraries stay
    loaded, so one interpreter serves them all): any order works, not only the one the tests happen to use."""
    names = sorted(modules())
    result = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORTS, *names],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def private_uses(path: Path, known: dict) -> list[str]:
    """Private names (one leading underscore) this file takes from other solversearch modules: imported
    by name, or read as an attribute of a solversearch module it imported."""
    tree = ast.parse(path.read_text())
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    here = ".".join(Path(shown).with_suffix("").parts).removesuffix(".__init__")
    is_package = path.name == "__init__.py"
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for source, name in imported_names(node, here, is_package):
            if not source.startswith(PACKAGE):
                continue
            if name is None:  # import solversearch.x.y [as z]
                alias = next(a for a in node.names if a.name == source)
                module_aliases[alias.asname or source.split(".")[0]] = source if alias.asname else PACKAGE
            elif f"{source}.{name}" in known:  # from solversearch.x import module
                alias = next(a for a in node.names if a.name == name)
                module_aliases[alias.asname or name] = f"{source}.{name}"
            if name and name.startswith("_") and not name.startswith("__") and owner(source, known) != here:
                found.append(f"{shown}:{node.lineno}: from {source} import {name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and module_aliases[node.value.id] != here
        ):
            found.append(f"{shown}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    known = modules()
    files = sorted((REPO / PACKAGE).rglob("*.py")) + sorted((REPO / "tests").glob("*.py"))
    files += sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "experiments").glob("*.py"))
    found = [use for path in files for use in private_uses(path, known)]
    assert not found, "\n".join(found)


def test_a_private_import_would_be_found(tmp_path):
    known = modules()
    probe = tmp_path / "probe.py"
    probe.write_text("from solversearch.search import base\nfrom solversearch.plan import _x\nbase._y\n")
    found = private_uses(probe, known)
    assert len(found) == 2 and "import _x" in found[0] and "base._y" in found[1]


def test_every_solversearch_name_a_script_or_test_imports_exists():
    """Benchmarks and experiment scripts run rarely and import lazily, inside functions: a name that moved
    (`storage_url` left `search.storage` for `search.database`) would break them only when run."""
    import importlib

    missing = []
    for folder in ("benchmarks", "experiments", "tests"):
        for path in sorted((REPO / folder).glob("*.py")):
            for node in import_statements(path):
                for module, name in imported_names(node, "", False):
                    if not module.startswith(PACKAGE):
                        continue
                    imported = importlib.import_module(module)
                    if name is not None and not hasattr(imported, name):
                        try:
                            importlib.import_module(f"{module}.{name}")  # a submodule
                        except ImportError:
                            missing.append(f"{path.relative_to(REPO)}: from {module} import {name}")
    assert not missing, "\n".join(missing)


def test_the_search_api_names_all_resolve_and_reading_a_study_does_not_load_ray():
    """`solversearch.search` exports its API lazily: every name in `__all__` resolves, and commands that
    only read a study (show, export) import its storage without paying for Ray Tune."""
    from solversearch import search

    for name in search.__all__:
        assert getattr(search, name) is not None, name
    code = "import sys, solversearch.search.storage, solversearch.exports; print('ray' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "False"
