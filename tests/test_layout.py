"""The package's shape, checked: no import cycles (lazy and type-only imports included), distributors import no
stage, only the CLI parses argv and nothing imports it, stages reach each other only through the allowed seams."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pipeline"
STAGES = {"download", "embed", "index", "dedup", "query"}
# What a stage may import of another: the read side of the output it consumes.
SEAMS = {
    "pipeline.download.layout",  # img2dataset's folder, read by embed planning
    "pipeline.embeddings",  # the embed output, read by index, dedup, query, report
    "pipeline.index.store",  # the index output, read by query
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """module -> pipeline modules it imports, anywhere in the file (top level, in functions, under TYPE_CHECKING)."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from pkg import module` imports the module; `from module import name` the module itself
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            for t in targets:
                if t in mods and t != name:
                    graph[name].add(t)
        graph.setdefault(name, set())
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles_between_modules() -> None:
    graph = imports()
    # A package's __init__ importing its own submodules is how registries work; every other edge counts.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert cycles == []


def test_distributors_import_no_stage() -> None:
    graph = imports()
    bad = {
        m: sorted(t for t in deps if package_of(t) in STAGES | {"embeddings", "run", "report", "cli"})
        for m, deps in graph.items()
        if package_of(m) == "distribute"
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_stages_meet_only_at_the_seams() -> None:
    graph = imports()
    crossings = sorted(
        (m, t)
        for m, deps in graph.items()
        for t in deps
        if package_of(m) in STAGES
        and package_of(t) in STAGES
        and package_of(t) != package_of(m)
        and not any(t == s or t.startswith(s + ".") for s in SEAMS)
    )
    assert crossings == []


def test_nothing_imports_the_cli_and_only_the_cli_parses_argv() -> None:
    graph = imports()
    importers = sorted(
        m for m, deps in graph.items() for t in deps if package_of(t) == "cli" and package_of(m) != "cli"
    )
    assert importers == []
    parsers = sorted(
        module_name(p) for p in PKG.rglob("*.py") if "argparse" in p.read_text() and package_of(module_name(p)) != "cli"
    )
    assert parsers == []
