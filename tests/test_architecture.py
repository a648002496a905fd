"""The import graph keeps the architecture: layers import downwards only, the core knows
no concrete manager, nothing but the managers and the kind registry names one, and no
modules import each other at load time in a cycle. Read from the source (ast), so a
lazy import inside a function counts too; imports under ``if TYPE_CHECKING:`` do not
(they never run)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "tangram"

# Lower layers never import higher ones. Same layer: allowed (no cycles, checked below).
LAYERS = {
    "tangram.errors": 0,
    "tangram.spec": 1,
    "tangram.core": 2,
    "tangram.wire": 2,
    "tangram.actions": 2,
    "tangram.leasing": 2,
    "tangram.kinds": 3,
    "tangram.executors": 3,
    "tangram.client": 3,
    "tangram.config": 4,
    "tangram.journal": 4,
    "tangram.metrics": 4,
    "tangram.broker": 5,
    "tangram.server": 6,
    "tangram.sim": 6,
    "tangram.ray": 7,
    "tangram.cli": 8,
    "tangram.integrations": 8,  # adapters for RL frameworks, on top of every door
    "tangram.testing": 0,  # the engine emulator (a process of its own; imports no tangram)
}
CONCRETE_MANAGERS = {"CpuManager", "GpuManager", "QuotaManager"}


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_of(p): p for p in ROOT.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], bool]]:
    """(module imported, names imported, at module level) for each tangram import."""
    out: list[tuple[str, list[str], bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other, top)
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == "tangram":
                    names = [a.name for a in child.names]
                    # "from tangram import kinds" imports the module tangram.kinds.
                    subs = [f"{child.module}.{n}" for n in names if f"{child.module}.{n}" in known]
                    for sub in subs:
                        out.append((sub, [], top))
                    if len(subs) < len(names):
                        out.append((child.module, names, top))
            elif isinstance(child, ast.Import):
                out.extend((a.name, [], top) for a in child.names if a.name.startswith("tangram."))
            else:
                nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                visit(child, top and not nested)

    visit(ast.parse(path.read_text()), True)
    return out


def layer(module: str) -> int | None:
    best = None
    for prefix, n in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, n)
    return None if best is None else best[1]


def test_every_module_has_a_layer() -> None:
    missing = [m for m in modules() if m != "tangram" and layer(m) is None]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_imports_only_go_down_the_layers() -> None:
    mods = modules()
    known = set(mods)
    bad = []
    for mod, path in mods.items():
        here = layer(mod)
        if here is None:
            continue
        for target, _, _ in imports(path, known):
            there = layer(target)
            if there is not None and there > here:
                bad.append(f"{mod} (layer {here}) imports {target} (layer {there})")
    assert not bad, "\n".join(bad)


def test_only_the_managers_and_the_kind_registry_name_a_concrete_manager() -> None:
    mods = modules()
    known = set(mods)
    bad = []
    for mod, path in mods.items():
        if mod.startswith(("tangram.core.managers", "tangram.kinds")):
            continue
        for target, names, _ in imports(path, known):
            named = CONCRETE_MANAGERS & set(names)
            if named:
                bad.append(f"{mod} imports {sorted(named)} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_at_load_time() -> None:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        for target, _, top in imports(path, known):
            if top and target in known and target != mod:
                graph[mod].add(target)
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n) :], n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
