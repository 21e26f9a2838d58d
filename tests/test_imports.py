"""The package's structure: imports run one way (no module imports one that imports it back, counting imports
inside functions and under TYPE_CHECKING) and no module but the CLI grows past 600 lines."""

import ast
from pathlib import Path

import frugalnlp

PACKAGE = Path(frugalnlp.__file__).parent
MAX_LINES = 600
LONGER_ALLOWED = {"frugalnlp.cli"}  # its parsers are declarative: one block per subcommand


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its text. ``from a.b import c`` names ``a.b.c`` if
    that is a module, else ``a.b``; importing ``a.b.c`` also runs ``a/b/__init__.py`` first, so the packages above
    the imported module count too, except those above the importer (they are running already)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in known else base)
        edges = set()
        for target in targets:
            if target not in known:
                continue
            edges |= {target} | {p for p in ancestors(target) if p in known and p not in ancestors(name)}
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{a} -> {', '.join(sorted(graph[a] & set(c)))}" for a in c)
              for c in found]
    assert not found, "import circles:\n" + "\n".join(detail)


def test_the_walker_sees_function_level_type_checking_and_package_imports(tmp_path, monkeypatch):
    """The checker itself: each kind of import that makes a circle is found."""
    root = tmp_path / "frugalnlp"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from frugalnlp.sub.inner import X\n")
    (root / "sub" / "inner.py").write_text("X = 1\n")
    (root / "a.py").write_text("def f():\n    from frugalnlp import b\n")
    (root / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from frugalnlp.a import f\n")
    (root / "c.py").write_text("from frugalnlp.sub.inner import X\n")  # runs sub/__init__.py, which imports nothing back
    (root / "sub" / "user.py").write_text("import frugalnlp.c\n")
    (root / "d.py").write_text("from frugalnlp.sub.user import *\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", root)
    graph = import_graph()
    assert graph["frugalnlp.a"] == {"frugalnlp.b"} and graph["frugalnlp.b"] == {"frugalnlp.a"}
    assert graph["frugalnlp.c"] == {"frugalnlp.sub", "frugalnlp.sub.inner"}
    assert graph["frugalnlp.sub.user"] == {"frugalnlp.c"}  # its own package is running already
    assert circles(graph) == [["frugalnlp.a", "frugalnlp.b"]]
    (root / "sub" / "__init__.py").write_text("from frugalnlp.sub.user import *\n")
    assert ["frugalnlp.c", "frugalnlp.sub", "frugalnlp.sub.user"] in circles(import_graph())


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONGER_ALLOWED}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
