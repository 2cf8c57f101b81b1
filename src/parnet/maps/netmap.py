"""netcellfun / netarrayfun: a map over the servers, and over the cores of each server.

Theory of operation. Two levels of scheduling:

* **Client, over servers** (``NetMap``): the elements are cut into jobs of ``chunk_size``.
  Jobs travel in *batches*, sized by guided self-scheduling (``ceil(remaining / (2 *
  servers))``, shrinking as the map proceeds), and every server keeps two batches in
  flight, so no server waits on a round trip and a fast server simply gets more. One
  message carries a whole batch, so 2000 trivial calls cost a handful of messages, not
  2000 (``chunk_size`` stays the unit of local scheduling and of error reporting).
* **Worker, over its cores** (``WorkerMapRunner``): the first job of a map runs in the
  worker process itself and is timed (while, if the local pool is already warm, the next
  ``nlocaljobs - 1`` jobs start there speculatively). Jobs faster than ``FAST_JOB`` keep
  running in-process: a process hop would cost more than the call. Slower jobs go to the
  reusable local pool (``maps.pool``), ``nlocaljobs`` at a time, fed from the pool's
  completion callbacks, each result sent back as soon as it is ready.

Results come back as ``MAP_RESULT`` frames on the command link and go into an
``Assembler`` in any order. A failing element without ``error_handler`` cancels the map
everywhere and raises ``RemoteError`` naming its index; the network stays usable (late
results of a cancelled map are dropped by map id). A server that dies mid-map has its
unfinished jobs rerun on the others; a job that was running on two servers that died is
not tried a third time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import ConnectionClosed, RemoteError
from ..link import wait_links
from ..network import Connections, Network
from ..wire import messages as msg
from ..wire import serialize
from .common import (
    Assembler,
    ChunkResult,
    ChunkTask,
    Shared,
    array_columns,
    cell_columns,
    dumps_result,
    error_result,
    run_chunk,
)

log = logging.getLogger(__name__)

FAST_JOB = 0.0005  # seconds: faster jobs run in the worker process itself
_SEND_EVERY = 0.02  # seconds: in-process runs report at least this often
MIN_BATCH_WORK = 0.002  # seconds of measured work per batch, at least
SPECULATE_AFTER = 0.005  # seconds: a first job still running then is slow; start the pool
_map_ids = itertools.count(1)


# ====================================================================================
# client side


def netcellfun(connections: Connections, fun: Callable[..., Any], *iterables: Iterable[Any],
               uniform_output: bool = True, error_handler: Callable[..., Any] | None = None,
               verbose: int = 0, chunk_size: int = 1, cum_func: Callable[..., Any] | None = None,
               nout: int = 1) -> Any:
    """Maps ``fun`` over equal-length iterables on the servers of ``connections``.

    ``fun(a[i], b[i], ...)`` runs on the servers (the local machine, if in ``connections``,
    is ignored) and within each over ``nlocaljobs`` local processes. Results come back in
    input order: a numpy array with ``uniform_output`` (scalars only), else a list; a tuple
    of those with ``nout > 1``; one accumulated value with ``cum_func(acc, x)``.

    Raises:
        RemoteError: an element raised and there is no ``error_handler`` (its index is in
            the message); or a job was lost with two servers.
        ConnectionClosed: no server is left.
        ValueError: bad arguments, or a non-scalar result with ``uniform_output``.
    """
    n, cols = cell_columns(iterables)
    return NetMap(connections, fun, cols, n, None, "cell", uniform_output=uniform_output,
                  error_handler=error_handler, verbose=verbose, chunk_size=chunk_size,
                  cum_func=cum_func, nout=nout, vectorized=False, name="netcellfun").run()


def netarrayfun(connections: Connections, fun: Callable[..., Any], *arrays: Any,
                uniform_output: bool = True, error_handler: Callable[..., Any] | None = None,
                verbose: int = 0, chunk_size: int = 1, cum_func: Callable[..., Any] | None = None,
                vectorized: bool = False, nout: int = 1) -> Any:
    """Maps ``fun`` element-wise over equal-shape array-likes on the servers; keeps the shape.

    As ``netcellfun``; with ``vectorized``, ``fun`` takes and returns whole chunks (1-d
    arrays of up to ``chunk_size`` elements).
    """
    shape, n, cols = array_columns(arrays)
    return NetMap(connections, fun, cols, n, shape, "array", uniform_output=uniform_output,
                  error_handler=error_handler, verbose=verbose, chunk_size=chunk_size,
                  cum_func=cum_func, nout=nout, vectorized=vectorized, name="netarrayfun").run()


def _on_map_frame(net: Network, k: int, f: Any) -> None:
    """Command-link frames other than ERROR/RESULT: map results go to their map."""
    if f.code != msg.MAP_RESULT:
        log.warning("unexpected message %s from %s", msg.NAMES.get(f.code, f.code), net.name(k))
        return
    map_id, results = serialize.loads(f.body, f.buffers)
    m = getattr(net, "active_maps", {}).get(map_id)
    if m is not None:
        m.inbox.extend((k, job, res, dt) for job, res, dt in results)


class NetMap:
    """One network map in progress (see the module docstring)."""

    def __init__(self, connections: Connections, fun: Callable[..., Any], cols: list[Sequence[Any]],
                 n: int, shape: tuple[int, ...] | None, kind: str, *, uniform_output: bool,
                 error_handler: Callable[..., Any] | None, verbose: int, chunk_size: int,
                 cum_func: Callable[..., Any] | None, nout: int, vectorized: bool, name: str) -> None:
        from ..client import _servers

        if not callable(fun):
            raise TypeError(f"{name}: fun must be callable")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be an int >= 1")
        if not isinstance(nout, int) or nout < 1:
            raise ValueError(f"{name}: nout must be an int >= 1")
        self.net, ks = _servers(connections, name)
        self.servers = [k for k in ks if self.net.nodes[k].open]
        if not self.servers:
            raise ConnectionClosed(f"{name}: no open server in these connections")
        self.fun, self.cols, self.n, self.name = fun, cols, n, name
        self.nout, self.vectorized = nout, vectorized
        self.error_handler, self.cum_func = error_handler, cum_func
        self.cs = chunk_size
        self.njobs = -(-n // chunk_size)
        self.asm = Assembler(n, shape=shape, nout=nout, uniform_output=uniform_output,
                             cum_func=cum_func, kind=kind, name=name)  # type: ignore[arg-type]
        self.verbose = verbose
        self.inbox: deque[tuple[int, tuple[int, int], ChunkResult, float]] = deque()
        self.work_time = 0.0  # measured run time of the jobs back so far, and their count
        self.work_jobs = 0
        self.map_id = next(_map_ids)

    def run(self) -> Any:
        """Runs the map to the end and returns its value."""
        if self.n == 0:
            return self.asm.result()
        net = self.net
        if not hasattr(net, "active_maps"):
            net.active_maps = {}  # type: ignore[attr-defined]
            net.cmd_handler = lambda k, f: _on_map_frame(net, k, f)
        net.active_maps[self.map_id] = self  # type: ignore[attr-defined]
        bar = None
        if self.verbose >= 1:
            from tqdm import tqdm

            bar = tqdm(total=self.n, file=sys.stderr, desc=self.name, unit="el")
        try:
            with net.read_lock:
                return self._run(bar)
        finally:
            net.active_maps.pop(self.map_id, None)  # type: ignore[attr-defined]
            if bar is not None:
                bar.close()

    def _send(self, k: int, payload: Any) -> bool:
        node = self.net.nodes[k]
        try:
            body, bufs, flags = serialize.dumps(payload)
            node.cmd.send_frame(msg.MAP, body, bufs, flags)  # type: ignore[union-attr]
            return True
        except ConnectionClosed:
            self.net._lost(k, "command link closed")
            return False

    def _run(self, bar: Any) -> Any:
        net = self.net
        cs, njobs = self.cs, self.njobs
        spec = {"fun": Shared(self.fun), "nout": self.nout, "vectorized": self.vectorized,
                "chunk_size": cs, "n": self.n,
                "error_handler": Shared(self.error_handler) if self.error_handler else None,
                "cum_func": Shared(self.cum_func) if self.cum_func else None}
        alive = [k for k in self.servers if self._send(k, ("start", self.map_id, spec))]
        # Job j covers elements [j*cs, min(n, (j+1)*cs)). Bookkeeping is per job range, in
        # numpy arrays, so a map of many tiny jobs costs no per-job Python objects.
        self.pending: deque[tuple[int, int]] = deque([(0, njobs)])
        self.npending = njobs
        self.done = np.zeros(njobs, dtype=bool)
        self.batch_of = np.full(njobs, -1, dtype=np.int64)
        self.owner = np.full(njobs, -1, dtype=np.int64)
        self.left: dict[int, int] = {}  # batch id -> jobs not yet back
        self.batches: dict[int, set[int]] = {k: set() for k in alive}  # server -> open batch ids
        self.lost_with = np.zeros(njobs, dtype=np.int8)
        self.alive = alive
        for _ in range(2):
            for k in list(alive):
                self._give(k)
        try:
            while not self.asm.done():
                if not self.inbox:
                    links = [net.nodes[k].cmd for k in alive]
                    ready = wait_links(links, time.monotonic() + 1.0)  # type: ignore[arg-type]
                    for pos in ready:
                        net.pump_cmd(alive[pos])
                    net.raise_errors(alive)
                while self.inbox:
                    k, (j0, j1), res, dt = self.inbox.popleft()
                    self.work_time += dt
                    self.work_jobs += j1 - j0
                    if self.done[j0]:  # rerun elsewhere after its server was lost
                        continue
                    if res.error is not None:
                        raise self._remote_error(k, res)
                    self.asm.add(res)
                    self.done[j0:j1] = True
                    if bar is not None:
                        bar.update(res.count)
                    bid = int(self.batch_of[j0])
                    self.left[bid] -= j1 - j0
                    if self.left[bid] <= 0:
                        self.batches[k].discard(bid)
                        if len(self.batches[k]) < 2 and k in alive:
                            self._give(k)
                self._handle_lost()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                net.interrupt(alive)  # first: it must find the running jobs still counted
            for k in alive:
                self._send(k, ("cancel", self.map_id))
            raise
        finally:
            for k in alive:
                self._send(k, ("end", self.map_id))
        return self.asm.result()

    def _give(self, k: int) -> None:
        """Sends server ``k`` its next batch (guided self-scheduling)."""
        if not self.npending:
            return
        # Guided self-scheduling; before any job's time is known, small batches: work sent to
        # a server cannot be taken back, and a busy server would sit on a large one.
        share = 2 if self.work_jobs else 8
        size = max(1, math.ceil(self.npending / (share * max(1, len(self.alive)))))
        if self.work_jobs and self.work_time > 0:
            # at least MIN_BATCH_WORK seconds of measured work per batch: tiny jobs need few messages
            size = max(size, math.ceil(MIN_BATCH_WORK * self.work_jobs / self.work_time))
        elif self.work_jobs:
            size = self.npending
        size = min(size, self.npending)
        bid = len(self.left)
        items = []
        taken: list[tuple[int, int]] = []
        while size:
            j0, j1 = self.pending.popleft()
            if j1 - j0 > size:
                self.pending.appendleft((j0 + size, j1))
                j1 = j0 + size
            size -= j1 - j0
            a, b = j0 * self.cs, min(self.n, j1 * self.cs)
            items.append((j0, j1, a, [c[a:b] for c in self.cols]))
            taken.append((j0, j1))
        njobs = sum(j1 - j0 for j0, j1 in taken)
        self.npending -= njobs
        if self._send(k, ("jobs", self.map_id, items)):
            for j0, j1 in taken:
                self.batch_of[j0:j1] = bid
                self.owner[j0:j1] = k
            self.left[bid] = njobs
            self.batches[k].add(bid)
        else:
            self.pending.extendleft(reversed(taken))
            self.npending += njobs

    def _handle_lost(self) -> None:
        gone = [k for k in self.alive if not self.net.nodes[k].open]
        if not gone:
            return
        for k in gone:
            self.alive.remove(k)
            self.batches.pop(k, None)
            lost = np.flatnonzero((self.owner == k) & ~self.done)
            self.owner[lost] = -1
            self.lost_with[lost] += 1
            twice = lost[self.lost_with[lost] >= 2]
            if twice.size:
                idx = int(twice[0]) * self.cs
                raise RemoteError(self.net.nodes[k].host, k, "ConnectionClosed",
                                  f"{self.name}: the job at element {idx} was lost with two servers "
                                  "that died while running it; not retried again")
            for j0, j1 in reversed(_runs(lost.tolist())):
                self.pending.appendleft((j0, j1))
            self.npending += lost.size
            if lost.size:
                log.warning("%s: %s died; rerunning %d jobs elsewhere", self.name, self.net.name(k), lost.size)
        if not self.alive:
            raise ConnectionClosed(f"{self.name}: every server has gone")
        for k in self.alive:
            while len(self.batches[k]) < 2 and self.npending:
                self._give(k)

    def _remote_error(self, k: int, res: ChunkResult) -> RemoteError:
        index, identifier, message, tb = res.error  # type: ignore[misc]
        err = RemoteError(self.net.nodes[k].host, k, identifier,
                          f"{self.name}: element {index} raised {identifier}: {message}", tb, res.exception)
        err.index = index  # type: ignore[attr-defined]
        if res.exception is not None:
            err.__cause__ = res.exception
        return err


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[j0, j1)`` of a list of job ids, in order."""
    out: list[tuple[int, int]] = []
    for j in ids:
        if out and out[-1][1] == j:
            out[-1] = (out[-1][0], j + 1)
        else:
            out.append((j, j + 1))
    return out


# ====================================================================================
# worker side


class _WMap:
    def __init__(self, map_id: int, spec: dict[str, Any]) -> None:
        self.map_id = map_id
        self.spec = spec
        self.queue: deque[list[Any]] = deque()  # runs: [j0, j1, start, args]
        self.cs = int(spec.get("chunk_size", 1))
        self.mode: str | None = None
        self.inflight = 0
        self.cancelled = False
        self.lock = threading.Lock()

    def pop_job(self) -> tuple[tuple[int, int], int, list[Any]]:
        """Takes the first job of the first run."""
        run = self.queue[0]
        j0, j1, start, args = run
        if j1 - j0 == 1:
            self.queue.popleft()
            return (j0, j1), start, args
        cs = self.cs
        run[0], run[2], run[3] = j0 + 1, start + cs, [a[cs:] for a in args]
        return (j0, j0 + 1), start, [a[:cs] for a in args]

    def pop_run(self) -> tuple[tuple[int, int], int, list[Any]]:
        """Takes the whole first run (one job when vectorized: chunk_size is its limit)."""
        if self.spec["vectorized"]:
            return self.pop_job()
        j0, j1, start, args = self.queue.popleft()
        return (j0, j1), start, args

    def task(self, start: int, args: list[Any]) -> ChunkTask:
        s = self.spec
        return ChunkTask(s["fun"], args, start, nout=s["nout"], vectorized=s["vectorized"],
                         error_handler=s["error_handler"], cum_func=s["cum_func"])


_NOOP_TASK = ChunkTask(abs, [[0]], 0)


class WorkerMapRunner:
    """Runs map jobs on a server worker (see the module docstring)."""

    def __init__(self, worker: Any) -> None:
        self.w = worker
        self.maps: dict[int, _WMap] = {}
        self._pool: Any = None
        self._pool_n = 0
        self._pool_lock = threading.Lock()
        self._pool_warm = False
        self.pool_jobs = 0  # jobs running in the pool, over all maps (an ended map's too)
        # The probe of a map's first job runs in this thread; if it is still running after
        # SPECULATE_AFTER, the speculator thread starts nlocaljobs - 1 jobs in the pool.
        self._spec_cv = threading.Condition()
        self._probing: tuple[_WMap, float] | None = None
        self._speculator: threading.Thread | None = None

    def nlocal(self) -> int:
        """Local processes for map jobs: ``nlocaljobs``, or the processor count when 0."""
        return self.w.nlocaljobs or len(os.sched_getaffinity(0))

    def run(self, payload: tuple[Any, ...]) -> None:
        """Handles one MAP command."""
        kind, map_id = payload[0], payload[1]
        if kind == "start":
            self.maps[map_id] = _WMap(map_id, payload[2])
            if self.nlocal() > 1 and self._pool is None:
                threading.Thread(target=self._warm_pool, daemon=True, name="parnet-pool-start").start()
            return
        m = self.maps.get(map_id)
        if m is None:
            return
        if kind == "jobs":
            m.queue.extend(list(item) for item in payload[2])
            self._pump(m)
        elif kind == "cancel":
            with m.lock:
                m.cancelled = True
                m.queue.clear()
        elif kind == "end":
            with m.lock:
                m.cancelled = True
                m.queue.clear()
            self.maps.pop(map_id, None)

    def _start_speculator(self) -> None:
        if self._speculator is None:
            self._speculator = threading.Thread(target=self._speculate, daemon=True, name="parnet-speculator")
            self._speculator.start()

    def _speculate(self) -> None:
        """Starts pool jobs for a probe that takes long (a slow first job of a map)."""
        while True:
            with self._spec_cv:
                while self._probing is None:
                    self._spec_cv.wait()
                probe = self._probing
                left = probe[1] + SPECULATE_AFTER - time.monotonic()
                if left > 0:
                    self._spec_cv.wait(left)
                    if self._probing is not probe or time.monotonic() < probe[1] + SPECULATE_AFTER:
                        continue  # that probe ended (or a spurious wake-up)
                self._probing = None
            self._fill(probe[0], limit=self.nlocal() - 1)

    def _warm_pool(self) -> None:
        """Starts the pool off the main thread; maps still probing their first job get
        ``nlocaljobs - 1`` jobs started there at once (the probe may take long)."""
        try:
            pool = self._get_pool()
            pool.submit(_NOOP_TASK).result(timeout=60)  # processes up and importable
            self._pool_warm = True
        except Exception as e:  # noqa: BLE001 - the map will report its own errors
            log.warning("local pool did not start: %s", e)
            return
        for m in list(self.maps.values()):
            if m.mode is None:
                self._fill(m, limit=self.nlocal() - 1)

    def _get_pool(self) -> Any:
        n = self.nlocal()
        with self._pool_lock:
            if self._pool is None or self._pool_n < n:
                from .pool import get_pool

                self._pool = get_pool(n)
                self._pool_n = n
            return self._pool

    def _send(self, m: _WMap, results: list[tuple[tuple[int, int], ChunkResult, float]]) -> None:
        if not results:
            return
        try:
            body, bufs, flags = serialize.dumps((m.map_id, results))
        except Exception:  # noqa: BLE001 - an output that cannot travel fails its element
            import pickle

            fixed = [(j, pickle.loads(dumps_result(r)), dt) for j, r, dt in results]
            body, bufs, flags = serialize.dumps((m.map_id, fixed))
        with contextlib.suppress(OSError):
            self.w.cmd.send_frame(msg.MAP_RESULT, body, bufs, flags)

    def _run_here(self, m: _WMap, first_only: bool = False) -> float:
        """Runs queued jobs in this process; returns the duration of the last one."""
        out: list[tuple[tuple[int, int], ChunkResult, float]] = []
        last_send = time.monotonic()
        dt = 0.0
        while True:
            with m.lock:
                if not m.queue or m.cancelled:
                    break
                j, start, args = m.pop_job() if first_only else m.pop_run()
            t = time.perf_counter()
            res = run_chunk(m.task(start, args))
            dt = time.perf_counter() - t
            out.append((j, res, dt))
            if first_only:
                break
            if time.monotonic() - last_send > _SEND_EVERY:
                self._send(m, out)
                out = []
                last_send = time.monotonic()
        self._send(m, out)
        return dt

    def _pump(self, m: _WMap) -> None:
        nloc = self.nlocal()
        if m.mode is None:
            speculate = nloc > 1 and self._pool is not None and self._pool_warm
            if speculate:
                self._start_speculator()
                with self._spec_cv:
                    self._probing = (m, time.monotonic())
                    self._spec_cv.notify()
            dt = self._run_here(m, first_only=True)
            if speculate:
                with self._spec_cv:
                    self._probing = None
                    self._spec_cv.notify()
            m.mode = "here" if nloc == 1 or dt < FAST_JOB else "pool"
        if m.mode == "here":
            self._run_here(m)
        else:
            self._fill(m)

    def _fill(self, m: _WMap, limit: int | None = None) -> None:
        # Twice the processes: each has its next job queued in the pool already, so no slot
        # waits for our completion callback to submit one (the jobs are this server's anyway).
        cap = 2 * self.nlocal() if limit is None else limit
        pool = self._pool if limit is not None else self._get_pool()
        if pool is None:
            return
        while True:
            with m.lock:
                if m.cancelled or not m.queue or m.inflight >= cap:
                    return
                j, start, args = m.pop_job()
                m.inflight += 1
                self.pool_jobs += 1
            t0 = time.perf_counter()
            try:
                fut = pool.submit(m.task(start, args))
            except Exception as e:  # noqa: BLE001 - a broken pool fails this job, clearly
                with m.lock:
                    m.inflight -= 1
                    self.pool_jobs -= 1
                self._send(m, [(j, error_result(start, len(args[0]) if args else 0, start, e), 0.0)])
                continue
            count = len(args[0]) if args else 0
            fut.add_done_callback(lambda f, j=j, start=start, n=count, t0=t0: self._done(m, j, start, n, f, t0))

    def _done(self, m: _WMap, j: tuple[int, int], start: int, count: int, fut: Any, t0: float) -> None:
        with m.lock:
            m.inflight -= 1
            self.pool_jobs -= 1
            cancelled = m.cancelled
        if cancelled:
            return
        try:
            res = fut.result()
        except BaseException as e:  # noqa: BLE001 - e.g. a pool process died
            res = error_result(start, count, start, e if isinstance(e, Exception) else RuntimeError(str(e)))
        self._send(m, [(j, res, time.perf_counter() - t0)])
        self._fill(m)

    def interrupt(self) -> None:
        """Ctrl-C at the client: drop every queued job and stop the jobs running in the pool
        (its processes are killed; a new pool starts with the next map)."""
        for m in list(self.maps.values()):
            with m.lock:
                m.cancelled = True
                m.queue.clear()
        if self.pool_jobs > 0 and self._pool is not None:
            pool, self._pool, self._pool_warm = self._pool, None, False
            with contextlib.suppress(Exception):
                pool.shutdown(kill=True)

    def close(self, kill: bool = False) -> None:
        """Stops the maps and the local pool."""
        for m in self.maps.values():
            m.cancelled = True
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.shutdown(kill=kill)
