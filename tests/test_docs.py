"""The documentation's view of the package stays true to the code (the site itself is built
by ``.ci/run`` with ``mkdocs build --strict``)."""

from __future__ import annotations

import ast
from pathlib import Path

import parnet

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "src" / "parnet" / "__init__.py"


def _type_checking_imports() -> dict[str, str]:
    """``{name: module}`` of the imports under ``if TYPE_CHECKING:`` in ``parnet/__init__.py``."""
    out: dict[str, str] = {}
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
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
        "parnet/__init__.py: give every _LAZY name the same import under `if TYPE_CHECKING:`")


def test_api_reference_covers_every_public_name() -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in parnet.__all__ if f"::: parnet.{n}\n" not in page]
    assert not missing, f"docs/api.md has no entry for {missing}: add `::: parnet.NAME` lines"


def test_every_public_name_has_a_docstring() -> None:
    bare = [n for n in parnet.__all__ if not (getattr(parnet, n).__doc__ or "").strip()]
    assert not bare
