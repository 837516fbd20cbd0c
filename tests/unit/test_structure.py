"""The package's shape: imports go one way and functions stay short (docs/design.md section 2).

Both tests read `nemo_rlp/` with `ast`, without importing it, so they hold for code that would only
be reached at run time: a function-level import counts like one at the top of a module, because an
import moved into a function to dodge a cycle is still a cycle to the reader who follows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_rlp"
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    """`nemo_rlp/data/sources.py` -> `nemo_rlp.data.sources`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its text (any depth, any branch).

    Relative imports are resolved against the module's package; `from pkg import x` counts as an
    import of `pkg.x` where that is a module, and of `pkg` otherwise (x is then a name defined in
    pkg's `__init__`).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def packages_above(name: str) -> set[str]:
    """`a.b.c` -> {`a`, `a.b`}: the packages whose `__init__` runs before `a.b.c` is imported."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}. Importing `a.b.c` also runs the `__init__` of `a.b`,
    so that counts too, except for the importer's own packages (already being imported)."""
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        targets = imported_modules(name, path, known)
        own = packages_above(name) | {name}
        graph[name] = targets | {p for t in targets for p in packages_above(t) if p in known and p not in own}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None; depth-first search with three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The walker itself: a relative import inside a function and `from pkg import module` count."""
    pkg = tmp_path / "nemo_rlp"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n    from .. import top\n")
    (pkg / "sub" / "b.py").write_text("from nemo_rlp.sub.a import f\n")
    (pkg / "top.py").write_text("import nemo_rlp.sub\n")
    known = {"nemo_rlp", "nemo_rlp.sub", "nemo_rlp.sub.a", "nemo_rlp.sub.b", "nemo_rlp.top"}
    assert imported_modules("nemo_rlp.sub.a", pkg / "sub" / "a.py", known) == {
        "nemo_rlp.sub.b",
        "nemo_rlp.top",
    }
    graph = {
        "nemo_rlp.sub.a": {"nemo_rlp.sub.b"},
        "nemo_rlp.sub.b": {"nemo_rlp.sub.a"},
        "nemo_rlp.top": {"nemo_rlp.sub"},
        "nemo_rlp.sub": set(),
    }
    assert find_cycle(graph) == ["nemo_rlp.sub.a", "nemo_rlp.sub.b", "nemo_rlp.sub.a"]
    graph["nemo_rlp.sub.b"] = set()
    assert find_cycle(graph) is None
    assert packages_above("nemo_rlp.sub.a") == {"nemo_rlp", "nemo_rlp.sub"}


def test_no_import_cycle_in_the_package():
    """No module of nemo_rlp reaches itself through imports, counting function-level ones."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_is_over_100_lines():
    """Every function (and method) in nemo_rlp fits on a screen or two: at most 100 lines."""
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    assert not offenders, "functions over 100 lines:\n" + "\n".join(offenders)
