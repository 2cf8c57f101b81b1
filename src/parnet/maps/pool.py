"""The reusable local process pool that runs map chunks (parcellfun, and netcellfun on servers).

Theory of operation
-------------------
Two kinds of pool, one interface (``submit``, ``grow``, ``shutdown``, the same errors):

- on a server worker, ``forkpool.ForkPool``: processes forked in milliseconds by the fork
  server the worker forked before it started any thread (see ``parnet.maps.forkpool``);
- everywhere else (the client's ``parcellfun``, a worker whose fork server is gone), a loky
  pool, described below. The client has threads and no fork server: it would have to start
  one as a new Python process, the very cost loky pays once per pool process, so it keeps
  loky's hardened executor.

``get_pool`` returns the one that applies. The errors (``WorkerDiedError``,
``PoolShutDownError``) and the function that runs a chunk in a pool process (``run_packed``)
live in ``maps.common``, shared by both. The loky pool::

    caller thread(s)                      loky manager thread          worker processes
    Pool.submit(ChunkTask)
      cloudpickle.dumps(task) -> bytes
      executor.submit(run_packed, bytes) ----- call queue --------------> run_packed:
      returns a _ChunkFuture                                              loads, run_chunk,
                                           <--- result queue ------------ dumps_result -> bytes
                                           _finish: loads -> ChunkResult
                                           or WorkerDiedError
                                           sets the _ChunkFuture

Why loky (``loky.ProcessPoolExecutor``) rather than ``concurrent.futures.ProcessPoolExecutor``:

- Workers start with fork+exec (loky's own context), so the pool is safe to start from a
  process that already runs threads (the server worker's link threads), unlike plain fork.
- A worker that dies (kill -9, ``os._exit``, segfault, out-of-memory) breaks the executor
  with ``TerminatedWorkerError`` naming the exit codes and signals ("{SIGKILL(-9)}");
  the standard executor says only "terminated abruptly", and its forkserver/spawn contexts
  re-import the user's ``__main__`` in every worker (scripts would need a main guard).
- Detection waits on the process sentinels (no polling), and loky is the executor joblib
  has hardened for years.

The pool is ours (one ``loky.ProcessPoolExecutor`` instance, not loky's process-wide
reusable singleton, which joblib may resize under us). Tasks and results cross as bytes that
we (un)pickle ourselves: an unpicklable argument fails that task's future when submitted, a
task that cannot be unpickled in the worker or a result that cannot be pickled there
comes back as that chunk's error, and none of them break the executor. Only a dead worker
breaks it: every chunk then in flight fails with ``WorkerDiedError`` and the next ``submit``
starts a fresh executor. Workers are started once and reused (no idle timeout) until
``shutdown``/``shutdown_pools`` or process exit (an ``atexit`` hook); each worker also
exits by itself when the owning process dies, even by SIGKILL (``_init_worker``). A child of ``os.fork``
does not inherit the parent's pool. The pool's processes are not daemonic
``multiprocessing`` children, but the process that creates them must not be one either.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import io
import logging
import os
import pickle
import re
import select
import sys
import threading
import time
from typing import Any

from parnet.errors import ParnetError
from parnet.maps.common import (
    ChunkResult,
    ChunkTask,
    PoolShutDownError,
    WorkerDiedError,
    run_packed,
)
from parnet.maps.forkpool import ForkPool, PoolBase, current_server

__all__ = ["Pool", "PoolShutDownError", "WorkerDiedError", "get_pool", "preload", "shutdown_pools"]

log = logging.getLogger(__name__)

#: Seconds a polite shutdown waits for running chunks before killing the workers.
SHUTDOWN_GRACE = 10.0


# ----------------------------------------------------------------------------------------
# worker side


def _init_worker(parent_pid: int) -> None:
    """Pool process start-up: exit as soon as the process that owns the pool is gone.

    loky's workers outlive an owner killed with SIGKILL (they wait on a queue that other
    workers still hold open), so each worker watches its parent: on a pidfd where the
    kernel has one (no polling), else by checking ``getppid`` once a second.
    """
    if os.getppid() != parent_pid:
        os._exit(0)
    # Whole lines in one write each: a server forwards this output to the client, and
    # several pool processes share its pipe (PIPE_BUF-sized writes do not interleave).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), daemon=True, name="parnet-parent-watch"
    ).start()


def _watch_parent(parent_pid: int) -> None:
    try:
        fd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0 and os.getppid() == parent_pid:
        select.select([fd], [], [])  # readable once the parent has exited
    else:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
    os._exit(0)


# ----------------------------------------------------------------------------------------
# parent side


class _ChunkFuture(concurrent.futures.Future):
    """The future ``Pool.submit`` returns; cancelling it cancels the queued loky task."""

    _inner: concurrent.futures.Future | None = None

    def cancel(self) -> bool:
        inner = self._inner
        if inner is not None and not inner.cancel():
            return False
        return super().cancel()


_EXITCODES = re.compile(r"exit codes of the workers are (\{[^}]*\})")


class Pool(PoolBase):
    """A pool of worker processes, started once and reused, that runs ``ChunkTask`` objects.

    Use ``get_pool`` for the process-wide shared pool. Also a context manager (shuts down).

    Args:
        nproc: number of worker processes (>= 1).
    """

    def __init__(self, nproc: int) -> None:
        super().__init__(nproc)
        self._executor: Any = None
        self._broken = False

    def _state(self) -> str:
        return "broken" if self._broken else "open"

    def _current_executor(self, restart: bool = False) -> Any:
        with self._lock:
            if self._closed:
                raise PoolShutDownError("the pool is shut down")
            if self._executor is None or self._broken or restart:
                self._start_locked()
            return self._executor

    def _start_locked(self) -> None:
        from loky import ProcessPoolExecutor
        from loky.backend.context import get_context

        old = self._executor
        if old is not None:
            old.shutdown(wait=False, kill_workers=self._broken)
        self._executor = ProcessPoolExecutor(
            max_workers=self._nproc,
            context=get_context("loky"),
            timeout=None,
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )
        self._broken = False
        log.debug("started pool executor with %d processes", self._nproc)

    def grow(self, nproc: int) -> None:
        """Makes the pool at least ``nproc`` processes (a new executor; running chunks
        finish in the old one)."""
        with self._lock:
            if nproc <= self._nproc or self._closed:
                return
            self._nproc = nproc
            if self._executor is not None:
                self._start_locked()

    def submit(self, task: ChunkTask) -> concurrent.futures.Future[ChunkResult]:
        """Queues one chunk; returns a future of its ``ChunkResult``.

        A failing element does not fail the future: it is in the result's ``error``. The
        future fails with the pickling error if the task cannot be pickled, with
        ``WorkerDiedError`` if a pool process died while it was in flight (retry: the pool
        restarts), or with ``PoolShutDownError``.

        Raises:
            PoolShutDownError: the pool was shut down before this call.
        """
        count = len(task.args[0]) if task.args else 0
        fut = _ChunkFuture()
        blob = self._pack(task, count, fut)
        if blob is None:
            return fut
        executor = self._current_executor()
        try:
            inner = executor.submit(run_packed, blob, task.start, count)
        except (concurrent.futures.BrokenExecutor, RuntimeError):
            # Broken by a death not yet seen through a future, or replaced by grow():
            # one retry on a fresh executor.
            with self._lock:
                if self._executor is executor:
                    self._broken = True
            inner = self._current_executor().submit(run_packed, blob, task.start, count)
        fut._inner = inner
        used = self._executor
        inner.add_done_callback(lambda f: self._finish(fut, task.start, count, f, used))
        return fut

    def _finish(
        self,
        fut: _ChunkFuture,
        start: int,
        count: int,
        inner: concurrent.futures.Future,
        executor: Any = None,
    ) -> None:
        if fut.done():
            return
        try:
            if inner.cancelled():
                fut.cancel()
                return
            exc = inner.exception()
            if exc is None:
                try:
                    fut.set_result(pickle.loads(inner.result()))
                except Exception as e:
                    err = ParnetError(
                        f"could not unpickle the result of the chunk at {start}: "
                        f"{type(e).__name__}: {e}"
                    )
                    err.__cause__ = e
                    fut.set_exception(err)
            elif isinstance(exc, concurrent.futures.BrokenExecutor):
                with self._lock:
                    if executor is None or self._executor is executor:
                        self._broken = True  # not a replacement started since
                m = _EXITCODES.search(str(exc))
                codes = m.group(1) if m else ""
                what = f"exit codes {codes}" if codes else str(exc).splitlines()[0]
                err = WorkerDiedError(
                    f"a process of the local pool died while elements {start}..{start + count - 1}"
                    f" were in flight ({what}); the pool restarts on the next call",
                    codes,
                )
                err.__cause__ = exc
                fut.set_exception(err)
            elif isinstance(exc, RuntimeError) and "shut" in str(exc).lower():
                err2 = PoolShutDownError(
                    f"the pool was shut down with the chunk at {start} in flight"
                )
                err2.__cause__ = exc
                fut.set_exception(err2)
            else:
                fut.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile

    def shutdown(self, kill: bool = False, timeout: float = SHUTDOWN_GRACE) -> None:
        """Stops the workers; chunks still queued or running fail. Idempotent.

        Args:
            kill: kill the workers at once; else let running chunks finish, for at most
                ``timeout`` seconds, then kill.
            timeout: seconds of grace for a polite shutdown.
        """
        with self._lock:
            executor, self._executor = self._executor, None
            self._closed = True
        if executor is None or self._pid != os.getpid():
            return  # nothing started, or a forked child: the workers are the parent's
        if kill:
            executor.shutdown(wait=True, kill_workers=True)
            return
        t = threading.Thread(
            target=executor.shutdown,
            kwargs={"wait": True},
            name="parnet-pool-shutdown",
            daemon=True,
        )
        t.start()
        t.join(timeout)
        if t.is_alive():
            executor.shutdown(wait=False, kill_workers=True)
            t.join(timeout)


_pool: Pool | ForkPool | None = None
_pool_lock = threading.Lock()

#: What starting a pool imports besides this module. ``preload`` imports them in the calling
#: thread: a pool started by a background thread while user code imports in another (e.g.
#: joblib, whose vendored loky imports the same ``multiprocessing`` modules) could otherwise
#: meet it in a cycle of module locks, and one of them gets a partially initialized module.
_POOL_MODULES = (
    "loky",
    "loky.backend.context",
    "loky.backend.fork_exec",
    "loky.backend.popen_loky_posix",
    "loky.backend.resource_tracker",
    "loky.backend.spawn",
    "loky.backend.synchronize",
    "multiprocessing.resource_tracker",
    "multiprocessing.spawn",
    "json",
    "runpy",
    "importlib.util",
)


def preload() -> None:
    """Imports what starting a pool needs, in the calling thread (see ``_POOL_MODULES``);
    nothing where pools are forked by a fork server (``forkpool``)."""
    import importlib

    if current_server() is not None:
        return
    for name in _POOL_MODULES:
        if name not in sys.modules:
            importlib.import_module(name)


def get_pool(nproc: int) -> Pool | ForkPool:
    """The process-wide shared pool, with at least ``nproc`` processes.

    A ``forkpool.ForkPool`` where this process has a fork server (a server worker), else a
    loky ``Pool``. Started on first use; grown (never shrunk) when more processes are asked for; replaced
    after ``shutdown``. A dead worker is handled by the pool itself (see ``Pool.submit``).
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool.closed or _pool.owner_pid != os.getpid():
            server = current_server()
            _pool = Pool(nproc) if server is None else ForkPool(nproc, server)
        elif _pool.nproc < nproc:
            _pool.grow(nproc)
        return _pool


def shutdown_pools(kill: bool = False, timeout: float = SHUTDOWN_GRACE) -> None:
    """Shuts the shared pool down (at process exit, or when a server's network closes).

    Args:
        kill: kill the workers at once (see ``Pool.shutdown``).
        timeout: seconds of grace for running chunks when not ``kill``.
    """
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(kill=kill, timeout=timeout)


def _forget_after_fork() -> None:
    # The child must not use (or shut down) the parent's workers.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(shutdown_pools, timeout=2.0)
