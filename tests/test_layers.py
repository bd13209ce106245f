"""The layering of docs/design.md holds: imports only point down, and no module cycle exists.

Every `import` / `from ... import` in src/mixprec is read with `ast`, including the lazy
imports inside functions, so a cycle cannot hide behind one. Imports under `TYPE_CHECKING`
(annotations only, never executed) count for the layering but not as cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mixprec"

# docs/design.md's table: a package may import only from packages of a lower layer
# (and from itself). `mixprec/__init__.py` (the public API) sits above everything.
LAYERS = {
    "formats": 0,
    "scaling": 1, "master": 1, "float8": 1,
    "recipes": 2,
    "distributed": 3,
    "precision": 4,
    "memory": 5, "numerics": 5,
    "bench": 6,
    "cli": 7, "integrations": 7,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                inside.update(id(n) for n in ast.walk(stmt))
    return inside


def imports(*, type_checking: bool = True) -> dict[str, set[str]]:
    """module -> the mixprec modules it imports (resolved, relative imports included)."""
    names = {module_name(p): p for p in SRC.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for mod, path in names.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found = set()
        tree = ast.parse(path.read_text(), str(path))
        skip = set() if type_checking else _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [f"{target}.{a.name}" for a in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                if c.startswith("mixprec"):
                    while c not in names and "." in c:
                        c = c.rpartition(".")[0]
                    if c in names and c != mod:
                        found.add(c)
                        break
        out[mod] = found
    return out


def package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "mixprec"


def test_every_package_has_a_layer():
    found = {package(m) for m in imports()} - {"mixprec"}
    assert found == set(LAYERS), f"add to LAYERS (and docs/design.md): {found ^ set(LAYERS)}"


def test_imports_point_down():
    upward = []
    for mod, targets in imports().items():
        src = package(mod)
        if src == "mixprec":
            continue  # the public API re-exports from every layer
        for t in targets:
            dst = package(t)
            if dst == src:
                continue
            if dst == "mixprec" or LAYERS[dst] >= LAYERS[src]:  # same layer: independent
                upward.append(f"{mod} -> {t}")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_module_cycles():
    graph = imports(type_checking=False)
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
