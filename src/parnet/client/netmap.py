"""netcellfun / netarrayfun: a map over the servers, and over the cores of each server.

Theory of operation. Two levels of scheduling:

* **Client, over servers** (``NetMap``): the elements are cut into jobs of ``chunk_size``.
  Jobs travel in *batches*, sized by guided self-scheduling (``ceil(remaining / (2 *
  servers))``, shrinking as the map proceeds), and every server keeps two batches in
  flight, so no server waits on a round trip and a fast server simply gets more. One
  message carries a whole batch, so 2000 trivial calls cost a handful of messages, not
  2000 (``chunk_size`` stays the unit of local scheduling and of error reporting).
  A map starts on ``FIRST_SERVERS`` servers only and spreads to more as its measured work
  pays for them (``SERVER_WORK`` seconds of work left per server, each server's first
  result, its probe, left out of that estimate: a first call is often slower than the
  rest). It spreads to all of them at once when a server reports its probe slow (an empty
  ``MAP_RESULT``: a job still running after ``SPECULATE_AFTER`` of busy time), or when no
  result is back after ``FANOUT_AFTER``: a tiny map does not pay for a message to every
  server of a large network, a slow one loses a few milliseconds.
* **Worker, over its cores** (``WorkerMapRunner``): the first job of a map runs in the
  worker process itself and is timed by its *busy* time (wall time minus the time the
  thread waited for a CPU: a loaded host does not make a trivial job look slow). Jobs
  faster than ``FAST_JOB`` keep running in-process: a process hop would cost more than
  the call, and no pool is started for them. A first job still busy after
  ``SPECULATE_AFTER`` starts the local pool (or, if it is warm, ``nlocaljobs - 1`` jobs
  there at once) and tells the client; slower jobs go to the reusable local pool
  (``maps.pool``), ``nlocaljobs`` at a time, fed from the pool's completion callbacks,
  each result sent back as soon as it is ready.

Results come back as ``MAP_RESULT`` frames on the command link and go into an
``Assembler`` in any order. A failing element without ``error_handler`` cancels the map
everywhere and raises ``RemoteError`` naming its index; the network stays usable (late
results of a cancelled map are dropped by map id). A server that dies mid-map has its
unfinished jobs rerun on the others; a job that was running on two servers that died is
not tried a third time.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import ConnectionClosed, RemoteError
from ..maps.common import (
    Assembler,
    ChunkResult,
    Shared,
    array_columns,
    cell_columns,
)
from ..network import Connections
from ..transport.link import wait_links
from ..wire import messages as msg
from .api import servers_of
from .session import ClientSession

log = logging.getLogger(__name__)

FAST_JOB = 0.0005  # seconds: faster jobs run in the worker process itself
_SEND_EVERY = 0.02  # seconds: in-process runs report at least this often
MIN_BATCH_WORK = 0.002  # seconds of measured work per batch, at least
SPECULATE_AFTER = 0.005  # seconds: a first job still running then is slow; start the pool
FIRST_SERVERS = 2  # servers a map starts on; more join as its measured work pays for them
SERVER_WORK = 0.01  # seconds of measured work left per server, at least, to bring one in
FANOUT_AFTER = 0.1  # seconds: no result back by then (and no slow notice), use every server
_map_ids = itertools.count(1)


# ====================================================================================
# client side


def netcellfun(
    connections: Connections,
    fun: Callable[..., Any],
    *iterables: Iterable[Any],
    uniform_output: bool = True,
    error_handler: Callable[..., Any] | None = None,
    verbose: int = 0,
    chunk_size: int = 1,
    cum_func: Callable[..., Any] | None = None,
    nout: int = 1,
) -> Any:
    """Maps ``fun`` over equal-length iterables on the servers of ``connections``.

    ``fun(a[i], b[i], ...)`` runs on the servers (the local machine, if in ``connections``,
    is ignored) and within each over ``nlocaljobs`` local processes (``network_set``).
    Elements travel in jobs of ``chunk_size``; each server keeps work queued, so a fast
    server gets more of it. Jobs that take under half a millisecond run in the server's
    worker process itself, slower ones in its local pool. If a server dies during the map,
    its unfinished jobs rerun on the others (beyond Octave).

    Args:
        connections: the servers to use (all of a network, a subset or one server).
        fun: any callable (lambdas and closures included: sent with cloudpickle).
        *iterables: equal-length iterables, one per argument of ``fun``.
        uniform_output: ``True``: every result must be a scalar (number or bool) and the
            result is a NumPy array of shape ``(n,)``; ``False``: a list.
        error_handler: called as ``error_handler(err, *args)`` in place of a call of
            ``fun`` that raised; its return value stands in for the result. ``err`` has
            ``message``, ``identifier`` (the exception type's name) and ``index`` (0-based
            position). It runs on the server, like ``fun``.
        verbose: ``>= 1`` shows a progress bar (tqdm) on stderr.
        chunk_size: elements per job (>= 1). Larger chunks cut per-job overhead for tiny
            calls; the default 1 balances best when calls are slow or uneven.
        cum_func: instead of all results, return one value accumulated with this
            commutative, associative function: ``cum_func(acc, x)`` (with ``nout=k``:
            ``cum_func(acc_1..acc_k, x_1..x_k)`` returning a k-tuple). ``None`` for no
            elements.
        nout: ``fun`` returns an ``nout``-tuple; a tuple of ``nout`` results is returned.

    Returns:
        The results in input order: a NumPy array (``uniform_output``) or a list; a tuple of
        those with ``nout > 1``; one value with ``cum_func``.

    Raises:
        RemoteError: an element raised and there is no ``error_handler`` (its index is in
            the message; the map is stopped everywhere and the network stays usable); or a
            job was lost with two servers.
        ConnectionClosed: no server is left.
        ValueError: bad arguments, unequal lengths, or a non-scalar result with
            ``uniform_output``.
        TypeError: ``fun`` is not callable.
    """
    n, cols = cell_columns(iterables)
    return NetMap(
        connections,
        fun,
        cols,
        n,
        None,
        "cell",
        uniform_output=uniform_output,
        error_handler=error_handler,
        verbose=verbose,
        chunk_size=chunk_size,
        cum_func=cum_func,
        nout=nout,
        vectorized=False,
        name="netcellfun",
    ).run()


def netarrayfun(
    connections: Connections,
    fun: Callable[..., Any],
    *arrays: Any,
    uniform_output: bool = True,
    error_handler: Callable[..., Any] | None = None,
    verbose: int = 0,
    chunk_size: int = 1,
    cum_func: Callable[..., Any] | None = None,
    vectorized: bool = False,
    nout: int = 1,
) -> Any:
    """Maps ``fun`` element-wise over equal-shape array-likes on the servers; keeps the shape.

    Works as ``netcellfun``; elements are taken in C order and the results keep the
    arrays' shape (an object array when ``uniform_output=False``). ``uniform_output``,
    ``error_handler``, ``verbose``, ``chunk_size``, ``cum_func`` and ``nout`` are as in
    ``netcellfun``.

    Args:
        connections: the servers to use.
        fun: any callable, called as ``fun(a.flat[i], b.flat[i], ...)``.
        *arrays: equal-shape array-likes, one per argument of ``fun``.
        vectorized: ``fun`` takes whole chunks (1-d arrays of up to ``chunk_size``
            elements, one per argument) and returns arrays of the chunk's length (with
            ``cum_func``: the chunk's accumulated value); ``error_handler`` likewise, with
            ``err.index`` the chunk's first position.

    Returns:
        The results, of the arrays' shape (see ``netcellfun``).

    Raises:
        ValueError: as in ``netcellfun``, and for shapes that differ. Other errors as in
            ``netcellfun``.
    """
    shape, n, cols = array_columns(arrays)
    return NetMap(
        connections,
        fun,
        cols,
        n,
        shape,
        "array",
        uniform_output=uniform_output,
        error_handler=error_handler,
        verbose=verbose,
        chunk_size=chunk_size,
        cum_func=cum_func,
        nout=nout,
        vectorized=vectorized,
        name="netarrayfun",
    ).run()


class MapSession:
    """What every map on the network shares: its id, the routing of its ``MAP_RESULT``
    frames (read by whichever thread reads the command links) to ``deliver``, its ``MAP``
    frames, and the ``RemoteError`` of a failed job. ``NetMap`` runs a map of known length;
    ``parnet.client.executor`` a call stream."""

    def __init__(self, net: ClientSession) -> None:
        self.net = net
        self.map_id = next(_map_ids)
        self.inbox: deque[tuple[int, tuple[int, int], ChunkResult, float]] = deque()

    def deliver(self, k: int, results: list[tuple[tuple[int, int], ChunkResult, float]]) -> None:
        """Results from server ``k`` (called by the thread that read them); none: server
        ``k`` reports its first job slow."""
        if not results:
            self.slow = True
        self.inbox.extend((k, job, res, dt) for job, res, dt in results)

    slow = False  # a server reported a slow first job

    def register(self) -> None:
        """Routes this map's results to ``deliver`` from now on."""
        self.net.maps[self.map_id] = self

    def unregister(self) -> None:
        """Late results of this map are dropped from now on."""
        self.net.maps.pop(self.map_id, None)

    def _send(self, k: int, *cmds: msg.MapStart | msg.MapJobs | msg.MapCancel | msg.MapEnd) -> bool:
        """Sends ``cmds`` to server ``k`` in one write; False if its link is gone (the server
        is then marked lost)."""
        node = self.net.nodes[k]
        try:
            node.cmd.send_frames([msg.encode(c) for c in cmds])  # type: ignore[union-attr]
            return True
        except ConnectionClosed:
            self.net.lost(k, "command link closed")
            return False

    def job_error(self, k: int, res: ChunkResult, what: str) -> RemoteError:
        """The ``RemoteError`` for the failed job ``res`` from server ``k``; ``what`` starts
        the message (e.g. "netcellfun: element 3")."""
        assert res.error is not None
        index, identifier, message, tb = res.error
        return msg.remote_error(
            self.net.nodes[k].host,
            k,
            identifier,
            f"{what} raised {identifier}: {message}",
            tb,
            res.exception,
            index=index,
        )


class NetMap(MapSession):
    """One network map in progress (see the module docstring)."""

    def __init__(
        self,
        connections: Connections,
        fun: Callable[..., Any],
        cols: Sequence[Any],
        n: int,
        shape: tuple[int, ...] | None,
        kind: str,
        *,
        uniform_output: bool,
        error_handler: Callable[..., Any] | None,
        verbose: int,
        chunk_size: int,
        cum_func: Callable[..., Any] | None,
        nout: int,
        vectorized: bool,
        name: str,
    ) -> None:
        if not callable(fun):
            raise TypeError(f"{name}: fun must be callable")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be an int >= 1")
        if not isinstance(nout, int) or nout < 1:
            raise ValueError(f"{name}: nout must be an int >= 1")
        if not isinstance(verbose, int):
            raise TypeError(
                f"{name}: verbose must be an int (0: quiet, 1: progress bar), got {verbose!r:.40}"
            )
        net, ks = servers_of(connections, name)
        if not ks:
            raise ValueError(
                f"{name}: no servers in these connections (node 0 is this machine; "
                "use connections[1:])"
            )
        super().__init__(net)
        self.servers = [k for k in ks if self.net.nodes[k].open]
        if not self.servers:
            raise ConnectionClosed(f"{name}: no open server in these connections")
        self.fun, self.cols, self.n, self.name = fun, cols, n, name
        self.nout, self.vectorized = nout, vectorized
        self.error_handler, self.cum_func = error_handler, cum_func
        self.cs = chunk_size
        self.njobs = -(-n // chunk_size)
        self.asm = Assembler(
            n,
            shape=shape,
            nout=nout,
            uniform_output=uniform_output,
            cum_func=cum_func,
            kind=kind,  # type: ignore[arg-type]
            name=name,
        )
        self.verbose = verbose
        self.work_time = 0.0  # measured run time of the jobs back so far, and their count
        self.work_jobs = 0
        self.probed: set[int] = set()  # servers whose first result (the probe) is back

    def run(self) -> Any:
        """Runs the map to the end and returns its value."""
        if self.n == 0:
            return self.asm.result()
        net = self.net
        self.register()
        bar = None
        if self.verbose >= 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n, file=sys.stderr, desc=self.name, unit="el")
        try:
            with net.read_lock:
                return self._run(bar)
        finally:
            self.unregister()
            if bar is not None:
                bar.close()

    def _run(self, bar: Any) -> Any:  # noqa: C901
        net = self.net
        cs, njobs = self.cs, self.njobs
        spec = {
            "fun": Shared(self.fun),
            "nout": self.nout,
            "vectorized": self.vectorized,
            "chunk_size": cs,
            "n": self.n,
            "error_handler": Shared(self.error_handler) if self.error_handler else None,
            "cum_func": Shared(self.cum_func) if self.cum_func else None,
        }
        self.spec = spec
        alive = list(self.servers)
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
        self.active: list[int] = []  # the servers this map was started on
        self.t0 = time.monotonic()
        self._engage(FIRST_SERVERS)
        try:
            while not self.asm.done():
                if not self.inbox:
                    links = [net.nodes[k].cmd for k in alive]
                    deadline = time.monotonic() + 1.0
                    if (
                        len(self.active) < len(alive)
                        and self.npending
                        and not self.work_jobs
                        and not self.slow
                    ):
                        deadline = min(deadline, self.t0 + FANOUT_AFTER)
                    ready = wait_links(links, deadline)  # type: ignore[arg-type]
                    for pos in ready:
                        net.pump_cmd(alive[pos])
                    net.raise_errors(alive)
                while self.inbox:
                    k, (j0, j1), res, dt = self.inbox.popleft()
                    if k in self.probed:
                        self.work_time += dt
                        self.work_jobs += j1 - j0
                    self.probed.add(k)
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
                self._widen()
        except BaseException as e:
            started = [k for k in self.active if k in alive]
            if isinstance(e, KeyboardInterrupt):
                net.interrupt(started)  # first: it must find the running jobs still counted
            for k in started:
                self._send(k, msg.MapCancel(self.map_id))
            raise
        finally:
            for k in self.active:
                if k in alive:
                    self._send(k, msg.MapEnd(self.map_id))
        return self.asm.result()

    def _engage(self, want: int) -> None:
        """Starts the map on more servers, up to ``want`` in all; each gets two batches."""
        for k in self.alive:
            if len(self.active) >= want or not self.npending:
                return
            if k in self.active:
                continue
            if self._give(k, 2, msg.MapStart(self.map_id, self.spec)):
                self.active.append(k)

    def _widen(self) -> None:
        """Brings in as many more servers as the work left pays for (see the module docstring)."""
        if len(self.active) >= len(self.alive) or not self.npending:
            return
        if self.slow:
            self._engage(len(self.alive))
        elif self.work_jobs and self.work_time > 0:
            left = self.npending * self.work_time / self.work_jobs
            self._engage(math.ceil(left / SERVER_WORK))
        elif not self.work_jobs and time.monotonic() >= self.t0 + FANOUT_AFTER:
            self._engage(len(self.alive))

    def _give(self, k: int, batches: int = 1, start: msg.MapStart | None = None) -> bool:
        """Sends server ``k`` its next ``batches`` batches (guided self-scheduling), after
        ``start`` if given, in one write (the worker wakes up once). False if the send
        failed: the server is then lost and the jobs stay pending."""
        given: list[tuple[int, list[tuple[int, int]], int]] = []  # batch id, job runs, jobs
        cmds: list[msg.MapStart | msg.MapJobs] = [] if start is None else [start]
        for _ in range(batches):
            if not self.npending:
                break
            # Guided self-scheduling; before any job's time is known, small batches: work
            # sent to a server cannot be taken back, and a busy server would sit on a large one.
            share = 2 if self.work_jobs else 8
            size = max(1, math.ceil(self.npending / (share * max(1, len(self.alive)))))
            if self.work_jobs and self.work_time > 0:
                # at least MIN_BATCH_WORK seconds of measured work per batch: tiny jobs need
                # few messages
                size = max(size, math.ceil(MIN_BATCH_WORK * self.work_jobs / self.work_time))
            elif self.work_jobs:
                size = self.npending
            size = min(size, self.npending)
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
            given.append((len(self.left) + len(given), taken, njobs))
            cmds.append(msg.MapJobs(self.map_id, items))
        if not cmds:
            return True
        if not self._send(k, *cmds):
            for _, taken, njobs in reversed(given):
                self.pending.extendleft(reversed(taken))
                self.npending += njobs
            return False
        for bid, taken, njobs in given:
            for j0, j1 in taken:
                self.batch_of[j0:j1] = bid
                self.owner[j0:j1] = k
            self.left[bid] = njobs
            self.batches[k].add(bid)
        return True

    def _handle_lost(self) -> None:
        gone = [k for k in self.alive if not self.net.nodes[k].open]
        if not gone:
            return
        for k in gone:
            self.alive.remove(k)
            if k in self.active:
                self.active.remove(k)
            self.batches.pop(k, None)
            lost = np.flatnonzero((self.owner == k) & ~self.done)
            self.owner[lost] = -1
            self.lost_with[lost] += 1
            twice = lost[self.lost_with[lost] >= 2]
            if twice.size:
                idx = int(twice[0]) * self.cs
                raise msg.remote_error(
                    self.net.nodes[k].host,
                    k,
                    "ConnectionClosed",
                    f"{self.name}: the job at element {idx} was lost with two servers "
                    "that died while running it; not retried again",
                )
            for j0, j1 in reversed(_runs(lost.tolist())):
                self.pending.appendleft((j0, j1))
            self.npending += lost.size
            if lost.size:
                log.warning(
                    "%s: %s died; rerunning %d jobs elsewhere",
                    self.name,
                    self.net.name(k),
                    lost.size,
                )
        if not self.alive:
            raise ConnectionClosed(f"{self.name}: every server has gone")
        if not self.active:
            self._engage(FIRST_SERVERS)
        for k in self.active:
            while len(self.batches[k]) < 2 and self.npending and self._give(k):
                pass

    def _remote_error(self, k: int, res: ChunkResult) -> RemoteError:
        return self.job_error(k, res, f"{self.name}: element {res.error[0]}")  # type: ignore[index]


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[j0, j1)`` of a list of job ids, in order."""
    out: list[tuple[int, int]] = []
    for j in ids:
        if out and out[-1][1] == j:
            out[-1] = (out[-1][0], j + 1)
        else:
            out.append((j, j + 1))
    return out
