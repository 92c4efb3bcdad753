#!/usr/bin/env python
"""The project's import graph: circles, upward imports, imports hidden in functions.

Reads every module of the project packages (manager, instances, lobby, bots; migrations
excluded) with `ast` — nothing is imported or run — and follows both module-level
imports and imports inside functions (those under `if TYPE_CHECKING:` are left out, they
never run). Prints:

- circles: groups of modules that import each other, directly or round a loop
  (strongly connected components of more than one module), with the edges inside;
- upward imports: a shared part of `manager/` importing an app (`instances`, `lobby`,
  `bots`); only the project's aggregation at the top may (see `AGGREGATION`);
- the number of project imports made inside functions (often a circle dodged).

    .venv/bin/python bench/imports.py            # the report
    .venv/bin/python bench/imports.py --edges    # also every edge, module by module

Exit status 0 always (it measures; tests decide what must hold).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("manager", "instances", "lobby", "bots")
APPS = ("instances", "lobby", "bots")

# The top of the project: modules of manager/ that put the apps together and so may
# import them. A prefix ending in "." covers a whole package. (manager.realtime.routing
# is not here: it builds the routes from what each app registers and imports no app.)
AGGREGATION = (
    "manager.urls",
    "manager.api.",
    "manager.asgi",
    "manager.dashboard.",
    "manager.management.commands.",
    "manager.settings",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(BASE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def collect_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((BASE_DIR / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            modules[module_name(path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """(node, inside_function) for each import statement that can run."""

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    yield from walk_one(sub, in_function)
                continue
            yield from walk_one(child, in_function)

    def walk_one(node, in_function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from walk(node, inner)

    yield from walk(tree, False)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` stands for: itself, or the longest known prefix."""
    while name:
        if name in modules:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def build_graph(modules: dict[str, Path]):
    """edges: {importer: {imported: [(line, in_function), ...]}}."""
    edges: dict[str, dict[str, list[tuple[int, bool]]]] = defaultdict(lambda: defaultdict(list))
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, in_function in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    if not is_package:
                        anchor = anchor[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from a import b` imports the submodule a.b when there is one
                targets = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is None or resolved == name:
                    continue
                if (node.lineno, in_function) not in edges[name][resolved]:
                    edges[name][resolved].append((node.lineno, in_function))
    return edges


def strongly_connected(nodes, edges) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one node, sorted."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges.get(succ, {})))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return sorted(result)


def is_aggregation(module: str) -> bool:
    return any(module == a or (a.endswith(".") and module.startswith(a)) for a in AGGREGATION)


def upward_imports(edges) -> list[tuple[str, str, list[int]]]:
    """(importer, imported app module, lines) — one entry per pair of modules."""
    found = []
    for importer, targets in edges.items():
        if importer.split(".")[0] != "manager" or is_aggregation(importer):
            continue
        for target, sites in targets.items():
            if target.split(".")[0] in APPS:
                found.append((importer, target, sorted(line for line, _ in sites)))
    return sorted(found)


def function_level_imports(edges) -> list[tuple[str, int]]:
    """(importer, line): one entry per import statement inside a function."""
    return sorted({
        (importer, line)
        for importer, targets in edges.items()
        for sites in targets.values()
        for line, in_function in sites
        if in_function
    })


def report(show_edges: bool = False) -> dict:
    modules = collect_modules()
    edges = build_graph(modules)
    circles = strongly_connected(sorted(modules), edges)
    upward = upward_imports(edges)
    hidden = function_level_imports(edges)

    print(f"{len(modules)} modules, {sum(len(t) for t in edges.values())} module→module edges")
    print(f"\nCircles: {len(circles)}")
    for component in circles:
        members = set(component)
        print(f"  - {len(component)} modules: {', '.join(component)}")
        for importer in component:
            for target in sorted(edges[importer]):
                if target in members:
                    kinds = {"function" if f else "module" for _, f in edges[importer][target]}
                    print(f"      {importer} → {target} ({'/'.join(sorted(kinds))})")
    print(f"\nUpward imports (manager shared part → app): {len(upward)}")
    for importer, target, lines in upward:
        print(f"  - {importer} → {target} (line {', '.join(map(str, lines))})")
    print(f"\nProject import statements inside functions: {len(hidden)}")
    by_module = defaultdict(int)
    for importer, _ in hidden:
        by_module[importer] += 1
    for importer, count in sorted(by_module.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:3d}  {importer}")
    if show_edges:
        print("\nEdges:")
        for importer in sorted(edges):
            for target in sorted(edges[importer]):
                kinds = {"function" if f else "module" for _, f in edges[importer][target]}
                print(f"  {importer} → {target} ({'/'.join(sorted(kinds))})")
    return {"circles": circles, "upward": upward, "function_level": hidden, "edges": edges}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="also print every edge")
    args = parser.parse_args(argv)
    report(show_edges=args.edges)
    return 0


if __name__ == "__main__":
    sys.exit(main())
