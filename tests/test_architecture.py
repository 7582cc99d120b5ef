"""The house rules of the code base, checked on the source: import direction, no cycles, file size."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_loop", "policy", "reward")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that `path` imports, at the top or inside a function (a lazy import is still an edge)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` names a module; `from module import name` names the module itself.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found - {module_name(path)} - set(PACKAGES)


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def leaf_modules(graph: dict[str, set[str]]) -> set[str]:
    """Modules of rlhf_loop that import nothing of ours but other leaves (records, errors, seeds, ...)."""
    leaves: set[str] = set()
    while True:
        grown = {name for name, targets in graph.items()
                 if name.startswith("rlhf_loop.") and targets <= leaves} | leaves
        if grown == leaves:
            return leaves
        leaves = grown


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "policy.learner_group" in graph["rlhf_loop.stages"]  # imported inside sft_warm_start()
    assert {"rlhf_loop.records", "rlhf_loop.errors"} <= leaf_modules(graph)
    assert "rlhf_loop.config" not in leaf_modules(graph)


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_a_cycle_would_be_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_policy_and_reward_import_only_leaf_modules_of_the_driver():
    graph = import_graph()
    leaves = leaf_modules(graph)
    wrong = sorted(f"{name} -> {target}" for name, targets in graph.items()
                   if name.startswith(("policy.", "reward.")) for target in targets
                   if target.startswith("rlhf_loop.") and target not in leaves)
    assert wrong == []


def test_no_source_file_is_over_the_limit():
    sources = [*our_modules().values(), *(REPO / "scripts").glob("*.py")]
    long = sorted(f"{path.relative_to(REPO)}: {len(path.read_text().splitlines())}" for path in sources
                  if len(path.read_text().splitlines()) > MAX_LINES)
    assert long == []
