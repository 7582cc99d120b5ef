"""The house rules of the code base, checked on the source: import direction, no cycles, file size."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_loop", "policy", "reward")
# A guard against files that grew several jobs, not a size to split cohesive modules at: one thing may take 600
# lines (the report: read the run, draw its figures, write the page).
MAX_LINES = 700


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


# The rooms of rlhf_loop and which rooms each may import from (besides itself, `policy` and `reward`). Read
# bottom-up: common is the shared leaves; the run directory and the toy task build on it; the config composes the
# roles' configs; the driver runs the stages; the cluster places them as actors; loop.py is the algorithm; the
# front end is what a person types.
ROOM_IMPORTS = {
    "common": set(),
    "rundir": {"common"},
    "toy": {"common"},
    "config": {"common", "toy"},
    "driver": {"common", "rundir", "config"},
    "cluster": {"common", "rundir", "config", "driver"},
    "loop": {"common", "rundir", "config", "driver", "cluster"},
    "frontend": {"common", "rundir", "toy", "config", "driver", "cluster", "loop"},
}


def room_of(module: str) -> str:
    """rlhf_loop.driver.stages -> driver; rlhf_loop.loop -> loop; rlhf_loop.config -> config."""
    return module.split(".")[1]


def test_every_module_of_rlhf_loop_is_in_a_room():
    assert sorted({room_of(name) for name in import_graph() if name.startswith("rlhf_loop.")}) == sorted(ROOM_IMPORTS)


def test_rooms_import_only_the_rooms_below_them():
    wrong = sorted(f"{name} -> {target}" for name, targets in import_graph().items() if name.startswith("rlhf_loop.")
                   for target in targets if target.startswith("rlhf_loop.")
                   and room_of(target) != room_of(name) and room_of(target) not in ROOM_IMPORTS[room_of(name)])
    assert wrong == []


def test_a_wrong_room_import_would_be_found():
    assert "driver" not in ROOM_IMPORTS["rundir"] and "frontend" not in ROOM_IMPORTS["loop"]


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "policy.learner_group" in graph["rlhf_loop.driver.stages"]  # imported inside sft_warm_start()
    assert {"rlhf_loop.common.records", "rlhf_loop.common.errors"} <= leaf_modules(graph)
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


def test_policy_and_reward_import_only_the_common_room():
    """The roles reuse the shared leaves (errors, records, files, ...) and nothing of the driver above them."""
    wrong = sorted(f"{name} -> {target}" for name, targets in import_graph().items()
                   if name.startswith(("policy.", "reward.")) for target in targets
                   if target.startswith("rlhf_loop.") and room_of(target) != "common")
    assert wrong == []


def test_no_source_file_is_over_the_limit():
    sources = [*our_modules().values(), *(REPO / "scripts").glob("*.py")]
    long = sorted(f"{path.relative_to(REPO)}: {len(path.read_text().splitlines())}" for path in sources
                  if len(path.read_text().splitlines()) > MAX_LINES)
    assert long == []
