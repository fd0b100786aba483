"""The import graph of the packages: entry points on top, library code under them, `models` and
`pipelines` at the bottom, and no cycle anywhere, counting imports inside functions too (an import
moved into a function to dodge a cycle is still a cycle)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "pipelines", "models", "profiles")
# Imports inside functions that exist for a reason other than a cycle: a loader module is imported
# only when chosen, so a machine without DALI still runs the others.
LAZY = {("pipelines.registry", f"pipelines.{m}") for m in ("dali", "torch_loader", "torchvision_loader",
                                                           "dali_folder", "torch_folder", "torchvision_folder")}
ENTRY_POINTS = {"bench.run", "bench.loaders", "bench.evaluate", "bench.compare", "bench.pretext", "bench.make_folder",
                "bench.suite.cli",
                "bench.suite.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(first-party module imported, whether the import is inside a function)."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports pkg.mod when that is a module, else pkg itself
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found += [(name, id(node) in nested) for name in names if name in known]
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges: dict[str, set[str]] = {}
    for name, path in found.items():
        edges[name] = set()
        for target, inside in imports(path, known):
            if target == name:
                continue
            edges[name].add(target)
            # importing a.b.c also runs the __init__ of a and a.b
            parents = target.split(".")
            edges[name].update(".".join(parents[:i]) for i in range(1, len(parents)) if ".".join(parents[:i]) in known
                               and not name.startswith(".".join(parents[:i])))
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None
    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_no_import_inside_a_function_but_the_optional_loaders():
    known = set(modules())
    inside = sorted((name, target) for name, path in modules().items()
                    for target, nested in imports(path, known) if nested and (name, target) not in LAZY)
    assert inside == []


def test_layers_point_one_way():
    edges = graph()
    for name, targets in edges.items():
        top = name.split(".")[0]
        if top in ("models", "pipelines"):  # the bottom layers know nothing of the harness
            assert not any(t.startswith("bench") for t in targets), (name, targets)
        if top == "models":
            assert not any(t.startswith("pipelines") for t in targets), (name, targets)
        # nothing imports an entry point
        assert not targets & (ENTRY_POINTS - {name}) or name.startswith("bench.suite"), (name, targets & ENTRY_POINTS)


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycle(edges) == ["a", "b", "c", "a"]
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from bench.run import main\n")
    assert imports(source, {"bench.run"}) == [("bench.run", True)]
