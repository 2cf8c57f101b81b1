"""The worker side of network maps: runs the jobs a client's ``NetMap`` sends, in the worker
process itself or on the local process pool (see ``parnet.client.netmap`` for the theory of
operation).

A *call stream* (``spec["stream"]``, the maps of ``parnet.Executor``) is a map without a
fixed length: jobs (one call each) keep coming until the client ends it, and every job gets
an answer, whatever happens. Its mode is decided per job: calls run in this process while
they are fast; a call that runs ``SPECULATE_AFTER`` or longer moves the stream to the pool
(``nlocaljobs`` calls at once), where it stays. An interrupt, or the client's ``cancel``,
answers every queued call with ``JobInterrupted`` and stops the running ones (they answer
``JobInterrupted`` too), but leaves the stream open for more calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..maps.common import (
    ChunkResult,
    ChunkTask,
    JobInterrupted,
    dumps_result,
    error_result,
    run_chunk,
)
from ..wire import messages as msg

log = logging.getLogger(__name__)

FAST_JOB = 0.0005  # seconds: faster jobs run in the worker process itself
_SEND_EVERY = 0.02  # seconds: in-process runs report at least this often
SPECULATE_AFTER = 0.005  # seconds: a first job still running then is slow; start the pool


def busy_clock(tid: int | None = None) -> float:
    """Seconds on a clock that stops while the thread ``tid`` (this one by default) waits for
    a CPU: wall time minus the thread's run-queue wait (``/proc/.../schedstat``).

    A job's time on it is what the job itself takes, computing or blocked (``sleep``, I/O),
    but not the time a loaded host kept it off the CPU: a trivial job never looks slow and
    never starts a pool for nothing. Plain wall time where the kernel keeps no schedstat.
    """
    tid = tid or threading.get_native_id()
    now = time.monotonic()
    for _ in range(2):
        fd = _schedstat_fds.get(tid)
        try:
            if fd is None:
                fd = _schedstat_fds[tid] = os.open(
                    f"/proc/self/task/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC
                )
            return now - int(os.pread(fd, 64, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            if fd is None:
                break  # no schedstat here
            with contextlib.suppress(OSError):  # a thread that ended (its id now reused?)
                os.close(_schedstat_fds.pop(tid))
    return now


_schedstat_fds: dict[int, int] = {}  # thread id -> open /proc/self/task/<tid>/schedstat
os.register_at_fork(after_in_child=_schedstat_fds.clear)


def _busy_since(start: float, wall: float, tid: int | None = None) -> float:
    """The busy time since ``start`` (``busy_clock``) of a job that took ``wall`` seconds;
    the clock is read only when the wall time alone says the job is slow."""
    return wall if wall < FAST_JOB else busy_clock(tid) - start


class _WMap:
    def __init__(self, map_id: int, spec: dict[str, Any]) -> None:
        self.map_id = map_id
        self.spec = spec
        self.queue: deque[list[Any]] = deque()  # runs: [j0, j1, start, args]
        self.cs = int(spec.get("chunk_size", 1))
        self.mode: str | None = None
        self.inflight = 0
        self.cancelled = False
        self.stream = bool(spec.get("stream"))
        self.fast_streak = 0  # stream: pool calls in a row that ran faster than FAST_JOB
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
        return ChunkTask(
            s["fun"],
            args,
            start,
            nout=s["nout"],
            vectorized=s["vectorized"],
            error_handler=s["error_handler"],
            cum_func=s["cum_func"],
        )


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
        self._pool_starting = False  # _warm_pool started for the current pool
        self.pool_jobs = 0  # jobs running in the pool, over all maps (an ended map's too)
        # The probe of a map's first job runs in this thread; if it is still running after
        # SPECULATE_AFTER, the speculator thread starts nlocaljobs - 1 jobs in the pool.
        self._spec_cv = threading.Condition()
        self._probing: tuple[_WMap, float, int] | None = None  # map, busy_clock at start, thread
        self._speculator: threading.Thread | None = None
        self.interrupts = 0  # interrupts so far: a pool job failing after one was stopped by it

    def nlocal(self) -> int:
        """Local processes for map jobs: ``nlocaljobs``, or the processor count when 0."""
        return self.w.nlocaljobs or len(os.sched_getaffinity(0))

    def run(self, cmd: msg.MapStart | msg.MapJobs | msg.MapCancel | msg.MapEnd) -> None:
        """Handles one MAP command (a table from the command's class to its handler)."""
        if type(cmd) is msg.MapStart:
            self._start(cmd)
            return
        m = self.maps.get(cmd.map_id)
        if m is not None:
            self._handlers[type(cmd)](self, m, cmd)

    def _start(self, cmd: msg.MapStart) -> None:
        # No pool yet: it starts only when a job proves slow (see _speculate), so a map of
        # trivial calls never starts processes. What starting it imports is imported here,
        # not in that thread (user code may be importing meanwhile): once per worker.
        self.maps[cmd.map_id] = _WMap(cmd.map_id, cmd.spec)
        if self.nlocal() > 1:
            from ..maps.pool import preload

            preload()

    def _start_pool(self) -> None:
        """Starts the local pool in the background, once (until it is shut down)."""
        with self._pool_lock:
            if self._pool_starting:
                return
            self._pool_starting = True
        threading.Thread(target=self._warm_pool, daemon=True, name="parnet-pool-start").start()

    def _jobs(self, m: _WMap, cmd: msg.MapJobs) -> None:
        m.queue.extend(list(item) for item in cmd.items)
        self._pump(m)

    def _cancel(self, m: _WMap, cmd: msg.MapCancel) -> None:
        if m.stream:
            self._drop(m)
            return
        with m.lock:
            m.cancelled = True
            m.queue.clear()

    def _end(self, m: _WMap, cmd: msg.MapEnd) -> None:
        with m.lock:
            m.cancelled = True
            m.queue.clear()
        self.maps.pop(cmd.map_id, None)

    _handlers: dict[type, Callable[[WorkerMapRunner, _WMap, Any], None]] = {
        msg.MapJobs: _jobs,
        msg.MapCancel: _cancel,
        msg.MapEnd: _end,
    }

    def _start_speculator(self) -> None:
        if self._speculator is None:
            self._speculator = threading.Thread(
                target=self._speculate, daemon=True, name="parnet-speculator"
            )
            self._speculator.start()

    def _speculate(self) -> None:
        """Starts the pool, or pool jobs, for a probe that takes long (a slow first job of
        a map, or a slow call of a stream): ``SPECULATE_AFTER`` on its ``busy_clock``."""
        while True:
            with self._spec_cv:
                while self._probing is None:
                    self._spec_cv.wait()
                probe = self._probing
                left = probe[1] + SPECULATE_AFTER - busy_clock(probe[2])
                if left > 0:
                    self._spec_cv.wait(max(left, 0.001))
                    continue  # ended, or check its busy time again
                self._probing = None
            m = probe[0]
            if m.stream:
                m.mode = "pool"  # a slow call: this stream's calls go to the pool now
            else:  # a slow first job: the client spreads the map over every server now
                with contextlib.suppress(OSError):
                    self.w.cmd.send_frame(*msg.encode(msg.MapResult(m.map_id, [])))
            if self.nlocal() <= 1:
                continue
            if self._pool is not None and self._pool_warm:
                self._fill(m, limit=self.nlocal() - 1)
            else:
                self._start_pool()  # which starts nlocaljobs - 1 jobs of maps still probing

    def _probe(self, m: _WMap) -> None:
        """The thread's next job is ``m``'s probe (the speculator watches it)."""
        self._start_speculator()
        with self._spec_cv:
            self._probing = (m, busy_clock(), threading.get_native_id())
            self._spec_cv.notify()

    def _probe_end(self) -> None:
        with self._spec_cv:
            self._probing = None
            self._spec_cv.notify()

    def _warm_pool(self) -> None:
        """Starts the pool off the main thread; maps still probing their first job get
        ``nlocaljobs - 1`` jobs started there at once (the probe may take long)."""
        try:
            pool = self._get_pool()
            pool.submit(_NOOP_TASK).result(timeout=60)  # processes up and importable
            self._pool_warm = True
        except Exception as e:  # noqa: BLE001 - the map will report its own errors
            log.warning("local pool did not start: %s", e)
            self._pool_starting = False
            return
        for m in list(self.maps.values()):
            if m.mode is None:
                self._fill(m, limit=self.nlocal() - 1)

    def _get_pool(self) -> Any:
        n = self.nlocal()
        with self._pool_lock:
            if self._pool is None or self._pool_n < n or self._pool.closed:
                from ..maps.pool import get_pool

                self._pool = get_pool(n)
                self._pool_n = n
            return self._pool

    def _send(self, m: _WMap, results: list[tuple[tuple[int, int], ChunkResult, float]]) -> None:
        if not results:
            return
        try:
            frame = msg.encode(msg.MapResult(m.map_id, results))
        except Exception:  # noqa: BLE001 - an output that cannot travel fails its element
            import pickle

            fixed = [(j, pickle.loads(dumps_result(r)), dt) for j, r, dt in results]
            frame = msg.encode(msg.MapResult(m.map_id, fixed))
        with contextlib.suppress(OSError):
            self.w.cmd.send_frame(*frame)

    def _run_here(
        self,
        m: _WMap,
        first_only: bool = False,
        out: list[tuple[tuple[int, int], ChunkResult, float]] | None = None,
    ) -> float:
        """Runs queued jobs in this process and sends their results, after those in ``out``
        (the first job's, when it was fast: one frame, one wake-up of the client). Returns
        the duration of the last job; with ``first_only``, runs one job, leaves its result
        in ``out`` unsent and returns its busy time (see ``busy_clock``)."""
        out = [] if out is None else out
        last_send = time.monotonic()
        dt = 0.0
        while True:
            with m.lock:
                if not m.queue or m.cancelled:
                    break
                j, start, args = m.pop_job() if first_only else m.pop_run()
            b = busy_clock() if first_only else 0.0
            t = time.perf_counter()
            res = run_chunk(m.task(start, args))
            dt = time.perf_counter() - t
            out.append((j, res, dt))
            if first_only:
                return _busy_since(b, dt)
            if time.monotonic() - last_send > _SEND_EVERY:
                self._send(m, out)
                out = []
                last_send = time.monotonic()
        self._send(m, out)
        return dt

    def _drop(self, m: _WMap) -> None:
        """A call stream's queued calls are dropped, each answered with ``JobInterrupted``."""
        with m.lock:
            runs = list(m.queue)
            m.queue.clear()
        err = JobInterrupted("interrupted by the client before it ran")
        self._send(
            m,
            [
                ((j0, j1), error_result(start, j1 - j0, start, err, want_traceback=False), 0.0)
                for j0, j1, start, _ in runs
            ],
        )

    def _pump_stream(self, m: _WMap) -> None:  # noqa: C901
        """Runs a call stream's queued calls: here while they are fast, else in the pool."""
        nloc = self.nlocal()
        if m.mode == "pool" and m.fast_streak >= 4:
            m.mode = "here"  # the calls have become fast: a process hop costs more than they do
        if m.mode == "pool" and nloc > 1:
            self._fill(m)
            return
        speculate = nloc > 1
        out: list[tuple[tuple[int, int], ChunkResult, float]] = []
        last_send = time.monotonic()
        job: tuple[tuple[int, int], int] | None = None
        try:
            while True:
                with m.lock:
                    if not m.queue or m.mode == "pool":
                        break
                    j, start, args = m.pop_job()
                job = (j, start)
                if speculate:  # the speculator starts pool jobs if this call takes long
                    self._probe(m)
                b = busy_clock() if speculate else 0.0
                t = time.perf_counter()
                res = run_chunk(m.task(start, args))
                dt = time.perf_counter() - t
                out.append((j, res, dt))
                job = None
                if speculate and dt >= SPECULATE_AFTER and busy_clock() - b >= SPECULATE_AFTER:
                    m.mode = "pool"
                    m.fast_streak = 0
                elif m.mode is None:
                    m.mode = "here"
                if time.monotonic() - last_send > _SEND_EVERY:
                    self._send(m, out)
                    out = []
                    last_send = time.monotonic()
        except KeyboardInterrupt:  # the client's interrupt (the queue is already answered)
            if job is not None:
                err = JobInterrupted("interrupted by the client while it ran")
                out.append(
                    (job[0], error_result(job[1], 1, job[1], err, want_traceback=False), 0.0)
                )
        finally:
            if speculate:
                self._probe_end()
            self._send(m, out)
        if m.mode == "pool" and nloc > 1:
            self._fill(m)

    def _pump(self, m: _WMap) -> None:
        if m.stream:
            self._pump_stream(m)
            return
        nloc = self.nlocal()
        first: list[tuple[tuple[int, int], ChunkResult, float]] = []
        if m.mode is None:
            self._probe(m)  # the speculator tells the client, and starts pool jobs, if slow
            dt = self._run_here(m, first_only=True, out=first)
            self._probe_end()
            m.mode = "here" if nloc == 1 or dt < FAST_JOB else "pool"
            if dt >= FAST_JOB:  # the client learns of a slow first job at once
                self._send(m, first)
                first = []
        if m.mode == "here":
            self._run_here(m, out=first)
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
            epoch = self.interrupts
            try:
                fut = pool.submit(m.task(start, args))
            except Exception as e:  # noqa: BLE001 - a broken pool fails this job, clearly
                with m.lock:
                    m.inflight -= 1
                    self.pool_jobs -= 1
                self._send(
                    m, [(j, error_result(start, len(args[0]) if args else 0, start, e), 0.0)]
                )
                continue
            count = len(args[0]) if args else 0
            fut.add_done_callback(
                lambda f, j=j, start=start, n=count, t0=t0, epoch=epoch: self._done(
                    m, j, start, n, f, t0, epoch
                )
            )

    def _done(
        self,
        m: _WMap,
        j: tuple[int, int],
        start: int,
        count: int,
        fut: Any,
        t0: float,
        epoch: int = 0,
    ) -> None:
        with m.lock:
            m.inflight -= 1
            self.pool_jobs -= 1
            cancelled = m.cancelled
        if cancelled and not m.stream:  # a stream's calls are answered whatever happens
            return
        try:
            res = fut.result()
        except BaseException as e:  # noqa: BLE001 - e.g. a pool process died
            err = e if isinstance(e, Exception) else RuntimeError(str(e))
            if m.stream and epoch != self.interrupts:
                err = JobInterrupted("interrupted by the client while it ran")
            res = error_result(start, count, start, err)
        if m.stream:
            m.fast_streak = m.fast_streak + 1 if res.elapsed < FAST_JOB else 0
        self._send(m, [(j, res, time.perf_counter() - t0)])
        if not cancelled and (not m.stream or m.mode == "pool"):
            self._fill(m)

    def interrupt(self) -> None:
        """Ctrl-C at the client: drop every queued job and stop the jobs running in the pool
        (its processes are killed; a new pool starts with the next map). A call stream stays
        open: its queued calls are answered with ``JobInterrupted``, as are its running ones."""
        self.interrupts += 1
        for m in list(self.maps.values()):
            if m.stream:
                self._drop(m)
                continue
            with m.lock:
                m.cancelled = True
                m.queue.clear()
        if self.pool_jobs > 0 and self._pool is not None:
            pool, self._pool, self._pool_warm, self._pool_starting = self._pool, None, False, False
            with contextlib.suppress(Exception):
                pool.shutdown(kill=True)

    def close(self, kill: bool = False) -> None:
        """Stops the maps and the local pool. The pool's processes end at the lowest CPU
        priority: the teardown of many networks' pools at once (a large network closing)
        waits for the host's other work rather than delaying it."""
        for m in self.maps.values():
            m.cancelled = True
        if self._pool is not None:
            if not kill:
                _lowest_priority(_children())
            with contextlib.suppress(Exception):
                self._pool.shutdown(kill=kill)


def _children() -> list[int]:
    """The pids of this process's children (the pool's processes)."""
    kids: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
                kids.update(int(x) for x in f.read().split())
    return sorted(kids)


def _lowest_priority(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, 19)
