"""The library's import structure, read from the source (AST, nothing imported): no import cycle among
`flowmo_fast`'s modules at module level, and argparse only in the commands' package `flowmo_fast.cli`."""

from __future__ import annotations

import ast
from pathlib import Path

import flowmo_fast

PACKAGE = Path(flowmo_fast.__file__).parent
COMMANDS = "flowmo_fast.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def runs_at_import(test: ast.expr) -> bool:
    """False for the bodies of `if TYPE_CHECKING:` and `if __name__ == "__main__":` (not run on import)."""
    text = ast.unparse(test)
    return text not in ("TYPE_CHECKING", "typing.TYPE_CHECKING") and "__name__" not in text


def import_time_imports(tree: ast.Module):
    """The import statements Python runs when it imports the module: module level, also inside if/try/with
    and class bodies, not inside functions."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            pending += (node.body if runs_at_import(node.test) else []) + node.orelse
        elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
            pending += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            pending += [s for h in getattr(node, "handlers", []) for s in h.body]


def resolve(node: ast.AST, importer: str, modules: dict[str, Path]) -> set[str]:
    """The library modules an import statement loads (a name imported from a package: its submodule if it is
    one, else the package's __init__)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:  # relative import
        package = importer if modules[importer].name == "__init__.py" else importer.rpartition(".")[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}" if base else package
    found = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    if base in modules and len(found) < len(node.names):
        found.add(base)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set().union(*(resolve(n, name, modules) for n in import_time_imports(tree))) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_import_time_imports_skip_functions_and_type_checking():
    tree = ast.parse(
        "import x\nif TYPE_CHECKING:\n    import y\nif __name__ == '__main__':\n    import w\n"
        "def f():\n    import z\ntry:\n    import v\nexcept ImportError:\n    import u\n"
    )
    assert sorted(n.names[0].name for n in import_time_imports(tree)) == ["u", "v", "x"]


def test_library_has_no_import_cycle():
    graph = import_graph(library_modules())
    assert "flowmo_fast.model" in graph and "flowmo_fast.config" in graph["flowmo_fast.model"]
    assert find_cycle(graph) == [], "import cycle: " + " -> ".join(find_cycle(graph))


def test_argparse_only_in_the_commands_package():
    users = []
    for name, path in library_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if "argparse" in imported and not (name == COMMANDS or name.startswith(COMMANDS + ".")):
            users.append(name)
    assert users == [], f"argparse outside {COMMANDS}: {users}"
