"""The folder layout is the data flow: each floor imports only from the floors below it (read with ast).

core (particles, plan, gates, record) ← adapters ← analysis ← surgery ← io ← tasks ← recover / loop ← cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "particlize"

# floor of each top-level module or package (a package's submodules share its floor)
FLOORS: dict[str, int] = {
    "errors": 0, "_version": 0,
    "batches": 1, "gates": 1, "record": 1, "particles": 1, "plan": 1,
    "adapters": 2,
    "analysis": 3,
    "surgery": 4,
    "io": 5, "models": 5, "sources": 5,
    "tasks": 6,
    "allocate": 7, "measure": 7, "recover": 7, "train": 7, "train_sora": 7, "loop": 7, "outcome": 7, "sweep": 7,
    "parallel": 7, "moe": 7,
    "report": 8, "demo": 8, "cli": 8, "__init__": 8, "__main__": 8,
}
# what data and metrics must never depend on
FORBIDDEN = {"tasks": {"surgery", "loop", "recover", "train", "train_sora", "allocate", "sweep"},
             "models": {"surgery", "loop", "recover", "train", "train_sora", "allocate", "tasks"}}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _top(mod: str) -> str:
    return mod.split(".")[0]


def _imports(mod: str, path: Path) -> list[tuple[str, bool, int]]:
    """``(imported particlize module, inside a function, line)`` for each import of a particlize module."""
    tree = ast.parse(path.read_text())
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # typing only: not imported at run time
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg[: len(pkg) - child.level + 1]
                    target = ".".join([*base, child.module] if child.module else base)
                elif child.module and child.module.split(".")[0] == "particlize":
                    target = child.module.partition(".")[2]
                else:
                    continue
                names = [f"{target}.{a.name}" if target else a.name for a in child.names]
                for n in names:  # `from . import surgery` imports a module; `from .x import name` the module x
                    found.append((n if n in MODULES else target, f, child.lineno))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "particlize":
                        found.append((a.name.partition(".")[2], f, child.lineno))
            visit(child, f)

    visit(tree, False)
    return [(t, f, ln) for t, f, ln in found if t and t in MODULES]


MODULES = _modules()


def test_every_module_has_a_floor():
    assert sorted({_top(m) for m in MODULES} - set(FLOORS)) == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_go_down_the_floors(mod):
    for target, in_func, line in _imports(mod, MODULES[mod]):
        if _top(target) == _top(mod):
            continue
        assert FLOORS[_top(target)] <= FLOORS[_top(mod)], f"{mod}:{line} imports {target}, a floor above it"
        assert _top(target) not in FORBIDDEN.get(_top(mod), ()), f"{mod}:{line} imports {target}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_function_local_imports_of_particlize(mod):
    """Function-local imports are for optional dependencies only, never to dodge an import cycle."""
    local = [(t, ln) for t, in_func, ln in _imports(mod, MODULES[mod]) if in_func]
    assert local == [], f"{mod} imports particlize modules inside functions: {local}"


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in _imports(m, p) if t != m} for m, p in MODULES.items()}
    # a package's __init__ may import its own submodules (it is their namespace); those edges are not cycles
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_no_module_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
