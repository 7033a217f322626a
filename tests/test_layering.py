"""The layering holds: every nsteer module has a layer, imports only go down (function-level imports included), and
no import cycle exists. A module added without a layer, an upward import or a cycle fails here, naming the import.

Layers (docs and DESIGN §5): 0 errors, constants, limits, files, records, prompts, checkers, quality, checkpoint;
1 the model handle and the execution seam; 2 vectors, edits, extraction, generation; 3 the recipe and its pipeline;
4 evaluation and search; 5 NDIF jobs, llama.cpp interop, reports; 6 the CLI and the package's public face.

Only the CLI imports nsteer modules inside functions (each command loads what it needs, after nnsight was imported
with a clean argv); elsewhere a function-level import is only for a heavy third-party package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nsteer"

LAYERS: dict[str, int] = {
    "nsteer.constants": 0,
    "nsteer.errors": 0,
    "nsteer.progress": 0,
    "nsteer.threads": 0,
    "nsteer.fileio": 0,
    "nsteer.limits": 0,
    "nsteer.text": 0,
    "nsteer.records": 0,
    "nsteer.prompts": 0,
    "nsteer.evaluate": 0,
    "nsteer.evaluate.custom_checks": 0,
    "nsteer.evaluate.check_spec": 0,
    "nsteer.evaluate.checkers": 0,
    "nsteer.evaluate.quality": 0,
    "nsteer.evaluate.checkpoint": 0,
    "nsteer.evaluate.stats": 0,
    "nsteer.evaluate.ifeval_data": 0,
    "nsteer.model_cache": 1,
    "nsteer.throughput": 1,
    "nsteer.models": 1,
    "nsteer.execution": 1,
    "nsteer.execution.nnsight_private": 1,
    "nsteer.execution.errors": 1,
    "nsteer.execution.ndif": 1,
    "nsteer.execution.backend": 1,
    "nsteer.execution.results": 1,
    "nsteer.searched": 2,
    "nsteer.vectors": 2,
    "nsteer.edits": 2,
    "nsteer.extract": 2,
    "nsteer.generate": 2,
    "nsteer.recipe": 3,
    "nsteer.pipeline": 3,
    "nsteer.evaluate.runner": 4,
    "nsteer.evaluate.inputs": 4,
    "nsteer.evaluate.table": 4,
    "nsteer.evaluate.composition": 4,
    "nsteer.search": 4,
    "nsteer.jobs": 5,
    "nsteer.interop": 5,
    "nsteer.report": 5,
    "nsteer.terminal": 6,
    "nsteer.cli": 6,
    "nsteer": 6,
}
LAZY_NSTEER_IMPORTS_ALLOWED = {"nsteer.cli"}


@dataclass(frozen=True)
class Import:
    """One import of an nsteer module: who imports what, on which line, and whether inside a function."""

    source: str
    target: str
    line: int
    nested: bool

    def __str__(self) -> str:
        where = "inside a function" if self.nested else "at module level"
        return f"{self.source} imports {self.target} (line {self.line}, {where})"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nsteer_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, source: str, known: Mapping[str, object]) -> Iterator[Import]:
    """Every import of a known nsteer module in ``source``, wherever it is; ``nested`` when inside a function (an
    import under ``if TYPE_CHECKING:`` or ``try:`` at module level still counts as a module-level import)."""
    tree = ast.parse(source)
    in_function = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for inner in ast.walk(node)
    }
    package = name if name in known and (PACKAGE / "/".join(name.split(".")[1:]) / "__init__.py").exists() else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = (package or name.rsplit(".", 1)[0]).split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target in known:
                yield Import(name, target, node.lineno, id(node) in in_function)


def import_graph() -> list[Import]:
    modules = nsteer_modules()
    return [found for name, path in modules.items() for found in imports_of(name, path.read_text(), modules)]


def layering_problems(layers: Mapping[str, int], edges: list[Import], lazy_allowed: set[str]) -> list[str]:
    """Every violation: a module without a layer, an upward import, a lazy nsteer import, an import cycle."""
    modules = {edge.source for edge in edges} | {edge.target for edge in edges}
    problems = [
        f"{name} has no layer: add it to LAYERS in tests/test_layering.py" for name in sorted(modules - set(layers))
    ]
    for edge in edges:
        if edge.source == edge.target or edge.source not in layers or edge.target not in layers:
            continue
        if layers[edge.target] > layers[edge.source]:
            problems.append(
                f"upward import: {edge} — layer {layers[edge.source]} may not import layer {layers[edge.target]}"
            )
        if edge.nested and edge.source not in lazy_allowed:
            problems.append(f"lazy import of an nsteer module: {edge} — import it at module level")
    problems += [
        f"import cycle: {' -> '.join(path)} (modules that import each other: {', '.join(group)})"
        for group, path in cycles(edges)
    ]
    return problems


def cycles(edges: list[Import]) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected group of modules (Tarjan) with one shortest cycle through its first module."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        if edge.source != edge.target:
            graph.setdefault(edge.source, []).append(edge.target)
            graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for following in graph[node]:
            if following not in index:
                visit(following)
                low[node] = min(low[node], low[following])
            elif following in on_stack:
                low[node] = min(low[node], index[following])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(group, _path_through(group, graph)) for group in groups]


def _path_through(group: list[str], graph: Mapping[str, list[str]]) -> list[str]:
    """A closed walk inside ``group`` from its first module back to it (shortest, by breadth-first search)."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in graph[node]:
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target in members and target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    return group


def test_every_module_has_a_layer_and_imports_only_go_down():
    modules = nsteer_modules()
    missing = sorted(set(modules) - set(LAYERS))
    assert not missing, f"modules without a layer (add them to LAYERS): {missing}"
    stale = sorted(set(LAYERS) - set(modules))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"
    problems = layering_problems(LAYERS, import_graph(), LAZY_NSTEER_IMPORTS_ALLOWED)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_function_level_and_relative_imports():
    known = {"nsteer.a": 0, "nsteer.b": 1, "nsteer.c": 2}
    source = "import nsteer.b\n\ndef f():\n    from nsteer.c import thing\n    from . import b\n"
    found = list(imports_of("nsteer.a", source, known))
    assert [(edge.target, edge.line, edge.nested) for edge in found] == [
        ("nsteer.b", 1, False),
        ("nsteer.c", 4, True),
        ("nsteer.b", 5, True),
    ]
    assert any(
        edge.target == "nsteer.models" and edge.nested
        for edge in imports_of("nsteer.x", "def f():\n    from nsteer.models import open_model\n", {"nsteer.models": 1})
    )


def test_it_fails_on_the_old_cycle_through_remote():
    """The cycle this layering replaced: remote sat below the core (models and extract imported it inside functions)
    and above it (it imported extract, workflow, generate and vectors)."""
    old = [
        Import("nsteer.models", "nsteer.remote", 244, True),
        Import("nsteer.extract", "nsteer.remote", 96, True),
        Import("nsteer.extract", "nsteer.models", 15, False),
        Import("nsteer.remote", "nsteer.models", 36, False),
        Import("nsteer.remote", "nsteer.extract", 539, True),
        Import("nsteer.remote", "nsteer.workflow", 557, True),
        Import("nsteer.remote", "nsteer.generate", 578, True),
        Import("nsteer.workflow", "nsteer.extract", 15, False),
        Import("nsteer.generate", "nsteer.extract", 11, False),
        Import("nsteer.vectors", "nsteer.models", 18, False),
        Import("nsteer.recipe", "nsteer.models", 14, False),
    ]
    layers = {"nsteer.models": 1, "nsteer.remote": 1, "nsteer.extract": 2, "nsteer.generate": 2}
    layers |= {"nsteer.vectors": 2, "nsteer.workflow": 3, "nsteer.recipe": 3}
    problems = layering_problems(layers, old, set())
    text = "\n".join(problems)
    assert "upward import: nsteer.remote imports nsteer.extract (line 539, inside a function)" in text
    assert "upward import: nsteer.remote imports nsteer.workflow (line 557, inside a function)" in text
    assert "lazy import of an nsteer module: nsteer.models imports nsteer.remote (line 244" in text
    (cycle,) = [problem for problem in problems if problem.startswith("import cycle")]
    assert cycle.startswith("import cycle: nsteer.extract -> nsteer.remote -> nsteer.extract")
    assert "nsteer.remote" in cycle and "modules that import each other: nsteer.extract, nsteer.generate" in cycle
    assert "nsteer.models" in cycle and "nsteer.workflow" in cycle


def test_a_module_without_a_layer_is_named():
    problems = layering_problems({"nsteer.a": 0}, [Import("nsteer.a", "nsteer.new", 3, False)], set())
    assert problems == ["nsteer.new has no layer: add it to LAYERS in tests/test_layering.py"]


def test_importing_a_recipe_loads_neither_torch_nor_nnsight():
    """Reading and validating a recipe is cheap: it needs no tensor library (the embedded id is a constant)."""
    import subprocess
    import sys

    code = (
        "import sys, nsteer.recipe; print(sorted(m for m in ('torch', 'nnsight', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
