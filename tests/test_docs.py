"""The documentation's view of the package stays true to the code (the site itself is built
by ``.ci/run`` with ``mkdocs build --strict``)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import parnet

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "src" / "parnet" / "__init__.py"


def _type_checking_imports() -> dict[str, str]:
    """``{name: module}`` of the imports under ``if TYPE_CHECKING:`` in ``parnet/__init__.py``."""
    out: dict[str, str] = {}
    for node in ast.parse(INIT.read_text()).body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        ):
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1
                for alias in imp.names:
                    out[alias.asname or alias.name] = f"parnet.{imp.module}"
    return out


def test_lazy_names_are_visible_to_static_tools() -> None:
    """mkdocstrings (and type checkers) read ``__init__.py`` without running it: each lazily
    imported public name needs the same import under ``TYPE_CHECKING``."""
    lazy = {name: mod for name, (mod, _) in parnet._LAZY.items()}
    assert _type_checking_imports() == lazy, (
        "parnet/__init__.py: give every _LAZY name the same import under `if TYPE_CHECKING:`"
    )


def test_api_reference_covers_every_public_name() -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in parnet.__all__ if f"::: parnet.{n}\n" not in page]
    assert not missing, f"docs/api.md has no entry for {missing}: add `::: parnet.NAME` lines"


def test_every_public_name_has_a_docstring() -> None:
    bare = [n for n in parnet.__all__ if not (getattr(parnet, n).__doc__ or "").strip()]
    assert not bare


def _documented_args(doc: str) -> list[str]:
    """The names of a Google-style ``Args:`` section (entries at the section's indentation)."""
    names: list[str] = []
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "Args:":
            continue
        indent = None
        for entry in lines[i + 1 :]:
            if not entry.strip():
                break
            width = len(entry) - len(entry.lstrip())
            if indent is None:
                indent = width
            if width < indent:
                break
            if width == indent:
                names.append(entry.strip().split(":", 1)[0])
    return names


def _public_callables() -> list[tuple[str, object]]:
    out = []
    for name in parnet.__all__:
        obj = getattr(parnet, name)
        if inspect.isclass(obj):
            if "__init__" in vars(obj) and inspect.isfunction(obj.__init__):
                out.append((name, obj))  # the class docstring's Args are __init__'s
            out += [
                (f"{name}.{m}", f)
                for m, f in vars(obj).items()
                if inspect.isfunction(f) and (not m.startswith("_") or m == "__init__")
            ]
        elif callable(obj):
            out.append((name, obj))
    return out


def test_docstring_args_name_real_parameters() -> None:
    """``mkdocs build --strict`` (CI) fails on an ``Args:`` entry that is not one parameter of
    the signature, such as ``a, b: ...``; this finds them without building the site."""
    bad = []
    for name, fn in _public_callables():
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
        for arg in _documented_args(fn.__doc__ and inspect.cleandoc(fn.__doc__) or ""):
            if arg.lstrip("*") not in params:
                bad.append(f"{name}: {arg!r}")
    assert not bad, (
        "Args entries that are not one parameter each (write one line per name): " + ", ".join(bad)
    )
