"""The shape docs/ARCHITECTURE.md promises, checked on the source: layers, no import
cycles, module sizes, messages by layer. Every import counts, the ones inside functions
too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "safepoint"

# The layers, lowest first; a module may import from its own layer and the ones below.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "base",
        {
            "errors",
            "units",
            "fileio",
            "directio",
            "format",
            "manifest",
            "schema",
            "rng",
            "lock",
            "records",
            "memory",
        },
    ),
    (
        "store",
        {
            "faults",
            "validity",
            "store",
            "snapshot",
            "staging",
            "fence",
            "writer",
            "foreign",
            "sharding",
            "restore",
            "fits",
            "writing",
            "thinning",
        },
    ),
    ("policies", {"plan", "schedule", "options", "retention", "disk", "signals", "data_order"}),
    # the mirror is a replica the engine hands commits to (behind saver.Replica)
    ("engine", {"distributed", "engine", "remote", "remote_dir"}),
    ("integrations", {"integrations"}),
    ("app", {"app", "report", "report_render", "report_html", "powercut"}),
    ("cli", {"cli", "__main__", "__init__"}),
]
MAX_LINES = 450


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("safepoint."):
                found.add(node.module.removeprefix("safepoint."))
            elif node.module == "safepoint":
                found.update(a.name for a in node.names if (SRC / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("safepoint.")
                for a in node.names
                if a.name.startswith("safepoint.")
            )
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        mod = _module(path)
        graph[mod] = {m for m in _imports(path) if m != mod}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, (_name, members) in enumerate(LAYERS):
        if top in members or module in members:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")


def test_every_module_is_in_a_layer_and_imports_only_downwards() -> None:
    wrong = []
    for module, deps in _graph().items():
        if module == "__init__":
            continue  # the package's lazy public names
        for dep in deps:
            if _layer(dep) > _layer(module):
                wrong.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {dep} "
                             f"({LAYERS[_layer(dep)][0]})")  # fmt: skip
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = _graph()
    graph.pop("__init__", None)
    # a package's modules depend on their package's __init__ only by Python's rules
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if seen.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_no_module_over_the_size_limit() -> None:
    sizes = {_module(p): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not big, big
    façade = SRC / "engine" / "checkpointer.py"
    assert len(façade.read_text().splitlines()) < 300


@pytest.mark.parametrize("layer", ["base", "store", "policies", "engine", "integrations"])
def test_the_library_never_names_a_command_line_flag(layer: str) -> None:
    """Messages by layer: the library names options (keep_last=2); only app/ and cli/
    speak of --flags."""
    flag = re.compile(r"""["'][^"'\n]*\s--[a-z][a-z-]+""")
    members = dict(LAYERS)[layer]
    offenders = []
    for path in SRC.rglob("*.py"):
        if _module(path).split(".")[0] not in members:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if flag.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
