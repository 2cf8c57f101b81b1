"""Map machinery shared by the local maps (parcellfun) and the network maps (netcellfun).

Theory of operation
-------------------
Every map, local or over the network, is the same pipeline; only the transport in the
middle differs::

    user arguments --cell_columns / array_columns--> n, columns (flat, one per argument)
    n --chunk_ranges (fixed size) / guided_ranges (shrinking sizes)--> [range, ...]
    range --ChunkTask(fun, column slices, start, ...)--> shipped anywhere (or not at all)
          --run_chunk--> ChunkResult (small, picklable) --shipped back-->
    ChunkResults in any order --Assembler.add--> Assembler.result() --> the map's value

Nothing here touches sockets, threads or processes: a network map pickles a ``ChunkTask``,
runs ``run_chunk`` on a server (in-process or in a pool process), sends the ``ChunkResult``
back and feeds it to an ``Assembler``.

Invariants and conventions:

- Indices are 0-based positions in the whole map; for array maps, the position in the
  C-order (row-major) flattening of the input shape. ``MapErr.index``, the first element of
  ``ChunkResult.error`` and every error message use them.
- ``ChunkTask.fun`` / ``error_handler`` / ``cum_func`` are plain callables or ``Shared``
  wrappers. ``Shared`` pickles its value once (cloudpickle) however many chunks carry it, and
  a receiving process unpickles each ``Shared`` once (small per-process cache), so a closure
  over a large array is not re-pickled per chunk.
- ``nout > 1``: ``fun`` (and ``error_handler``) return an ``nout``-tuple (or list); a wrong
  length is that element's failure, so ``error_handler`` sees it.
- ``cum_func`` follows the Octave reference: it receives the previous accumulated outputs
  followed by the current outputs and returns as many outputs as ``fun``, i.e.
  ``cum_func(acc, x)`` for ``nout == 1`` and ``cum_func(acc_1, ..., acc_k, x_1, ..., x_k)``
  returning a k-tuple for ``nout == k``. It must be commutative and associative: each chunk
  folds its own elements in order, and the ``Assembler`` folds chunk values in arrival order.
  A map over no elements accumulates nothing and its result is ``None``.
- ``vectorized``: ``fun(*column_chunks)`` gets the chunk's 1-d argument arrays and returns
  array(s) of the chunk's length (or, with ``cum_func``, the chunk's accumulated value);
  ``error_handler(err, *column_chunks)`` stands in for a failing chunk, ``err.index`` being
  the chunk's first position.
- Failures: ``run_chunk`` catches ``Exception`` per element. Without ``error_handler`` the
  chunk stops at the first failure and its ``ChunkResult.error`` says where and why;
  ``Assembler.add`` raises it (``raise_chunk_error``). ``KeyboardInterrupt`` / ``SystemExit``
  are not caught here.
- ``uniform_output=True``: each result must be a scalar (Python or NumPy number or bool, or
  a 0-d numeric array); the ``Assembler`` converts each chunk to a NumPy array on arrival and
  raises ``ValueError`` naming the first offending index.
"""

from __future__ import annotations

import math
import numbers
import pickle
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import cloudpickle
import numpy as np

from parnet.errors import ParnetError
from parnet.wire import serialize
from parnet.wire.messages import format_traceback

__all__ = [
    "Assembler",
    "ChunkResult",
    "GuidedChunker",
    "ChunkTask",
    "MapElementError",
    "MapErr",
    "Shared",
    "JobInterrupted",
    "array_columns",
    "call_chunk",
    "call_packed",
    "cell_columns",
    "chunk_ranges",
    "dumps_result",
    "error_result",
    "guided_ranges",
    "raise_chunk_error",
    "run_chunk",
]

_NOTHING: Any = object()
#: Scalar test: ``dtype.kind`` of the NumPy types accepted under ``uniform_output``.
_NUMERIC_KINDS = frozenset("biufc")
#: How many ``Shared`` values one process keeps unpickled (the most recent maps).
_SHARED_CACHE_SIZE = 4


# ----------------------------------------------------------------------------------------
# errors


@dataclass
class MapErr:
    """What ``error_handler(err, *args)`` receives in place of a failing call.

    Attributes:
        message: ``str()`` of the exception.
        identifier: the exception's type name, e.g. ``"ZeroDivisionError"``.
        index: 0-based position of the element in the whole map (for a vectorized chunk,
            the chunk's first position).
        exception: the exception object itself (beyond Octave).
    """

    message: str
    identifier: str
    index: int
    exception: BaseException | None = field(default=None, repr=False, compare=False)


class MapElementError(ParnetError):
    """An element of a map failed and its exception could not be sent back as an object.

    Attributes:
        index: 0-based position of the failing element.
        identifier: the exception's type name.
        message: ``str()`` of the exception.
        remote_traceback: the formatted traceback where it ran ("" if none).
    """

    def __init__(
        self,
        index: int,
        identifier: str,
        message: str,
        remote_traceback: str = "",
        where: str = "map",
    ) -> None:
        self.index = index
        self.identifier = identifier
        self.message = message
        self.remote_traceback = remote_traceback
        self.where = where
        super().__init__(index, identifier, message)

    def __str__(self) -> str:
        text = f"{self.where}: element {self.index} raised {self.identifier}: {self.message}"
        if self.remote_traceback:
            text += "\n--- traceback where it ran ---\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.index, self.identifier, self.message, self.remote_traceback, self.where),
        )


class JobInterrupted(ParnetError):
    """A job of a call stream (``parnet.Executor``) was dropped from its queue or stopped
    while running because of an interrupt (Ctrl-C at the client)."""


class WorkerDiedError(ParnetError):
    """A pool process died (signal, ``os._exit``, segfault, out of memory) during a chunk.

    Every chunk in flight in that pool fails with this error; the pool restarts itself on
    the next submit, so the caller may simply retry.

    Attributes:
        exitcodes: loky's summary of the workers' exit codes, e.g. ``"{SIGKILL(-9)}"``
            ("" if unknown).
    """

    def __init__(self, message: str, exitcodes: str = "") -> None:
        self.exitcodes = exitcodes
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.exitcodes))


class PoolShutDownError(ParnetError):
    """The pool was shut down while the chunk was pending or running."""


def run_packed(blob: bytes, start: int, count: int) -> bytes:
    """Runs in a pool process (either kind): unpickles the task, runs it, pickles the result."""
    try:
        task = pickle.loads(blob)
    except BaseException as e:  # noqa: BLE001 - reported as the chunk's error
        e.add_note("while unpickling the chunk's task in the pool process")
        res = error_result(start, count, start, e)
    else:
        try:
            res = run_chunk(task)
        except BaseException as e:  # noqa: BLE001 - SystemExit etc. from user code
            # Reported, not re-raised as such in the caller (a KeyboardInterrupt there would
            # look like the user's own Ctrl-C): the caller gets MapElementError. The index is
            # the chunk's start, as run_chunk lets these through without one.
            res = error_result(start, count, start, e, skip_frames=1)
            if not isinstance(e, Exception):
                res.exception = None
    return dumps_result(res, _dumps5)


def _dumps5(obj: Any) -> bytes:
    return cloudpickle.dumps(obj, protocol=5)


def call_packed(blob: bytes) -> Any:
    """Runs one call of a call stream: ``blob`` is ``(fn, args, kwargs)`` pickled by the
    client (``fn`` may be a ``Shared``). Unpickled here, so a call whose function or
    arguments cannot be loaded on this machine fails alone."""
    fn, args, kwargs = pickle.loads(blob)
    return _resolve(fn)(*args, **kwargs)


def call_chunk(fn: Callable[..., Any], chunk: Sequence[tuple[Any, ...]]) -> list[Any]:
    """``[fn(*args) for args in chunk]``: one call of ``Executor.map`` with ``chunksize > 1``."""
    return [fn(*args) for args in chunk]


# ----------------------------------------------------------------------------------------
# Shared: pickle once per map, unpickle once per process

_shared_cache: dict[str, Shared] = {}


class Shared:
    """A value (usually ``fun``) pickled once however many chunks carry it.

    Pickling a ``Shared`` emits its cached cloudpickle bytes; unpickling looks its key up in a
    small per-process cache first, so a pool process or server unpickles each one once.
    A ``Shared`` received this way keeps its bytes, so forwarding it (server to its pool)
    costs no re-pickling. Treat the wrapped value as immutable for the life of the map.

    Attributes:
        obj: the wrapped value.
        key: a unique id (a fresh UUID unless given).
    """

    __slots__ = ("obj", "key", "_blob")

    def __init__(self, obj: Any, key: str | None = None) -> None:
        self.obj = obj
        self.key = key or uuid.uuid4().hex
        self._blob: bytes | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        if self._blob is None:
            self._blob = serialize.cloud_dumps(self.obj)
        return (_shared_from_blob, (self.key, self._blob))

    def __repr__(self) -> str:
        return f"Shared({self.obj!r}, key={self.key[:8]})"


def _shared_from_blob(key: str, blob: bytes) -> Shared:
    cached = _shared_cache.get(key)
    if cached is not None:
        return cached
    s = Shared.__new__(Shared)
    s.obj = pickle.loads(blob)
    s.key = key
    s._blob = blob
    while len(_shared_cache) >= _SHARED_CACHE_SIZE:
        _shared_cache.pop(next(iter(_shared_cache)), None)
    _shared_cache[key] = s
    return s


def _resolve(x: Any) -> Any:
    return x.obj if type(x) is Shared else x


# ----------------------------------------------------------------------------------------
# arguments and chunks


def cell_columns(iterables: Sequence[Iterable[Any]]) -> tuple[int, list[Sequence[Any]]]:
    """Turns the argument iterables of a cell map into columns of equal length.

    Lists, tuples, ranges, strings and NumPy arrays are kept as they are (a NumPy array is a
    column of its rows); anything else is materialized with ``list()``.

    Args:
        iterables: one iterable per argument of ``fun``.

    Returns:
        ``(n, columns)``: the number of elements and one indexable, sliceable column per
        argument.

    Raises:
        ValueError: no iterables, or their lengths differ.
    """
    if len(iterables) == 0:
        raise ValueError("at least one iterable of arguments is needed")
    cols: list[Sequence[Any]] = []
    for it in iterables:
        if isinstance(it, (list, tuple, range, str, np.ndarray)):
            cols.append(it)  # type: ignore[arg-type]
        else:
            cols.append(list(it))
    lengths = [len(c) for c in cols]
    if any(ln != lengths[0] for ln in lengths):
        raise ValueError(f"all iterables must have the same length, got lengths {lengths}")
    return lengths[0], cols


def _as_array(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)
    except ValueError:
        # A ragged list of sequences: one object element per top-level item.
        items = list(a)
        arr = np.empty(len(items), dtype=object)
        for i, v in enumerate(items):
            arr[i] = v
        return arr


def array_columns(arrays: Sequence[Any]) -> tuple[tuple[int, ...], int, list[np.ndarray]]:
    """Turns the array-like arguments of an array map into flat columns of equal shape.

    Non-arrays go through ``np.asarray`` (a list of arbitrary objects becomes an object
    array; a ragged list becomes a 1-d object array of its items). No broadcasting: Octave's
    ``arrayfun`` requires equal sizes too.

    Args:
        arrays: one array-like per argument of ``fun``.

    Returns:
        ``(shape, n, columns)``: the common shape, the number of elements, and each argument
        flattened in C order (a view where possible).

    Raises:
        ValueError: no arrays, or their shapes differ.
    """
    if len(arrays) == 0:
        raise ValueError("at least one array of arguments is needed")
    arrs = [_as_array(a) for a in arrays]
    shapes = [a.shape for a in arrs]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"all arrays must have the same shape, got shapes {shapes}")
    shape = tuple(shapes[0])
    return shape, math.prod(shape), [a.ravel() for a in arrs]


def chunk_ranges(n: int, chunk_size: int) -> list[range]:
    """Cuts ``range(n)`` into consecutive ranges of ``chunk_size`` (the last may be shorter).

    Raises:
        ValueError: ``n < 0`` or ``chunk_size < 1``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [range(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def guided_ranges(
    n: int, nproc: int, *, factor: int = 2, min_size: int | None = None
) -> list[range]:
    """Cuts ``range(n)`` into shrinking ranges for self-scheduling ("guided" chunks).

    Each chunk is ``ceil(remaining / (factor * nproc))`` elements, never fewer than
    ``min_size`` (default ``ceil(n / (100 * nproc))``: at most about 100 chunks per process,
    Octave's advice for short calls) nor more than ``ceil(remaining / nproc)``. Large
    chunks first keep the per-chunk overhead low; small ones last let the processes finish
    together. ``GuidedChunker`` does the same while learning the cost per element.

    Raises:
        ValueError: ``n < 0``, ``nproc < 1``, ``factor < 1`` or ``min_size < 1``.
    """
    chunker = GuidedChunker(n, nproc, factor=factor, min_size=min_size)
    return list(iter(chunker.next, None))


class GuidedChunker:
    """Hands out the chunks of a self-scheduled map, sized as it goes ("guided", adaptive).

    Like ``guided_ranges``, each chunk is ``ceil(remaining / (factor * nproc))`` elements but
    at least ``min_size``; and once finished chunks have been ``observe``d, at least enough
    elements to run ``target`` seconds at the measured cost per element (so cheap calls
    travel in few chunks), though never more than ``ceil(remaining / nproc)`` (so every
    process still gets a share) unless all that remains is under ``target`` seconds of work
    (then it is one last chunk).

    Args:
        n: number of elements.
        nproc: number of processes running chunks.
        factor: the guided divisor (2: "factoring").
        min_size: smallest chunk (default ``ceil(n / (100 * nproc))``).
        target: seconds a chunk should take at least, once the cost is known.
    """

    def __init__(
        self,
        n: int,
        nproc: int,
        *,
        factor: int = 2,
        min_size: int | None = None,
        target: float = 0.005,
    ) -> None:
        if n < 0 or nproc < 1 or factor < 1:
            raise ValueError(f"need n >= 0, nproc >= 1, factor >= 1; got {n}, {nproc}, {factor}")
        self.n = n
        self.nproc = nproc
        self.factor = factor
        self.min_size = max(1, -(-n // (100 * nproc))) if min_size is None else min_size
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        self.target = target
        self.pos = 0
        self._seconds = 0.0
        self._counted = 0

    def observe(self, count: int, elapsed: float) -> None:
        """Records a finished chunk of ``count`` elements that took ``elapsed`` seconds."""
        if count > 0 and elapsed >= 0:
            self._counted += count
            self._seconds += elapsed

    def next(self) -> range | None:
        """The next chunk, or ``None`` when all are handed out."""
        rest = self.n - self.pos
        if rest <= 0:
            return None
        size = max(self.min_size, -(-rest // (self.factor * self.nproc)))
        if self._counted:
            per = self._seconds / self._counted
            if rest * per <= self.target:
                return self._take(rest)  # all that is left is worth no more than one chunk
            size = max(size, math.ceil(self.target / per))
        # Every process still gets a share, except of a tail under min_size.
        return self._take(max(1, min(size, max(self.min_size, -(-rest // self.nproc)), rest)))

    def _take(self, size: int) -> range:
        r = range(self.pos, self.pos + size)
        self.pos += size
        return r


# ----------------------------------------------------------------------------------------
# running one chunk


@dataclass
class ChunkTask:
    """One chunk of a map: everything ``run_chunk`` needs, picklable with cloudpickle.

    Attributes:
        fun: the mapped callable, or a ``Shared`` holding it.
        args: one column slice per argument (sequences for a cell map, 1-d arrays for an
            array map), all of the chunk's length.
        start: the map position of the chunk's first element.
        nout: number of outputs of ``fun``.
        vectorized: call ``fun`` once on the whole column slices.
        error_handler: ``error_handler(MapErr, *args)`` or ``None`` (may be ``Shared``).
        cum_func: accumulate instead of collecting, or ``None`` (may be ``Shared``).
        want_traceback: format the traceback text of a failure.
        portable: the result will be pickled: keep a failure's exception object only if it
            survives a pickle round trip. ``False`` for in-process runs (keeps it always,
            with its live traceback).
    """

    fun: Any
    args: Sequence[Any]
    start: int
    nout: int = 1
    vectorized: bool = False
    error_handler: Any = None
    cum_func: Any = None
    want_traceback: bool = True
    portable: bool = True

    def __repr__(self) -> str:
        count = len(self.args[0]) if self.args else 0
        return (
            f"ChunkTask(start={self.start}, count={count}, nargs={len(self.args)}, "
            f"nout={self.nout}, vectorized={self.vectorized})"
        )


@dataclass
class ChunkResult:
    """What ``run_chunk`` returns: small and picklable (when the outputs are).

    Attributes:
        start: the map position of the chunk's first element.
        count: number of elements in the chunk.
        outputs: per output, the chunk's values (a list, or a 1-d array when vectorized);
            ``None`` with ``cum_func`` or on failure.
        cum: the chunk's accumulated value (a tuple when ``nout > 1``), if ``has_cum``.
        has_cum: whether ``cum`` holds a value.
        error: ``(index, type name, message, traceback text)`` of the first failure that no
            ``error_handler`` took, else ``None``.
        exception: that failure's exception object when it could be kept (see
            ``ChunkTask.portable``), else ``None``.
        elapsed: seconds ``run_chunk`` spent (feeds ``GuidedChunker.observe``).
    """

    start: int
    count: int
    outputs: list[Any] | None = None
    cum: Any = None
    has_cum: bool = False
    error: tuple[int, str, str, str] | None = None
    exception: BaseException | None = None
    elapsed: float = 0.0

    def __repr__(self) -> str:
        state = "error" if self.error else ("cum" if self.has_cum else "values")
        return f"ChunkResult(start={self.start}, count={self.count}, {state})"


def _portable_exception(e: BaseException) -> BaseException | None:
    try:
        pickle.loads(cloudpickle.dumps(e, protocol=5))
    except Exception:
        return None
    return e


def error_result(
    start: int,
    count: int,
    index: int,
    exc: BaseException,
    *,
    want_traceback: bool = True,
    portable: bool = True,
    skip_frames: int = 0,
) -> ChunkResult:
    """Builds the ``ChunkResult`` of a chunk that failed at ``index`` with ``exc``.

    Args:
        start, count: the chunk.
        index: map position of the failing element.
        exc: the exception.
        want_traceback: include the formatted traceback text.
        portable: keep ``exc`` only if it survives pickling.
        skip_frames: leading traceback entries to leave out (the machinery's own frames).
    """
    text = format_traceback(exc, skip_frames) if want_traceback else ""
    kept = _portable_exception(exc) if portable else exc
    return ChunkResult(
        start, count, error=(index, type(exc).__name__, str(exc), text), exception=kept
    )


def _failed(task: ChunkTask, count: int, index: int, exc: BaseException) -> ChunkResult:
    """``error_result`` of ``task``'s chunk, for an exception caught in a ``_run_*`` frame."""
    return error_result(
        task.start,
        count,
        index,
        exc,
        want_traceback=task.want_traceback,
        portable=task.portable,
        skip_frames=1,
    )


def _stand_in(
    task: ChunkTask,
    eh: Callable[..., Any] | None,
    exc: Exception,
    index: int,
    count: int,
    args: Sequence[Any],
    check: Callable[[Any], Any] | None = None,
) -> tuple[Any, ChunkResult | None]:
    """What replaces a call that raised ``exc`` at ``index``: ``(error_handler(MapErr, *args)
    passed through check, None)``; or ``(None, the chunk's error result)`` when there is no
    ``error_handler`` or it failed too."""
    if eh is None:
        return None, _failed(task, count, index, exc)
    try:
        r = eh(MapErr(str(exc), type(exc).__name__, index, exc), *args)
        return (r if check is None else check(r)), None
    except Exception as e2:
        return None, _failed(task, count, index, e2)


def _as_outputs(r: Any, nout: int, who: str) -> tuple[Any, ...]:
    if not isinstance(r, (tuple, list)) or len(r) != nout:
        got = f"{len(r)} values" if isinstance(r, (tuple, list)) else type(r).__name__
        raise ValueError(f"{who} must return {nout} values (nout={nout}), got {got}")
    return tuple(r)


def run_chunk(task: ChunkTask) -> ChunkResult:
    """Runs ``task.fun`` over one chunk; never raises for a failing element.

    Per element ``fun(*args_i)``; a call that raises is replaced by
    ``error_handler(MapErr, *args_i)`` when given, else the chunk stops there and the result
    carries the error. With ``cum_func`` the chunk's results are folded into one value. See
    the module docstring for ``nout``, ``cum_func`` and ``vectorized``.

    Args:
        task: the chunk.

    Returns:
        The chunk's ``ChunkResult``.
    """
    t0 = time.perf_counter()
    fun = _resolve(task.fun)
    eh = _resolve(task.error_handler)
    cf = _resolve(task.cum_func)
    if task.vectorized:
        res = _run_vectorized(task, fun, eh, cf)
    else:
        res = _run_elements(task, fun, eh, cf)
    res.elapsed = time.perf_counter() - t0
    return res


def _run_elements(
    task: ChunkTask,
    fun: Callable[..., Any],
    eh: Callable[..., Any] | None,
    cf: Callable[..., Any] | None,
) -> ChunkResult:
    if task.nout > 1:
        return _run_elements_multi(task, fun, eh, cf)
    args = task.args
    start = task.start
    count = len(args[0])
    single = len(args) == 1
    out: list[Any] = []
    append = out.append
    it = iter(args[0]) if single else zip(*args, strict=True)
    a: Any = None
    # The hot path is a bare loop (a try block is free in 3.11 until something raises); the
    # index of a failure is the number of results before it, and the loop resumes on the
    # same iterator after error_handler stood in for the failing call.
    while True:
        try:
            if single:
                for a in it:
                    append(fun(a))
            else:
                for a in it:
                    append(fun(*a))
            break
        except Exception as e:
            r, failed = _stand_in(task, eh, e, start + len(out), count, (a,) if single else a)
            if failed is not None:
                return failed
            append(r)
    if cf is None:
        return ChunkResult(start, count, outputs=[out])
    if not out:
        return ChunkResult(start, count)
    acc = out[0]
    k = start
    try:
        for x in islice(out, 1, None):
            k += 1
            acc = cf(acc, x)
    except Exception as e:
        return _failed(task, count, k, e)
    return ChunkResult(start, count, cum=acc, has_cum=True)


def _run_elements_multi(
    task: ChunkTask,
    fun: Callable[..., Any],
    eh: Callable[..., Any] | None,
    cf: Callable[..., Any] | None,
) -> ChunkResult:
    """``nout > 1``: each result is checked to be an ``nout``-tuple."""
    args = task.args
    start = task.start
    nout = task.nout
    count = len(args[0])
    out: list[tuple[Any, ...]] = []
    acc: Any = _NOTHING
    i = start
    for a in zip(*args, strict=True):
        try:
            r = _as_outputs(fun(*a), nout, "fun")
        except Exception as e:
            r, failed = _stand_in(
                task, eh, e, i, count, a, lambda x: _as_outputs(x, nout, "error_handler")
            )
            if failed is not None:
                return failed
        if cf is None:
            out.append(r)
        elif acc is _NOTHING:
            acc = r
        else:
            try:
                acc = _as_outputs(cf(*acc, *r), nout, "cum_func")
            except Exception as e:
                return _failed(task, count, i, e)
        i += 1
    if cf is not None:
        return ChunkResult(
            start, count, cum=None if acc is _NOTHING else acc, has_cum=acc is not _NOTHING
        )
    if not out:
        return ChunkResult(start, count, outputs=[[] for _ in range(nout)])
    return ChunkResult(start, count, outputs=[list(col) for col in zip(*out, strict=True)])


def _as_column(r: Any, count: int, who: str) -> np.ndarray:
    arr = np.asarray(r)
    if arr.size != count:
        raise ValueError(
            f"vectorized {who} returned shape {arr.shape} for a chunk of {count} elements"
        )
    return arr.reshape(count)


def _vector_outputs(r: Any, task: ChunkTask, count: int, cumulative: bool, who: str) -> Any:
    if cumulative:
        return _as_outputs(r, task.nout, who) if task.nout > 1 else r
    if task.nout == 1:
        return [_as_column(r, count, who)]
    return [_as_column(x, count, who) for x in _as_outputs(r, task.nout, who)]


def _run_vectorized(
    task: ChunkTask,
    fun: Callable[..., Any],
    eh: Callable[..., Any] | None,
    cf: Callable[..., Any] | None,
) -> ChunkResult:
    args = task.args
    start = task.start
    count = len(args[0])
    cumulative = cf is not None
    try:
        r = _vector_outputs(fun(*args), task, count, cumulative, "fun")
    except Exception as e:
        r, failed = _stand_in(
            task,
            eh,
            e,
            start,
            count,
            args,
            lambda x: _vector_outputs(x, task, count, cumulative, "error_handler"),
        )
        if failed is not None:
            return failed
    if cumulative:
        return ChunkResult(start, count, cum=r, has_cum=True)
    return ChunkResult(start, count, outputs=r)


def dumps_result(res: ChunkResult, dumps: Callable[[Any], Any] = cloudpickle.dumps) -> Any:
    """Serializes ``res`` with ``dumps``; if an output cannot be serialized, returns instead
    the serialized error result naming the first such element.

    For the process that ran the chunk, before sending the result back (pool process or
    server). ``dumps`` is any serializer taking one object (default ``cloudpickle.dumps``).
    """
    try:
        return dumps(res)
    except Exception as e:
        bad_index, bad_exc = res.start, e
        for k, vals in enumerate(res.outputs or []):
            for j, v in enumerate(vals):
                try:
                    dumps(v)
                except Exception as e2:
                    bad_index, bad_exc = res.start + j, e2
                    break
            else:
                continue
            err = TypeError(
                f"output {k} of element {bad_index} cannot be sent back: "
                f"{type(bad_exc).__name__}: {bad_exc}"
            )
            break
        else:
            err = TypeError(
                f"the result of the chunk at {res.start} cannot be sent back: "
                f"{type(bad_exc).__name__}: {bad_exc}"
            )
        return dumps(error_result(res.start, res.count, bad_index, err, want_traceback=False))


# ----------------------------------------------------------------------------------------
# assembling


def raise_chunk_error(res: ChunkResult, where: str = "map") -> None:
    """Raises the failure carried by ``res`` (which must have ``res.error``).

    The original exception object is re-raised when it came back, with a note naming the
    element index (and the traceback text where it ran, if it crossed a process boundary);
    otherwise ``MapElementError``.

    Raises:
        BaseException: the element's exception, or ``MapElementError``.
    """
    assert res.error is not None
    index, identifier, message, tb_text = res.error
    exc = res.exception
    if exc is None:
        raise MapElementError(index, identifier, message, tb_text, where)
    note = f"{where}: raised by element {index}"
    if exc.__traceback__ is None and tb_text:
        note += "\n--- traceback where it ran ---\n" + tb_text.rstrip()
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    raise exc


def _is_scalar(v: Any) -> bool:
    if isinstance(v, (numbers.Number, np.bool_)):
        return not isinstance(v, np.generic) or v.dtype.kind in _NUMERIC_KINDS
    return isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in _NUMERIC_KINDS


class Assembler:
    """Collects ``ChunkResult`` objects in any order and builds the map's return value.

    A chunk is identified by its ``start``; a second result for the same start (a chunk
    rerun elsewhere) is ignored. ``uniform_output`` is checked as each chunk arrives.

    Args:
        n: number of elements of the map.
        shape: output shape for ``kind="array"`` (default ``(n,)``).
        nout: number of outputs of ``fun``.
        uniform_output: scalars into NumPy arrays (else a list / an object array).
        cum_func: the map's ``cum_func`` (the result is then one accumulated value).
        kind: ``"cell"`` (netcellfun/parcellfun) or ``"array"`` (netarrayfun/pararrayfun).
        name: the map's name for error messages.
    """

    def __init__(
        self,
        n: int,
        *,
        shape: tuple[int, ...] | None = None,
        nout: int = 1,
        uniform_output: bool = True,
        cum_func: Callable[..., Any] | None = None,
        kind: Literal["cell", "array"] = "cell",
        name: str = "map",
    ) -> None:
        if kind not in ("cell", "array"):
            raise ValueError(f"kind must be 'cell' or 'array', got {kind!r}")
        self.n = n
        self.shape = (n,) if shape is None else tuple(shape)
        if math.prod(self.shape) != n:
            raise ValueError(f"shape {self.shape} does not hold {n} elements")
        self.nout = nout
        self.uniform_output = uniform_output
        self.cum_func = cum_func
        self.kind = kind
        self.name = name
        self.count_done = 0
        self._parts: dict[int, list[Any]] = {}
        self._acc: Any = _NOTHING

    def add(self, res: ChunkResult) -> bool:
        """Takes one chunk's result.

        Returns:
            ``True`` if it was new, ``False`` for a duplicate (ignored).

        Raises:
            BaseException: the element's failure if ``res.error`` (see
                ``raise_chunk_error``); check ``res.error`` first to report it otherwise.
            ValueError: a non-scalar result under ``uniform_output``, or a chunk outside
                the map.
        """
        if res.error is not None:
            raise_chunk_error(res, self.name)
        if res.start in self._parts:
            return False
        if res.start < 0 or res.start + res.count > self.n:
            raise ValueError(
                f"{self.name}: chunk {res.start}+{res.count} outside the map of {self.n}"
            )
        if self.cum_func is not None:
            self._parts[res.start] = []
            if res.has_cum:
                self._fold(res.cum)
        else:
            if res.outputs is None or len(res.outputs) != self.nout:
                raise ValueError(f"{self.name}: chunk at {res.start} has no {self.nout} outputs")
            self._parts[res.start] = [self._convert(res.start, res.count, o) for o in res.outputs]
        self.count_done += res.count
        return True

    def _fold(self, x: Any) -> None:
        if self._acc is _NOTHING:
            self._acc = x
        elif self.nout == 1:
            self._acc = self.cum_func(self._acc, x)  # type: ignore[misc]
        else:
            self._acc = _as_outputs(
                self.cum_func(*self._acc, *x),  # type: ignore[misc]
                self.nout,
                "cum_func",
            )

    def _convert(self, start: int, count: int, values: Any) -> Any:
        if len(values) != count:
            raise ValueError(
                f"{self.name}: chunk at {start} has {len(values)} values for {count} elements"
            )
        if self.uniform_output:
            return self._uniform(start, values)
        if self.kind == "cell":
            return list(values)
        arr = np.empty(count, dtype=object)
        for j, v in enumerate(values):
            arr[j] = v
        return arr

    def _uniform(self, start: int, values: Any) -> np.ndarray:
        try:
            arr = values if isinstance(values, np.ndarray) else np.array(values)
        except (ValueError, TypeError):
            arr = None
        if arr is not None and arr.ndim == 1 and arr.dtype.kind in _NUMERIC_KINDS:
            return arr
        for j, v in enumerate(values):
            if not _is_scalar(v):
                i = start + j
                where = f"index {i}"
                if self.kind == "array" and len(self.shape) > 1:
                    where += f" (position {tuple(int(x) for x in np.unravel_index(i, self.shape))})"
                raise ValueError(
                    f"{self.name}: all values must be scalars when uniform_output=True; the "
                    f"result at {where} is {type(v).__name__} {_short_repr(v)}; use "
                    f"uniform_output=False"
                )
        out = np.empty(len(values), dtype=object)  # numbers NumPy has no dtype for
        for j, v in enumerate(values):
            out[j] = v
        return out

    def done(self) -> bool:
        """Whether every element has been added."""
        return self.count_done >= self.n

    def result(self) -> Any:
        """The map's value: see ``parcellfun`` / ``netcellfun`` in API.md.

        Raises:
            RuntimeError: chunks are missing.
        """
        if not self.done():
            raise RuntimeError(f"{self.name}: {self.n - self.count_done} elements missing")
        if self.cum_func is not None:
            acc = None if self._acc is _NOTHING else self._acc
            return tuple(acc) if (self.nout > 1 and acc is not None) else acc
        starts = sorted(self._parts)
        outs = [self._join([self._parts[s][k] for s in starts]) for k in range(self.nout)]
        return outs[0] if self.nout == 1 else tuple(outs)

    def _join(self, pieces: list[Any]) -> Any:
        if self.uniform_output:
            arr = np.concatenate(pieces) if pieces else np.empty(0, dtype=float)
            return arr.reshape(self.shape)
        if self.kind == "cell":
            return [v for p in pieces for v in p]
        arr = np.concatenate(pieces) if pieces else np.empty(0, dtype=object)
        return arr.reshape(self.shape)


def _short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
