"""The house rules, read from the source (AST): ``runtime/`` never imports ``export/`` or ``benchmarks/``, and the
module-level imports of the project's packages form no cycle (a cycle works only as long as every import in it
stays deferred inside a function)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "benchmarks")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path], top_level_only: bool) -> set[str]:
    """First-party modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes `if`/`try` blocks, not function or class bodies
        nodes, stack = [], list(tree.body)
        while stack:
            n = stack.pop()
            nodes.append(n)
            if isinstance(n, (ast.If, ast.Try)):
                stack.extend(n.body + n.orelse + getattr(n, "finalbody", []) + [s for h in getattr(n, "handlers", []) for s in h.body])
    found = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            targets = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in n.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_runtime_never_imports_export_or_benchmarks():
    known = modules()
    bad = [(m, t) for m, p in known.items() if m.split(".")[0] == "runtime"
           for t in imports(m, p, known, top_level_only=False) if t.split(".")[0] in ("export", "benchmarks")]
    assert not bad, bad


def graph_of(known: dict[str, Path]) -> dict[str, set[str]]:
    graph = {m: imports(m, p, known, top_level_only=True) for m, p in known.items()}
    # a package's __init__ importing its own submodules is the normal package shape, not a cycle
    return {m: {t for t in ts if not (t.startswith(m + ".") and known[m].name == "__init__.py")} for m, ts in graph.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycle_at_module_level():
    cycles = find_cycles(graph_of(modules()))
    assert not cycles, cycles


def test_the_checker_sees_a_cycle(tmp_path):
    """The cycle check can fail: two modules importing each other at module level are found, a deferred
    import inside a function is not counted."""
    pkg = tmp_path / "runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from runtime import b\n")
    (pkg / "b.py").write_text("import runtime.a\n")
    (pkg / "c.py").write_text("def f():\n    from runtime import a\n")
    known = {"runtime": pkg / "__init__.py", "runtime.a": pkg / "a.py", "runtime.b": pkg / "b.py", "runtime.c": pkg / "c.py"}
    assert find_cycles(graph_of(known)) == [["runtime.a", "runtime.b", "runtime.a"]]
    assert imports("runtime.c", known["runtime.c"], known, top_level_only=False) == {"runtime", "runtime.a"}
    assert imports("runtime.c", known["runtime.c"], known, top_level_only=True) == set()
