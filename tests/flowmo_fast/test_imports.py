"""The house plan, read from the source (AST; nothing of the project is imported except to read the network's
`__all__`): which room may import which, no private names across modules, no import circle anywhere, argparse only in
commands, no argparse Namespace below a command's `main`, and names that do not collide.

Rooms of `flowmo_fast`: the network (`flowmo_fast.flowmo`), the token generator (`flowmo_fast.maskgit`), the files
on disk (`flowmo_fast.formats`), and the top (settings, shared helpers, the public API and the commands).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("flowmo_kernels", "flowmo_fast", "train", "eval", "bench")
NETWORK, GENERATOR, FORMATS = "flowmo_fast.flowmo", "flowmo_fast.maskgit", "flowmo_fast.formats"
# The top's modules the network must not reach either: the public API over it and the commands.
ABOVE_THE_NETWORK = ("flowmo_fast", "flowmo_fast.codec", "flowmo_fast.tokenize", "flowmo_fast.detokenize",
                     "flowmo_fast.flags")
ARGPARSE_ALLOWED = ("flowmo_fast.flags", "train.cli")  # shared flags; besides these, only commands (a `main`)


# ---- reading the source ---------------------------------------------------------------------------------------


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of our packages (tests and the bench's own pytest files left out)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if not path.name.startswith(("test_", "conftest")):
                found[module_name(path, root)] = path
    return found


def module_level_imports(tree: ast.Module):
    """Every import statement outside a function body: module level, inside if/try/with and class bodies, the
    bodies of `if TYPE_CHECKING:` and `if __name__ == "__main__":` included (a circle through either is still a
    circle in the design, and a checker or a script run follows it)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            pending += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            pending += [s for h in getattr(node, "handlers", []) for s in h.body]


def imported(node: ast.AST, importer: str, modules: dict) -> list[tuple[str, str]]:
    """(module, name) pairs an import statement takes from our modules: name "" for a whole module; a name
    imported from a package that is its submodule counts as that module."""
    if isinstance(node, ast.Import):
        return [(a.name, "") for a in node.names if a.name in modules]
    base = node.module or ""
    if node.level:  # relative import
        package = importer if modules[importer].name == "__init__.py" else importer.rpartition(".")[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}" if base else package
    pairs = []
    for a in node.names:
        if f"{base}.{a.name}" in modules:
            pairs.append((f"{base}.{a.name}", ""))
        elif base in modules:
            pairs.append((base, a.name))
    return pairs


def imports_of(modules: dict) -> dict[str, list[tuple[str, str]]]:
    return {
        name: [pair for node in module_level_imports(ast.parse(path.read_text(), str(path)))
               for pair in imported(node, name, modules) if pair[0] != name]
        for name, path in modules.items()
    }


def import_graph(modules: dict) -> dict[str, set[str]]:
    return {name: {m for m, _ in pairs} for name, pairs in imports_of(modules).items()}


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


def in_room(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


# ---- the rules, as functions of the modules (so their tests can feed them a made-up house) ---------------------


def network_violations(imports: dict) -> list[str]:
    """The network imports neither the generator, nor the disk formats, nor what sits above it."""
    return [f"{m} -> {t}" for m, pairs in imports.items() if in_room(m, NETWORK) for t, _ in pairs
            if in_room(t, GENERATOR) or in_room(t, FORMATS) or t in ABOVE_THE_NETWORK]


def formats_violations(imports: dict) -> list[str]:
    """The disk formats import neither the generator nor what sits above them."""
    return [f"{m} -> {t}" for m, pairs in imports.items() if in_room(m, FORMATS) for t, _ in pairs
            if in_room(t, GENERATOR) or t in ABOVE_THE_NETWORK]


def generator_violations(imports: dict, network_api: set[str]) -> list[str]:
    """The generator takes from the network only names the network exports (`flowmo_fast.flowmo.__all__`), from
    the package itself, never a module inside it."""
    bad = []
    for m, pairs in imports.items():
        if not in_room(m, GENERATOR):
            continue
        for t, name in pairs:
            if in_room(t, NETWORK) and not (t == NETWORK and name in network_api):
                bad.append(f"{m} -> {t}{'.' + name if name else ''}")
    return bad


def private_imports(imports: dict) -> list[str]:
    """`from our_module import _name`: a private name taken from another module."""
    return [f"{m} takes {t}.{name}" for m, pairs in imports.items() for t, name in pairs if name.startswith("_")]


def confusable_names(names: list[str]) -> list[tuple[str, str]]:
    """Module names of one folder that differ only by a short ending (step / steps, tokenize / tokenizer,
    generator / generation); an ending after an underscore is a word of its own (report / report_rows)."""
    pairs = []
    for i, a in enumerate(sorted(names)):
        for b in sorted(names)[i + 1:]:
            stem = len(next((p for p in (a[:k] for k in range(min(len(a), len(b)), 0, -1)) if b.startswith(p)), ""))
            ends = (a[stem:], b[stem:])
            if stem >= 4 and all(len(e) <= 3 and not e.startswith("_") for e in ends):
                pairs.append((a, b))
    return pairs


# ---- the rules on this checkout ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict:
    return project_modules()


@pytest.fixture(scope="module")
def imports(modules) -> dict:
    return imports_of(modules)


def network_api() -> set[str]:
    tree = ast.parse((REPO / "flowmo_fast" / "flowmo" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_the_rooms_exist(modules):
    for room in (NETWORK, GENERATOR, FORMATS):
        assert room in modules, f"{room} is missing"
        assert ast.get_docstring(ast.parse(modules[room].read_text())), f"{room} has no docstring saying what it owns"


def test_no_import_circle_anywhere(modules):
    graph = import_graph(modules)
    assert "flowmo_fast.config" in graph["flowmo_fast.flowmo.model"]  # the reader sees imports at all
    cycle = find_cycle(graph)
    assert cycle == [], "import circle: " + " -> ".join(cycle)


def test_room_rules(imports):
    assert network_violations(imports) == []
    assert formats_violations(imports) == []
    assert generator_violations(imports, network_api()) == []


def test_no_private_name_crosses_a_module(imports):
    assert private_imports(imports) == []


def test_no_confusable_module_names_in_a_folder(modules):
    folders: dict[Path, list[str]] = {}
    for name, path in modules.items():
        if path.name != "__init__.py":
            folders.setdefault(path.parent, []).append(path.stem)
    clashes = {str(folder.relative_to(REPO)): confusable_names(names) for folder, names in folders.items()}
    assert {k: v for k, v in clashes.items() if v} == {}


def is_command(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def test_argparse_only_in_commands(modules):
    users = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if "argparse" in names and not (is_command(tree) or name in ARGPARSE_ALLOWED):
            users.append(name)
    assert users == [], f"argparse outside the commands and {ARGPARSE_ALLOWED}: {users}"


def is_namespace(a: ast.arg) -> bool:
    return "Namespace" in ast.unparse(a.annotation) if a.annotation else a.arg == "args"


def is_parser(a: ast.arg) -> bool:
    return "ArgumentParser" in ast.unparse(a.annotation) if a.annotation else a.arg in ("parser", "p")


def namespace_takers(tree: ast.Module) -> list[str]:
    """Functions with a parameter annotated argparse.Namespace (or an unannotated one called `args`) that are not
    flag readers. A reader takes the flags (and perhaps their parser) and nothing else, and turns them into a value
    (`-> SomeSettings`, not None / int / bool) or checks them (`check_*`)."""
    bad = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        if not any(is_namespace(a) for a in params):
            continue
        returns = ast.unparse(fn.returns) if fn.returns else "None"
        only_flags = all(is_namespace(a) or is_parser(a) for a in params)
        if not (only_flags and (fn.name.startswith("check_") or returns not in ("None", "int", "bool"))):
            bad.append(f"{fn.name}(...) -> {returns}")
    return bad


def test_no_namespace_below_main(modules):
    found = {name: namespace_takers(ast.parse(path.read_text())) for name, path in modules.items()}
    assert {k: v for k, v in found.items() if v} == {}


def generator_misnamed(tree: ast.Module) -> list[str]:
    """A parameter or field called `generator` is a torch.Generator (or the quantizers' `Generators`): the token
    model (`TokenGenerator`, `LoadedGenerator`), its checkpoint or its settings are never called just `generator`."""
    bad = []
    for node in ast.walk(tree):
        pairs = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            pairs = [(a.arg, ast.unparse(a.annotation) if a.annotation else "") for a in params]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, (ast.Name, ast.Attribute)):
            name = node.target.id if isinstance(node.target, ast.Name) else node.target.attr
            pairs = [(name, ast.unparse(node.annotation))]
        for name, annotation in pairs:
            if name == "generator" and annotation and not re.search(r"torch\.Generator|\bGenerators\b", annotation):
                bad.append(f"generator: {annotation}")
    return bad


def test_generator_means_a_torch_generator(modules):
    found = {name: generator_misnamed(ast.parse(path.read_text())) for name, path in modules.items()}
    assert {k: v for k, v in found.items() if v} == {}


# ---- each rule fails on a house that breaks it ---------------------------------------------------------------


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_module_level_imports_include_type_checking_and_main_blocks():
    tree = ast.parse(
        "import x\nif TYPE_CHECKING:\n    import y\nif __name__ == '__main__':\n    import w\n"
        "def f():\n    import z\ntry:\n    import v\nexcept ImportError:\n    import u\n"
    )
    assert sorted(n.names[0].name for n in module_level_imports(tree)) == ["u", "v", "w", "x", "y"]


def test_room_rules_catch_violations():
    house = {
        "flowmo_fast.flowmo.model": [("flowmo_fast.formats.checkpoint", "read_checkpoint")],
        "flowmo_fast.flowmo.flow": [("flowmo_fast.maskgit.model", "")],
        "flowmo_fast.formats.data": [("flowmo_fast.codec", "Tokenizer")],
        "flowmo_fast.maskgit.sampling": [("flowmo_fast.flowmo.graphed_sampler", "capture_graph"),
                                         ("flowmo_fast.flowmo", "FlowMo"), ("flowmo_fast.flowmo", "_secret")],
        "train.loop": [("flowmo_fast.config", "_parse_value")],
    }
    assert network_violations(house) == ["flowmo_fast.flowmo.model -> flowmo_fast.formats.checkpoint",
                                         "flowmo_fast.flowmo.flow -> flowmo_fast.maskgit.model"]
    assert formats_violations(house) == ["flowmo_fast.formats.data -> flowmo_fast.codec"]
    assert generator_violations(house, {"FlowMo"}) == [
        "flowmo_fast.maskgit.sampling -> flowmo_fast.flowmo.graphed_sampler.capture_graph",
        "flowmo_fast.maskgit.sampling -> flowmo_fast.flowmo._secret",
    ]
    assert private_imports(house) == ["flowmo_fast.maskgit.sampling takes flowmo_fast.flowmo._secret",
                                      "train.loop takes flowmo_fast.config._parse_value"]


def test_confusable_names_are_caught():
    assert confusable_names(["step", "steps", "loop"]) == [("step", "steps")]
    assert confusable_names(["tokenize", "tokenizer", "codec"]) == [("tokenize", "tokenizer")]
    assert confusable_names(["generator", "generation"]) == [("generation", "generator")]
    assert confusable_names(["report", "report_rows", "generator", "generator_config", "step", "start"]) == []


def test_namespace_and_generator_rules_catch_violations():
    trainer = ast.parse(
        "def main(argv=None) -> int:\n    return run(parse(argv))\n"
        "def settings_from(args: argparse.Namespace) -> Settings: ...\n"
        "def check_data_flags(parser, args: argparse.Namespace) -> None: ...\n"
        "def run(args: argparse.Namespace, config: Config) -> int: ...\n"
        "def find_start(args, log_dir: str) -> StartPoint: ...\n"
        "def prepare(args, config) -> None: ...\n"
        "def train(args: argparse.Namespace) -> int: ...\n"
    )
    assert namespace_takers(trainer) == ["run(...) -> int", "find_start(...) -> StartPoint", "prepare(...) -> None",
                                         "train(...) -> int"]
    names = ast.parse(
        "def f(generator: Optional[torch.Generator] = None): ...\n"
        "def g(generator: TokenGenerator): ...\n"
        "class Loaded:\n    generator: TokenGenerator\n    rng: torch.Generator\n"
        "def h(model: TokenGenerator, generator: Generators = None): ...\n"
    )
    assert generator_misnamed(names) == ["generator: TokenGenerator", "generator: TokenGenerator"]
