"""parcellfun / pararrayfun: parallel maps over the processes of the local machine.

Theory of operation
-------------------
The arguments become flat columns (``common.cell_columns`` / ``array_columns``), the
positions ``range(n)`` are cut into chunks, and the chunks are self-scheduled onto the
shared process pool (``pool.get_pool``): at most ``nproc`` chunks run at once (two per
process are queued when the pool has exactly ``nproc`` processes, so a process never waits
for the caller between chunks); each finished chunk goes to an ``Assembler`` and, when the
pool has more chunks to run, the next one is submitted. ``fun`` / ``error_handler`` /
``cum_func`` travel as ``common.Shared``, pickled once per call.

- ``nproc`` is cut to ``min(nproc, usable cores, n)``. After the cut, ``nproc == 1`` runs in
  the calling process (no pool, no pickling): tiny maps stay cheap, and errors keep their
  live traceback.
- Chunks: ``chunks_per_proc=k`` gives ``nproc * k`` equal chunks (Octave's option). The
  default (``None``) is adaptive guided self-scheduling (``common.GuidedChunker``): chunks
  of ``remaining / (2 * nproc)`` elements, shrinking as the work runs out, at least
  ``n / (100 * nproc)``, and, once the cost per element has been measured on finished
  chunks, at least 5 ms of work each (a chunk costs about 0.6 ms of round trip through the
  pool) but at most ``remaining / nproc``: few chunks for cheap calls, balanced ends for
  costly ones. With ``vectorized`` the default is one chunk per process
  (``chunks_per_proc=1``: fewest calls of ``fun``).
- A failing element without ``error_handler``: no further chunks are handed out, queued
  ones are cancelled, and the element's own exception is raised with a note giving its
  index and the traceback text from the pool process (``MapElementError`` if the exception
  could not be sent back). A dead pool process raises ``pool.WorkerDiedError``; the pool
  restarts on the next call. ``KeyboardInterrupt`` kills the pool's processes (a new pool
  starts on the next call) so that the work really stops.
- ``verbose >= 1``: a tqdm progress bar on stderr, advanced per finished chunk.
"""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from parnet.maps.common import (
    Assembler,
    ChunkTask,
    GuidedChunker,
    Shared,
    array_columns,
    cell_columns,
    chunk_ranges,
    run_chunk,
)
from parnet.maps.pool import get_pool

__all__ = ["available_cores", "parcellfun", "pararrayfun"]


def available_cores() -> int:
    """Number of processors this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parcellfun(
    nproc: int,
    fun: Callable[..., Any],
    *iterables: Iterable[Any],
    uniform_output: bool = True,
    error_handler: Callable[..., Any] | None = None,
    verbose: int = 0,
    chunks_per_proc: int | None = None,
    cum_func: Callable[..., Any] | None = None,
    nout: int = 1,
) -> Any:
    """Calls ``fun(a[i], b[i], ...)`` for every ``i`` in ``nproc`` local processes.

    Args:
        nproc: number of processes (>= 1), cut to the usable cores and to the elements.
        fun: any callable, lambdas and closures included (sent with cloudpickle).
        *iterables: equal-length iterables, one per argument of ``fun``.
        uniform_output: every result must be a scalar (number or bool) and the result is a
            NumPy array of shape ``(n,)``; ``False``: a list.
        error_handler: ``error_handler(err, *args)`` replaces a call that raised; ``err`` has
            ``message``, ``identifier`` (exception type name), ``index`` (0-based).
        verbose: ``>= 1`` shows a progress bar on stderr.
        chunks_per_proc: chunks per process (default: guided chunking, see the module doc).
        cum_func: return one value accumulated with this commutative, associative function
            instead of all results: ``cum_func(acc, x)``, or with ``nout=k``
            ``cum_func(acc_1..acc_k, x_1..x_k)`` returning a k-tuple (Octave's convention).
            ``None`` for a map over no elements.
        nout: ``fun`` returns an ``nout``-tuple; a tuple of ``nout`` results is returned.

    Returns:
        The results in input order (see ``uniform_output``, ``nout``, ``cum_func``).

    Raises:
        ValueError: bad arguments, unequal lengths, a non-scalar result with
            ``uniform_output=True``.
        BaseException: the first failing call's own exception when there is no
            ``error_handler`` (a note gives its index); ``MapElementError`` if it could not
            be sent back from the pool process.
        WorkerDiedError: a pool process died (the pool restarts on the next call).
    """
    n, cols = cell_columns(iterables)
    return _run_map(
        "parcellfun",
        "cell",
        nproc,
        fun,
        cols,
        n,
        None,
        uniform_output,
        error_handler,
        verbose,
        chunks_per_proc,
        cum_func,
        False,
        nout,
    )


def pararrayfun(
    nproc: int,
    fun: Callable[..., Any],
    *arrays: Any,
    uniform_output: bool = True,
    error_handler: Callable[..., Any] | None = None,
    verbose: int = 0,
    chunks_per_proc: int | None = None,
    cum_func: Callable[..., Any] | None = None,
    vectorized: bool = False,
    nout: int = 1,
) -> Any:
    """Calls ``fun`` element-wise over equal-shape array-likes in ``nproc`` local processes.

    Same as ``parcellfun`` except: the arguments are array-likes of one shape (elements are
    taken in C order), the results keep that shape (an object array when
    ``uniform_output=False``), and ``vectorized``.

    ``nproc``, ``fun``, ``uniform_output``, ``error_handler``, ``verbose``,
    ``chunks_per_proc``, ``cum_func`` and ``nout`` are as in ``parcellfun``.

    Args:
        *arrays: equal-shape array-likes, one per argument of ``fun``.
        vectorized: ``fun`` takes whole chunks (1-d arrays, one per argument) and returns
            arrays of the chunk's length (with ``cum_func``: the chunk's accumulated value);
            ``error_handler`` likewise, with ``err.index`` the chunk's first position.
            Default chunking: one chunk per process.

    Returns:
        The results (see ``parcellfun``), of the arrays' shape.

    Raises:
        ValueError: as in ``parcellfun``, and for shapes that differ or a vectorized result
            of the wrong length. Other errors as in ``parcellfun``.
    """
    shape, n, cols = array_columns(arrays)
    return _run_map(
        "pararrayfun",
        "array",
        nproc,
        fun,
        cols,
        n,
        shape,
        uniform_output,
        error_handler,
        verbose,
        chunks_per_proc,
        cum_func,
        vectorized,
        nout,
    )


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class _FixedChunks:
    """Chunks fixed in advance (``chunks_per_proc`` given, or vectorized)."""

    def __init__(self, ranges: list[range]) -> None:
        self._it = iter(ranges)

    def next(self) -> range | None:
        return next(self._it, None)

    def observe(self, count: int, elapsed: float) -> None:
        pass


def _plan(
    n: int, nproc: int, chunks_per_proc: int | None, vectorized: bool
) -> _FixedChunks | GuidedChunker:
    if chunks_per_proc is None and vectorized:
        chunks_per_proc = 1
    if chunks_per_proc is not None:
        return _FixedChunks(chunk_ranges(n, max(1, -(-n // (nproc * chunks_per_proc)))))
    return GuidedChunker(n, nproc)


def _run_map(
    name: str,
    kind: str,
    nproc: int,
    fun: Callable[..., Any],
    cols: Sequence[Any],
    n: int,
    shape: tuple[int, ...] | None,
    uniform_output: bool,
    error_handler: Callable[..., Any] | None,
    verbose: int,
    chunks_per_proc: int | None,
    cum_func: Callable[..., Any] | None,
    vectorized: bool,
    nout: int,
) -> Any:
    _check_int("nproc", nproc, 1)
    _check_int("nout", nout, 1)
    if chunks_per_proc is not None:
        _check_int("chunks_per_proc", chunks_per_proc, 1)
    for label, f in (("fun", fun), ("error_handler", error_handler), ("cum_func", cum_func)):
        if f is not None and not callable(f):
            raise ValueError(f"{name}: {label} must be callable, got {type(f).__name__}")
    if fun is None:
        raise ValueError(f"{name}: fun must be callable")
    if not isinstance(verbose, int):
        raise TypeError(
            f"{name}: verbose must be an int (0: quiet, 1: progress bar), got {verbose!r:.40}"
        )
    nproc = max(1, min(nproc, available_cores(), n))
    asm = Assembler(
        n,
        shape=shape,
        nout=nout,
        uniform_output=uniform_output,
        cum_func=cum_func,
        kind=kind,  # type: ignore[arg-type]
        name=name,
    )
    bar = _progress(name, n) if verbose >= 1 else None
    try:
        if nproc == 1:
            _run_here(
                fun, cols, n, nout, vectorized, error_handler, cum_func, asm, bar, chunks_per_proc
            )
        else:
            _run_pool(
                fun,
                cols,
                nproc,
                nout,
                vectorized,
                error_handler,
                cum_func,
                asm,
                bar,
                _plan(n, nproc, chunks_per_proc, vectorized),
            )
    finally:
        if bar is not None:
            bar.close()
    return asm.result()


def _progress(name: str, n: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=n, desc=name, file=sys.stderr, unit="call", dynamic_ncols=True)


def _slices(cols: Sequence[Any], r: range, n: int) -> Sequence[Any]:
    if r.start == 0 and r.stop == n:
        return cols
    return [c[r.start : r.stop] for c in cols]


def _run_here(
    fun: Callable[..., Any],
    cols: Sequence[Any],
    n: int,
    nout: int,
    vectorized: bool,
    error_handler: Callable[..., Any] | None,
    cum_func: Callable[..., Any] | None,
    asm: Assembler,
    bar: Any,
    chunks_per_proc: int | None,
) -> None:
    # Chunks only matter here for the progress bar and for what a vectorized fun is given.
    if vectorized or bar is not None:
        chunks = _plan(n, 1, chunks_per_proc, vectorized)
    else:
        chunks = _FixedChunks([range(n)] if n else [])
    for r in iter(chunks.next, None):
        res = run_chunk(
            ChunkTask(
                fun,
                _slices(cols, r, n),
                r.start,
                nout,
                vectorized,
                error_handler,
                cum_func,
                want_traceback=False,
                portable=False,
            )
        )
        asm.add(res)
        if bar is not None:
            bar.update(res.count)


def _run_pool(
    fun: Callable[..., Any],
    cols: Sequence[Any],
    nproc: int,
    nout: int,
    vectorized: bool,
    error_handler: Callable[..., Any] | None,
    cum_func: Callable[..., Any] | None,
    asm: Assembler,
    bar: Any,
    chunks: _FixedChunks | GuidedChunker,
) -> None:
    pool = get_pool(nproc)
    n = asm.n
    sfun = Shared(fun)
    seh = None if error_handler is None else Shared(error_handler)
    scf = None if cum_func is None else Shared(cum_func)
    # One queued chunk per process on top of the running one, unless the shared pool is
    # larger than nproc (then queued chunks would run beyond nproc at once).
    limit = 2 * nproc if pool.nproc <= nproc else nproc
    finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
    inflight: set[Any] = set()

    def submit_next() -> bool:
        r = chunks.next()
        if r is None:
            return False
        fut = pool.submit(ChunkTask(sfun, _slices(cols, r, n), r.start, nout, vectorized, seh, scf))
        inflight.add(fut)
        fut.add_done_callback(finished.put)
        return True

    try:
        while len(inflight) < limit and submit_next():
            pass
        while inflight:
            fut = finished.get()
            inflight.discard(fut)
            res = fut.result()  # WorkerDiedError, pickling errors
            if res.error is None:  # keep the processes busy before assembling
                chunks.observe(res.count, res.elapsed)
                while len(inflight) < limit and submit_next():
                    pass
            asm.add(res)  # raises the element's failure / a uniform_output error
            if bar is not None:
                bar.update(res.count)
    except BaseException as e:
        for fut in inflight:
            fut.cancel()
        if not isinstance(e, Exception):  # KeyboardInterrupt: stop the work for real
            pool.shutdown(kill=True)
        raise
