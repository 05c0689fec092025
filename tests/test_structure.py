"""The house: the package's import graph has no cycle, its layers import only downward, and every
file says its one job in the first line of its docstring."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "phi4_jax"

# What each layer may import of phi4_jax (besides itself). The CLI modules may import anything.
BASE = {"phi4_jax.config", "phi4_jax.errors"}
ALLOWED = {
    "phi4_jax.config": {"phi4_jax.errors"},
    "phi4_jax.errors": set(),
    "phi4_jax.compilation_cache": set(),
    "phi4_jax.parallel": BASE,
    # Kernels run under shard_map take their specs from parallel's rules table (never the reverse).
    "phi4_jax.model": BASE | {"phi4_jax.parallel"},
    "phi4_jax.text": BASE,
    # The engine detokenizes and stops on text: it stands on text/ as on the model.
    "phi4_jax.engine": BASE | {"phi4_jax.model", "phi4_jax.parallel", "phi4_jax.text"},
    "phi4_jax.checkpoints": BASE | {"phi4_jax.model", "phi4_jax.parallel"},
    "phi4_jax.train": BASE | {"phi4_jax.model", "phi4_jax.parallel"},
    "phi4_jax.api": BASE | {"phi4_jax.compilation_cache", "phi4_jax.platforms", "phi4_jax.model", "phi4_jax.parallel",
                            "phi4_jax.engine", "phi4_jax.checkpoints", "phi4_jax.text"},
    "phi4_jax.platforms": set(),
    # The planner compiles the engine's programs without running them: beside the API, below the CLI.
    "phi4_jax.planner": BASE | {"phi4_jax.model", "phi4_jax.parallel", "phi4_jax.engine"},
    # The server's layer (HTTP), beside the command lines: the API and everything below it.
    "phi4_jax.server": BASE | {"phi4_jax.api", "phi4_jax.compilation_cache", "phi4_jax.model", "phi4_jax.parallel",
                               "phi4_jax.engine", "phi4_jax.checkpoints", "phi4_jax.text"},
}
# The command lines (the `phi4-jax` command and its `python -m` aliases) may import anything.
CLI = {"phi4_jax.cli", "phi4_jax.generate", "phi4_jax.serve", "phi4_jax.__main__"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (anywhere in the file)."""
    graph = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from a import b`: a.b where it is a module
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
            found.update(n for n in names if n in modules)
        graph[module_name(path)] = found - {module_name(path)}
    return graph


def layer(module: str) -> str:
    """The layer a module belongs to: its subpackage, or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def test_the_import_graph_has_no_cycle():
    graph = imports()
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(trail + [module])
        state[module] = "open"
        for other in graph[module]:
            visit(other, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_layers_import_only_downward():
    graph = imports()
    wrong = []
    for module, targets in graph.items():
        if module == "phi4_jax" or layer(module) in CLI:
            continue
        allowed = ALLOWED[layer(module)] | {layer(module)}
        wrong += [f"{module} imports {t}" for t in targets if layer(t) not in allowed]
    assert not wrong, wrong
    # The rules table is data: it imports nothing of phi4_jax at all.
    assert graph["phi4_jax.parallel.rules"] == set()


def test_nothing_but_the_command_lines_knows_a_command_line():
    graph = imports()
    users = {m for m, targets in graph.items() if {layer(t) for t in targets} & CLI and layer(m) not in CLI}
    assert users == set(), users


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_file_says_its_job_in_its_first_docstring_line(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path} has no module docstring"
    first = doc.splitlines()[0]
    assert 20 <= len(first) <= 120 and first.endswith((".", "`", ")")), first  # one whole sentence


def test_no_utils_module():
    assert not [p for p in PACKAGE.rglob("*.py") if p.stem in ("utils", "util", "helpers", "misc")]
