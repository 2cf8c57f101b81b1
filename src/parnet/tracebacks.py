"""Remote tracebacks as the user wants to read them.

At a server (``format_remote``): parnet's own frames are left out, and frames of code that
came from the client (functions sent by value, see ``wire.serialize``) are shown without a
source line, since the server's file of that name, if any, is not the client's. At the
client (``fill_source``): every frame shown without a source line gets it from the client's
own files and ``linecache`` (so functions defined in a script or a notebook cell show theirs).
A failure that happened in parnet's machinery alone (a ``SyntaxError`` in ``reval``) shows
only the exception: the user's line and caret.
"""

from __future__ import annotations

import linecache
import os
import re
import traceback
from types import TracebackType
from typing import Any

from .wire.serialize import is_client_code

_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep
_FRAME_LINE = re.compile(r'^(\s*)File "(.+)", line (\d+), in .*$')


def _own(filename: str) -> bool:
    return filename.startswith(_OWN)


def _frames(stack: traceback.StackSummary, tb: TracebackType | None) -> traceback.StackSummary:
    codes = [f.f_code for f, _ in traceback.walk_tb(tb)]
    if len(codes) != len(stack):
        codes = [None] * len(stack)  # type: ignore[list-item]
    out = []
    for fs, code in zip(stack, codes, strict=True):
        if _own(fs.filename):
            continue
        if code is not None and is_client_code(code):
            fs = traceback.FrameSummary(
                fs.filename,
                fs.lineno,
                fs.name,
                lookup_line=False,
                line="",
                end_lineno=fs.end_lineno,
                colno=fs.colno,
                end_colno=fs.end_colno,
            )
        out.append(fs)
    return traceback.StackSummary.from_list(out)


def format_remote(e: BaseException, tb: TracebackType | None = None, limit: int = 64 * 1024) -> str:
    """The traceback text of ``e`` (from ``tb``, default its own) as a server reports it."""
    te = traceback.TracebackException(
        type(e), e, tb if tb is not None else e.__traceback__, lookup_lines=False
    )
    seen: set[int] = set()

    def fix(t: Any, exc: BaseException | None, tb_: TracebackType | None) -> None:
        if t is None or exc is None or id(t) in seen:
            return
        seen.add(id(t))
        t.stack = _frames(t.stack, tb_)
        fix(t.__cause__, exc.__cause__, getattr(exc.__cause__, "__traceback__", None))
        fix(t.__context__, exc.__context__, getattr(exc.__context__, "__traceback__", None))
        for sub_t, sub_e in zip(
            getattr(t, "exceptions", None) or (), getattr(exc, "exceptions", ()), strict=False
        ):
            fix(sub_t, sub_e, sub_e.__traceback__)

    try:
        fix(te, e, tb if tb is not None else e.__traceback__)
        text = "".join(te.format())
    except Exception:  # noqa: BLE001 - never lose the report over its formatting
        text = "".join(traceback.format_exception(type(e), e, tb))
    return text[-limit:]


def fill_source(text: str) -> str:
    """``text`` with the source line added under every frame that has none, from this
    process's files and ``linecache`` (the client's view of code it sent)."""
    if not text:
        return text
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    for i, ln in enumerate(lines):
        out.append(ln)
        m = _FRAME_LINE.match(ln.rstrip("\n"))
        if m is None:
            continue
        indent = m.group(1)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if nxt.startswith(indent + "  ") and not _FRAME_LINE.match(nxt.rstrip("\n")):
            continue  # the server showed a line already
        src = linecache.getline(m.group(2), int(m.group(3))).strip()
        if src:
            out.append(f"{indent}  {src}\n")
    return "".join(out)
