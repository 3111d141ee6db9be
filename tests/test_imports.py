"""The package's import structure: no cycle between modules, none between the package's parts
(subpackages and top-level modules) counting imports inside functions too, every module
importable on its own, ``import autobatch`` without optuna (nor Lightning or transformers with
``autobatch.integrations``), and the plug-in boundary (config <-> plug-ins only through the
registry)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autobatch"


def _module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _imports(path: Path, *, module_level: bool, modules: dict[str, Path] = MODULES) -> set[str]:
    """The autobatch modules ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``),
    at module level only or everywhere; ``if TYPE_CHECKING:`` blocks never count."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            children: list[ast.AST] = list(node.orelse)
        elif module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return  # runs when called, not on import (class bodies do run on import)
        else:
            children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & set(modules)
            found.update(subs or {node.module})
        for child in children:
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_module_level_imports_form_no_cycle() -> None:
    # A package's __init__ runs before its modules, so the implicit module -> parent package
    # edge is left out; an import inside a function (done on first use) is too.
    graph = {name: _imports(path, module_level=True) - {name} for name, path in MODULES.items()}
    assert _cycle(graph) is None


def _part(module: str) -> str:
    """The part of the package a module belongs to: its subpackage (``autobatch.train``) or,
    for a top-level module, itself (``autobatch.api``, ``autobatch`` for the package's face)."""
    return ".".join(module.split(".")[:2])


def _part_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Part -> the parts it imports, counting imports inside functions (run on first use, they
    tie the parts together all the same); ``if TYPE_CHECKING:`` imports are left out."""
    graph: dict[str, set[str]] = {_part(name): set() for name in modules}
    for name, path in modules.items():
        graph[_part(name)] |= {_part(dep) for dep in _imports(path, module_level=False, modules=modules)}
    for part, deps in graph.items():
        deps.discard(part)
    return graph


def test_the_parts_import_each_other_in_no_cycle_function_level_imports_included() -> None:
    # e.g. fit's lr="auto" runs a study that trains with the loop: it is resolved in
    # autobatch.api, above both train and tune, so the loop never imports the studies.
    assert _cycle(_part_graph(MODULES)) is None


def test_a_cycle_through_an_import_inside_a_function_is_caught(tmp_path: Path) -> None:
    # The check can fail: a copy of the package where the loop imports the studies inside a
    # function (the shape the lr="auto" resolver once had) has a train -> tune -> train cycle.
    copy = tmp_path / "autobatch"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    loop = copy / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _injected():\n    from autobatch.tune.auto_lr import choose_base_lr\n")
    modules = _module_files(copy)
    cycle = _cycle(_part_graph(modules))
    assert cycle is not None and {"autobatch.train", "autobatch.tune"} <= set(cycle)
    assert _cycle({n: _imports(p, module_level=True, modules=modules) - {n} for n, p in modules.items()}) is None


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    # Each module is imported first, with every autobatch module forgotten before (torch and
    # the other third-party modules stay loaded, so this costs one interpreter, not one per
    # module): an import cycle fails from some entry point with "partially initialized module".
    names = [name for name in MODULES if name != "autobatch.__main__"]  # __main__ runs the CLI
    script = f"""
import importlib, sys, traceback
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "autobatch" or m.startswith("autobatch.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-2))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.slow  # a fresh interpreter imports torch: 5-7 s on a busy machine
def test_import_autobatch_does_not_import_optuna() -> None:
    code = "import autobatch, sys; print('optuna' in sys.modules, 'matplotlib' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]


def test_import_autobatch_imports_neither_trainer() -> None:
    code = ("import sys, autobatch, autobatch.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


PLUGIN_PACKAGES = ("autobatch.policies", "autobatch.scaling", "autobatch.problems", "autobatch.loggers")


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith(PLUGIN_PACKAGES)])
def test_plugins_do_not_import_the_config(name: str) -> None:
    assert "autobatch.config" not in _imports(MODULES[name], module_level=False)


def test_the_config_and_the_registry_import_no_plugin() -> None:
    # config -> registry only; the registry names its entries as strings and imports them on
    # first use.
    config = _imports(MODULES["autobatch.config"], module_level=False)
    assert config == {"autobatch.registry"}
    assert _imports(MODULES["autobatch.registry"], module_level=True) == set()
