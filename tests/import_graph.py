"""The import graph of kvjax, models and pallas_kernels, read from the source with `ast`.

Run `python tests/import_graph.py` for the report: modules, top-level import edges, circles
(strongly connected components of the top-level graph, per module and per package) and upward
imports. An upward import is a lazy import (inside a function) of a module that imports the
importer back, directly or through others: a dependency that runs against the layering and
would be a circle if it were written at the top. Imports under `if TYPE_CHECKING:` are left
out (they never run).
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pallas_kernels", "kvjax", "models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, known: dict) -> str | None:
    """The longest known module that `name` (a.b.c, possibly an attribute) lives in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node, module: str, is_pkg: bool, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = module if is_pkg else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                parent = parent.rpartition(".")[0]
            base = f"{parent}.{base}" if base else parent
        names = [f"{base}.{a.name}" for a in node.names] or [base]
    out = {_resolve(n, known) for n in names}
    return sorted(t for t in out if t and t != module)


def edges(known: dict) -> tuple[set, set]:
    """(top-level edges, lazy edges) as (importer, imported) module pairs."""
    top, lazy = set(), set()
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
        typing_only = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If)
                       and ast.unparse(i.test).endswith("TYPE_CHECKING") for n in ast.walk(i)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                bucket = lazy if id(node) in inner else top
                bucket.update((mod, t) for t in _targets(node, mod, is_pkg, known))
    return top, lazy - top


def _reach(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def circles(edge_set) -> list[list[str]]:
    """Strongly connected components with more than one node."""
    graph = {}
    for a, b in edge_set:
        graph.setdefault(a, set()).add(b)
    nodes = sorted({n for e in edge_set for n in e})
    reach = {n: _reach(graph, n) for n in nodes}
    comps, done = [], set()
    for n in nodes:
        if n in done:
            continue
        comp = sorted({n} | {m for m in reach[n] if n in reach[m]})
        done.update(comp)
        if len(comp) > 1:
            comps.append(comp)
    return comps


def package_of(mod: str, known: dict) -> str:
    """The node of the package graph: a subpackage as one node (kvjax.presses.snapkv ->
    kvjax.presses), a top-level module as itself (kvjax.loops)."""
    parts = mod.split(".")
    if len(parts) > 2 or (len(parts) == 2 and known[mod].name == "__init__.py"):
        return ".".join(parts[:2])
    return mod


def upward(module_edges, node=lambda m: m) -> list[tuple[str, str]]:
    """Imports whose target imports the importer back, through any imports (lazy ones
    included), with modules grouped into nodes by `node`."""
    graph = {}
    for a, b in module_edges:
        if node(a) != node(b):
            graph.setdefault(node(a), set()).add(node(b))
    return sorted((a, b) for a, b in module_edges
                  if node(a) != node(b) and node(a) in _reach(graph, node(b)))


def report() -> dict:
    """Module circles count top-level imports (Python's own constraint); package circles
    count lazy imports too, with a subpackage as one node and a package's __init__ (which
    only re-exports) left out."""
    known = modules()
    top, lazy = edges(known)
    inits = {m for m, p in known.items() if p.name == "__init__.py"}
    pkg_edges = {(package_of(a, known), package_of(b, known)) for a, b in top | lazy
                 if a not in inits}
    pkg_edges = {(a, b) for a, b in pkg_edges if a != b}
    grouped = {e for e in top | lazy if e[0] not in inits}
    return dict(modules=len(known), top_edges=len(top), lazy_edges=len(lazy),
                module_circles=circles(top), package_circles=circles(pkg_edges),
                upward=upward(top | lazy),
                package_upward=upward(grouped, lambda m: package_of(m, known)))


if __name__ == "__main__":
    r = report()
    print(f"modules {r['modules']}, top-level imports {r['top_edges']}, lazy imports "
          f"{r['lazy_edges']}")
    print(f"module circles: {r['module_circles'] or 'none'}")
    print(f"package circles: {r['package_circles'] or 'none'}")
    for key in ("upward", "package_upward"):
        print(f"{key} imports ({len(r[key])}):")
        for a, b in r[key]:
            print(f"  {a} -> {b}")
    sys.exit(0)
