"""The layering rules of ARCHITECTURE.md, checked on the source with ``ast`` (nothing is imported).

- The pure layers stay pure: no sockets, TLS or threads under ``wire/``, in ``auth/srp.py``,
  ``auth/pairkeys.py`` and ``auth/sb64.py``, following imports of other parnet modules so that
  a pure module cannot reach ``socket`` through, say, ``parnet.transport.link``.
- No import cycle anywhere in ``src/parnet``, counting imports inside functions.
- ``client`` and ``server`` never import each other.
- No module imports another module's ``_private`` names.

Imports under ``if TYPE_CHECKING:`` do not run and are ignored. Package ``__init__`` files
are not followed by the purity check (``parnet/__init__.py`` re-exports everything), and the
implicit import of a module's parent packages is not counted as an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "parnet"
FORBIDDEN = {"socket", "ssl", "threading"}


def pure_modules() -> list[Path]:
    paths = sorted((PKG / "wire").glob("*.py"))
    paths += [PKG / "auth" / "srp.py", PKG / "auth" / "pairkeys.py", PKG / "auth" / "sb64.py"]
    return paths


def module_path(name: str) -> Path | None:
    """The source file of parnet module ``name`` (a dotted name), or None if not parnet's."""
    parts = name.split(".")
    if parts[0] != "parnet":
        return None
    base = SRC.joinpath(*parts)
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports at run time."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # "from . import x" / "from pkg import sub" may name submodules
            found.update(
                f"{mod}.{alias.name}" for alias in node.names if module_path(f"{mod}.{alias.name}")
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def forbidden_reach(path: Path) -> list[str]:
    """Chains like ``parnet.wire.x -> parnet.link -> socket`` from ``path`` to a forbidden module."""
    chains = []
    seen: set[Path] = set()
    todo = [(path, [module_name(path)])]
    while todo:
        p, chain = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for name in sorted(imports(p)):
            if name.split(".")[0] in FORBIDDEN:
                chains.append(" -> ".join([*chain, name]))
            sub = module_path(name)
            # package __init__ files (parnet/__init__.py re-exports the whole API) are not
            # followed: the pure modules in this list are checked themselves
            if sub is not None and sub.name != "__init__.py":
                todo.append((sub, [*chain, name]))
    return chains


@pytest.mark.parametrize("path", pure_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_pure_module_uses_no_sockets_tls_or_threads(path: Path) -> None:
    assert path.exists(), f"{path.relative_to(SRC)} is listed as pure but does not exist"
    assert forbidden_reach(path) == []


def test_the_checker_sees_forbidden_imports() -> None:
    """The check itself works: link.py, which must use sockets, is caught."""
    chains = forbidden_reach(PKG / "transport" / "link.py")
    assert {c.rsplit(" -> ", 1)[1] for c in chains} >= {"socket", "ssl", "threading"}


def all_modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
    """parnet module -> the parnet modules it imports explicitly (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for path in all_modules():
        deps = set()
        for name in imports(path):
            sub = module_path(name)
            if sub is not None:
                deps.add(module_name(sub))
        deps.discard(module_name(path))
        graph[module_name(path)] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of module names, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(("side", "other"), [("client", "server"), ("server", "client")])
def test_client_and_server_never_import_each_other(side: str, other: str) -> None:
    graph = import_graph()
    bad = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith(f"parnet.{side}")
        for d in deps
        if d.startswith(f"parnet.{other}")
    )
    assert bad == []


def test_no_module_imports_private_names_of_another() -> None:
    bad = []
    for path in all_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("parnet")
            ):
                bad += [
                    f"{module_name(path)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert bad == []


#: ``_private`` attributes of the standard library (and of namedtuples) that may be used.
STDLIB_PRIVATE = {
    "_getframe",
    "_exit",
    "_replace",
    "_asdict",
    "_fields",
    "_make",
    "_current_frames",
}


def defined_private_names(tree: ast.AST) -> set[str]:
    """``_private`` names a module defines itself: functions, classes, assigned names and
    attributes, ``__slots__`` entries."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for tgt in targets:
                for sub in ast.walk(tgt):
                    if isinstance(sub, ast.Name):
                        names.add(sub.id)
                    elif isinstance(sub, ast.Attribute):
                        names.add(sub.attr)
            if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets) and node.value:
                names.update(
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
    return {n for n in names if n.startswith("_")}


def private_reaches(source: str, name: str) -> list[str]:
    """``x._name`` in module ``name`` (its ``source``) where ``x`` is not ``self``/``cls`` and
    ``_name`` is not defined in that module: a reach into another module's private members."""
    tree = ast.parse(source, filename=name)
    own = defined_private_names(tree) | STDLIB_PRIVATE
    bad = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in own
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            bad.append(f"{name}:{node.lineno}: .{node.attr}")
    return bad


def test_no_module_reaches_private_members_of_another() -> None:
    bad = [
        b for path in all_modules() for b in private_reaches(path.read_text(), module_name(path))
    ]
    assert bad == []


def test_the_private_member_check_sees_reaches() -> None:
    src = (
        "import sys\n\nclass A:\n    def f(self, other):\n        self._x = other._x\n\n"
        "def g(link):\n    return link._sock, sys._getframe, A()._x\n"
    )
    assert private_reaches(src, "probe") == ["probe:8: ._sock"]
