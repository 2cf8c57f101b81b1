"""Message codes: one table, read top to bottom like a protocol description.

Frames whose code is below ``FIRST_PICKLED`` carry raw bytes and are the only ones a link
accepts before authentication; all others carry a pickled payload (``serialize``).

Command link (client <-> worker), after authentication; the payload classes below are
pickled as they are (``encode``/``decode``, which checks that a frame carries its code's
class; on the wire each is a plain tuple)::

    client -> worker  SETUP        Setup
    worker -> client  READY        Ready                or SETUP_FAILED  SetupFailed
    client -> worker  REVAL        code string (a str: the cached frame of the hot path)
    client -> worker  CALL         Call
    worker -> client  RESULT       Result (of a CALL that asked for the reply here)
    client -> worker  INSTALL      Install (values, or the parent that relays them)
    client -> worker  SET          SetOption
    client -> worker  MAP          MapStart | MapJobs | MapCancel | MapEnd
    worker -> client  MAP_RESULT   MapResult
    worker -> client  ERROR        ErrorReport (-> RemoteError at the client)
    client -> worker  CLOSE        (no body)
    worker -> client  OUTPUT       raw bytes printed on the server (stdout, stderr, logging)
    client -> worker  INTERRUPT    (Ctrl-C at the client); worker -> client INTERRUPT when done
    worker -> client  SHUTDOWN     Shutdown (the server is stopping)
    any -> any        PING         heartbeat (dropped by the receiving decoder)
Data link (any node <-> any node)::

    VALUE    one psend value (body + out-of-band buffers)
    NOTICE   worker -> client: u64 count of ERROR/OUTPUT/SHUTDOWN frames sent so far on
             the command link (dropped by the decoder; lets a client wait on the data link
             alone: it looks at the command link when the count is ahead of what it read)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ProtocolError, RemoteError, remote_message
from ..errors import remote_error as typed_remote_error
from ..tracebacks import format_remote
from . import serialize

# raw (pre-authentication) frames
AUTH = 1  # SRP or data-link tag exchange message (raw bytes)
AUTH_FAIL = 2  # short UTF-8 reason; the link closes after it

FIRST_PICKLED = 10
SETUP = 10
READY = 11
SETUP_FAILED = 12
REVAL = 13
CALL = 14
RESULT = 15
INSTALL = 16
SET = 17
MAP = 18
MAP_RESULT = 19
ERROR = 20
CLOSE = 21
OUTPUT = 22
PING = 23
INTERRUPT = 25  # client -> worker: interrupt; worker -> client: done
SHUTDOWN = 26  # worker -> client: the server is shutting down (text)
NOTICE = 27  # worker -> client, data link: command-link frames announced so far (u64)
VALUE = 30

NAMES = {
    v: k
    for k, v in dict(globals()).items()
    if k.isupper() and isinstance(v, int) and k != "FIRST_PICKLED"
}

#: Longest text (message, traceback) and pickled exception kept in an error report.
MAX_REPORT = 64 * 1024


# -- payloads ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """SETUP: what a worker needs to join the network (client -> worker)."""

    node: int
    hosts: list[str]
    data_addrs: list[tuple[str, int]]
    cwd: str
    keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    nlocaljobs: int = 0
    timeout: float = 30.0
    forward_output: bool = True
    heartbeat: float = 10.0
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ready:
    """READY: the worker's links to every node are up (worker -> client)."""

    nproc: int
    pid: int
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SetupFailed:
    """SETUP_FAILED: why the worker could not join (worker -> client)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Call:
    """CALL: ``rfeval`` (client -> worker). The result comes back as a RESULT frame when
    ``reply_on_cmd``, else as a value on the data link."""

    req: int
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    nout: int | None = None
    isout: list[bool] | None = None
    reply_on_cmd: bool = True


@dataclass(frozen=True, slots=True)
class Result:
    """RESULT: the value of CALL ``req`` (worker -> client)."""

    req: int
    value: Any


@dataclass(frozen=True, slots=True)
class Install:
    """INSTALL: ``install_vars`` (client -> worker). ``values`` come with the frame, or
    (None) from node ``parent`` over the data link; either way they go on to ``children``."""

    values: dict[str, Any] | None = None
    parent: int = 0
    children: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SetOption:
    """SET: ``network_set`` (client -> worker)."""

    key: str
    value: Any


@dataclass(frozen=True, slots=True)
class MapStart:
    """MAP: a network map begins; ``spec`` is what every job of it shares."""

    map_id: int
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MapJobs:
    """MAP: a batch of jobs, each ``(j0, j1, start, column slices)``."""

    map_id: int
    items: list[tuple[int, int, int, list[Any]]]


@dataclass(frozen=True, slots=True)
class MapCancel:
    """MAP: drop the queued jobs of a map (it failed or was interrupted at the client)."""

    map_id: int


@dataclass(frozen=True, slots=True)
class MapEnd:
    """MAP: the map is over at the client; forget it."""

    map_id: int


@dataclass(frozen=True, slots=True)
class MapResult:
    """MAP_RESULT: results of jobs, each ``((j0, j1), ChunkResult, seconds)``; none: the
    map's first job on this server is slow (so the client spreads the map further)."""

    map_id: int
    results: list[tuple[tuple[int, int], Any, float]]


@dataclass(frozen=True, slots=True)
class Shutdown:
    """SHUTDOWN: the server is stopping (worker -> client)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """ERROR: a command failed on a worker (worker -> client).

    Attributes:
        type: qualified name of the exception type.
        message: ``str()`` of the exception (``errors.remote_message``: a missing module
            says where it must be).
        traceback: the formatted traceback where it ran.
        pickled: the pickled exception when it survives a round trip, else None.
        req: the CALL it answers, if any.
        interrupted: it was the client's Ctrl-C (``KeyboardInterrupt``).
    """

    type: str
    message: str
    traceback: str = ""
    pickled: bytes | None = field(default=None, repr=False)
    req: int | None = None
    interrupted: bool = False

    @classmethod
    def from_exception(cls, e: BaseException, skip: int = 0, req: int | None = None) -> ErrorReport:
        """The report of ``e``, leaving out the first ``skip`` traceback entries (the
        machinery's own frames); the exception itself goes along if it travels."""
        pickled = None
        try:
            body, bufs, _ = serialize.dumps(e)
            if not bufs and len(body) <= MAX_REPORT:
                serialize.loads(body)
                pickled = body
        except Exception:  # noqa: BLE001 - the text is enough
            pickled = None
        return cls(
            type_name(type(e)),
            remote_message(e)[:MAX_REPORT],
            format_traceback(e, skip),
            pickled,
            req,
            isinstance(e, KeyboardInterrupt),
        )

    def original(self) -> BaseException | None:
        """The remote exception object, if it came along and unpickles here."""
        if self.pickled is None:
            return None
        try:
            e = serialize.loads(self.pickled)
        except Exception:  # noqa: BLE001 - the text report stands alone
            return None
        return e if isinstance(e, BaseException) else None

    def to_remote_error(self, host: str, node: int, more: int = 0) -> RemoteError:
        """The ``RemoteError`` the client raises for this report."""
        return remote_error(
            host, node, self.type, self.message, self.traceback, self.original(), more
        )


def remote_error(
    host: str,
    node: int,
    exc_type: str,
    message: str,
    tb: str = "",
    original: BaseException | None = None,
    more: int = 0,
    *,
    index: int | None = None,
) -> RemoteError:
    """The one place a ``RemoteError`` is built (``errors.remote_error``: a ``RemoteError[T]``
    where it can be), chained to the original when there is one."""
    err = typed_remote_error(host, node, exc_type, message, tb, original, more)
    if original is not None:
        err.__cause__ = original
    if index is not None:
        err.index = index
    return err


def type_name(t: type) -> str:
    """An exception type's name as reports show it (qualified unless builtin or __main__)."""
    return (
        t.__qualname__
        if t.__module__ in ("builtins", "__main__")
        else f"{t.__module__}.{t.__qualname__}"
    )


def format_traceback(e: BaseException, skip: int = 0, limit: int = MAX_REPORT) -> str:
    """``e`` with its traceback as a server reports it (``tracebacks.format_remote``),
    without the first ``skip`` entries (the machinery's own frames)."""
    tb = e.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return format_remote(e, tb, limit)


#: Message code -> the payload classes it may carry (codes not here carry raw bytes, a str
#: or nothing; see the module docstring).
PAYLOADS: dict[int, tuple[type, ...]] = {
    SETUP: (Setup,),
    READY: (Ready,),
    SETUP_FAILED: (SetupFailed,),
    CALL: (Call,),
    RESULT: (Result,),
    INSTALL: (Install,),
    SET: (SetOption,),
    MAP: (MapStart, MapJobs, MapCancel, MapEnd),
    MAP_RESULT: (MapResult,),
    ERROR: (ErrorReport,),
    SHUTDOWN: (Shutdown,),
}
#: Payload class -> its message code.
CODES: dict[type, int] = {cls: code for code, classes in PAYLOADS.items() for cls in classes}


#: Payload class -> its field names, in order (the order they travel in).
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in CODES}
#: Payload class -> its position in ``PAYLOADS[code]`` (the first item on the wire).
_KIND: dict[type, int] = {cls: PAYLOADS[code].index(cls) for cls, code in CODES.items()}


def encode(payload: Any) -> tuple[int, bytes, list[memoryview], int]:
    """``(code, body, buffers, flags)`` of the frame that carries ``payload``.

    On the wire a payload is a plain tuple, its kind (position in ``PAYLOADS[code]``) then its
    fields: a pickled class costs several times a tuple, which the map messages would feel."""
    cls = type(payload)
    body, buffers, flags = serialize.dumps(
        (_KIND[cls], *[getattr(payload, n) for n in _FIELDS[cls]])
    )
    return CODES[cls], body, buffers, flags


def decode(code: int, body: Any, buffers: Any = ()) -> Any:
    """The payload of a frame of kind ``code`` (for codes without a payload class, what
    the body holds).

    Raises:
        ProtocolError: the frame does not carry one of its code's payload classes.
    """
    wire = serialize.loads(body, buffers)
    classes = PAYLOADS.get(code)
    if classes is None:
        return wire
    if (
        type(wire) is not tuple
        or not wire
        or type(wire[0]) is not int
        or not 0 <= wire[0] < len(classes)
    ):
        raise ProtocolError(f"message {NAMES.get(code, code)} carries no payload of its kind")
    cls = classes[wire[0]]
    try:
        return cls(*wire[1:])
    except TypeError as e:
        raise ProtocolError(
            f"message {NAMES.get(code, code)}: malformed {cls.__name__}: {e}"
        ) from None


def versions() -> dict[str, str]:
    """Versions that matter for exchanging pickles and code between nodes (sent in SETUP
    and READY; a difference gives a warning at the client)."""
    import cloudpickle
    import numpy as np

    from ..constants import __version__

    return {
        "parnet": __version__,
        "python": sys.version.split()[0],
        "cloudpickle": cloudpickle.__version__,
        "numpy": np.__version__,
    }
