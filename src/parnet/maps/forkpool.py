"""A process pool whose processes start in milliseconds: forked by a *fork server* (zygote).

Theory of operation
-------------------
::

    server worker (threads)                       fork server (one thread)    pool processes
    ForkPool.submit(ChunkTask)
      cloudpickle -> bytes, queued in _Gen
    _Proc thread (one per pool process) ----------------------------------->  _child_loop:
      sends start, count, bytes on its socketpair                              run_packed
      reads the result bytes, sets the future  <------------------------------ result bytes
    ForkServer.spawn(proc) -- ("spawn", token, cwd, sys.path, environ)
                              + fds (socket end, stdout, stderr) ---------> fork() --> child
    ForkServer reader thread  <-- ("started", token, pid) ----------------
                              <-- ("exit", token, pid, wait status) ------ pidfd readable:
                                                                           waitpid

A server worker forks its fork server (``start_forked``) right after SETUP (the login
without TLS), while the worker still runs no other thread, so the fork cannot copy a lock held by another thread.
The fork server closes every fd it inherited (the client's connection above all: a dead worker
must look dead to the client) except its control socket, points 0-2 at ``/dev/null``, freezes
the garbage collector (objects around closed fds are never finalized), and then only forks,
reaps and reports. A pool process is a fork of it: the modules the worker had imported are
there already (numpy, cloudpickle, parnet), so it starts in a few milliseconds instead of
the Python start plus imports that ``loky`` pays (0.3-3.5 s on a loaded host). Each pool
process gets from the request the worker's current directory, ``sys.path`` and environment,
and its stdout/stderr (the worker's output pipe, line-buffered: the server forwards that
output to the client), reseeds NumPy's global generator (a fork copies its state), and exits
when its socket hangs up (the worker exited or closed the pool), even while a chunk runs.
``__main__`` is never re-imported.

Failures are those of the loky ``Pool`` (``parnet.maps.pool``), with the same messages: a pool
process that dies (signal, ``os._exit``, segfault) is reported by the fork server with its wait
status; the generation of processes it belonged to is then *broken*: every chunk in flight or
queued in it fails with ``WorkerDiedError`` naming the exit codes as loky does
(``"{SIGKILL(-9)}"``, ``"{EXIT(3)}"``), its other processes are killed, and the next
``submit`` starts a new generation. The fork server exits, killing its processes, when the
worker's end of its control socket closes (the worker exited, however). A process that has
no fork server (the client, a fork server that died) uses loky (``get_pool``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import io
import itertools
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

import cloudpickle

from parnet.errors import ParnetError
from parnet.maps.common import (
    ChunkResult,
    ChunkTask,
    PoolShutDownError,
    WorkerDiedError,
    run_packed,
)

log = logging.getLogger(__name__)

_HDR = 24  # task frame header: blob length, start, count (8 bytes each, big-endian)
_STATUS_WAIT = 5.0  # seconds a dead process's thread waits for the fork server's report


#: Process names (``/proc/<pid>/comm``, what ``ps``/``top`` show) of the fork server and of
#: its pool processes.
FORK_SERVER_NAME = "parnet-forksrv"
POOL_PROCESS_NAME = "parnet-pool"


def _set_name(name: str) -> None:
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name)


def exitcode_name(status: int) -> str:
    """A wait status as loky names it: ``SIGKILL(-9)``, ``EXIT(3)``."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "UNKNOWN"
        return f"{name}(-{sig})"
    return f"EXIT({os.waitstatus_to_exitcode(status)})"


# ----------------------------------------------------------------------------------------
# the fork server


def _zygote_main(ctl: socket.socket) -> None:
    """The fork server's loop (never returns): fork on request, reap, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _set_name(FORK_SERVER_NAME)
    if "numpy" in sys.modules:  # imported once here, not in every pool process (_child_main)
        with contextlib.suppress(ImportError):
            import numpy.random  # noqa: F401
    gc.disable()
    gc.freeze()  # objects over fds closed below are never finalized, here or in children
    keep = ctl.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 20)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    procs: dict[int, tuple[int, int]] = {}  # pid -> (token, pidfd or -1)
    try:
        _zygote_loop(ctl, procs)
    finally:
        for pid in procs:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(0)


def _zygote_loop(ctl: socket.socket, procs: dict[int, tuple[int, int]]) -> None:
    while True:
        fds = [fd for _, fd in procs.values() if fd >= 0]
        polling = any(fd < 0 for _, fd in procs.values())  # no pidfd: poll for exits
        r, _, _ = select.select([ctl.fileno(), *fds], [], [], 0.2 if polling else None)
        if ctl.fileno() in r:
            try:
                data, got, _, _ = socket.recv_fds(ctl, 1 << 20, 4)
            except OSError:
                data, got = b"", []
            if not data:
                return  # the worker is gone
            req = pickle.loads(data)
            if req[0] == "spawn":
                _spawn(ctl, procs, req, got)
            elif req[0] == "kill":
                for pid, (token, _) in procs.items():
                    if token == req[1]:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
            for fd in got:
                os.close(fd)
        _reap(ctl, procs, r)


def _reap(ctl: socket.socket, procs: dict[int, tuple[int, int]], ready: list[Any]) -> None:
    """Reports the exit of each process that has ended (its pidfd is in ``ready``)."""
    for pid, (token, fd) in list(procs.items()):
        if fd >= 0 and fd not in ready:
            continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            continue
        del procs[pid]
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            ctl.send(pickle.dumps(("exit", token, pid, status)))


def _spawn(
    ctl: socket.socket, procs: dict[int, tuple[int, int]], req: tuple[Any, ...], fds: list[int]
) -> None:
    _, token, spec = req
    pid = os.fork()
    if pid == 0:
        try:
            ctl.close()
            for _, fd in procs.values():
                if fd >= 0:
                    os.close(fd)
            _child_main(fds, spec)
        finally:
            os._exit(70)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    procs[pid] = (token, pidfd)
    with contextlib.suppress(OSError):
        ctl.send(pickle.dumps(("started", token, pid)))


def _child_main(fds: list[int], spec: dict[str, Any]) -> None:
    """A pool process: set up as the worker is, then run chunks until the socket closes."""
    task_fd, out, err = fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (out, err):
        if fd > 2:
            os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _set_name(POOL_PROCESS_NAME)
    gc.enable()
    # Whole lines in one write each: several pool processes share the worker's output pipe.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(lg, logging.Logger):
            lg.handlers.clear()  # the worker's handlers write to fds this process lacks
    with contextlib.suppress(OSError):
        os.chdir(spec["cwd"])
    sys.path[:] = spec["path"]
    os.environ.clear()
    os.environ.update(spec["env"])
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()  # a fork copies the generator's state: every process would repeat it
    sock = socket.socket(fileno=task_fd)
    threading.Thread(target=_watch_hangup, args=(task_fd,), daemon=True).start()
    _child_loop(sock)
    os._exit(0)  # the worker closed the socket: the pool is closing


def _watch_hangup(fd: int) -> None:
    """Exits the process when the worker's end of its socket closes, even mid-chunk."""
    p = select.poll()
    p.register(fd, select.POLLRDHUP)
    while True:
        for _, ev in p.poll():
            if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                os._exit(0)


def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def _child_loop(sock: socket.socket) -> None:
    while True:
        hdr = _recv_exact(sock, _HDR)
        if hdr is None:
            return
        n, start, count = (int.from_bytes(hdr[i : i + 8], "big") for i in (0, 8, 16))
        blob = _recv_exact(sock, n)
        if blob is None:
            return
        out = run_packed(blob, start, count)  # type: ignore[arg-type]
        for stream in (sys.stdout, sys.stderr):  # its output is in the pipe before its result
            with contextlib.suppress(Exception):
                stream.flush()
        sock.sendall(len(out).to_bytes(8, "big"))
        sock.sendall(out)


class ForkServer:
    """The worker's handle on its fork server: spawns pool processes, learns their exits."""

    def __init__(self, sock: socket.socket, pid: int, proc: subprocess.Popen | None = None) -> None:
        self.sock = sock
        self.pid = pid
        self._popen = proc  # when started by exec (reaped through it)
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._procs: dict[int, _Proc] = {}
        self._reader: threading.Thread | None = None
        self.dead = False

    def spawn(self, proc: _Proc, child_sock: socket.socket) -> None:
        """Asks for a process that will serve ``proc``'s end of the socketpair."""
        spec = {"cwd": os.getcwd(), "path": list(sys.path), "env": dict(os.environ)}
        with self._lock:
            if self.dead:
                raise OSError("the fork server is gone")
            proc.token = next(self._tokens)
            self._procs[proc.token] = proc
            if self._reader is None:
                self._reader = threading.Thread(
                    target=self._read, daemon=True, name="parnet-forkserver"
                )
                self._reader.start()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            try:
                socket.send_fds(
                    self.sock,
                    [pickle.dumps(("spawn", proc.token, spec))],
                    [child_sock.fileno(), 1, 2],
                )
            except OSError:
                self._procs.pop(proc.token, None)
                raise

    def kill(self, token: int) -> None:
        """SIGKILLs the process of ``token`` (nothing if it has exited)."""
        with contextlib.suppress(OSError), self._lock:
            self.sock.send(pickle.dumps(("kill", token)))

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            kind, token, pid, *rest = pickle.loads(data)
            with self._lock:
                proc = self._procs.get(token) if kind == "started" else self._procs.pop(token, None)
            if proc is None:
                continue
            if kind == "started":
                proc.pid = pid
            else:
                proc.exited(rest[0])
        log.warning("the fork server %d is gone", self.pid)
        if self._popen is None:
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, 0)  # our child: no zombie left
        with self._lock:
            self.dead = True
            procs, self._procs = list(self._procs.values()), {}
        for proc in procs:
            proc.exited(None)

    def close(self) -> None:
        """Ends the fork server (it kills the processes it still has)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(10)


def start_forked() -> ForkServer | None:
    """Forks a fork server from this process; None if this process runs other threads (a
    fork would copy their locks in whatever state they are)."""
    if threading.active_count() != 1:
        return None
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            _zygote_main(b)
        finally:
            os._exit(0)
    b.close()
    return ForkServer(a, pid)


def start_exec() -> ForkServer:
    """Starts a fork server as a new Python process (one interpreter start, any process)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = (
        "import socket, sys\n"
        "from parnet.maps import forkpool\n"
        "forkpool._zygote_main(socket.socket(fileno=int(sys.argv[1])))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(b.fileno())], pass_fds=[b.fileno()], close_fds=True
    )
    b.close()
    return ForkServer(a, proc.pid, proc)


_server: ForkServer | None = None


def install_fork_server(server: ForkServer | None) -> None:
    """Makes ``server`` the fork server of this process's shared pool (``get_pool``)."""
    global _server
    _server = server


def current_server() -> ForkServer | None:
    """This process's fork server, if it has a live one."""
    s = _server
    return s if s is not None and not s.dead else None


def _forget_after_fork() -> None:
    global _server
    _server = None  # the parent's: its pool processes are not this process's


os.register_at_fork(after_in_child=_forget_after_fork)


# ----------------------------------------------------------------------------------------
# the pool


class _Item:
    __slots__ = ("count", "fut", "blob", "start")

    def __init__(self, fut: concurrent.futures.Future, blob: bytes, start: int, count: int):
        self.fut, self.blob, self.start, self.count = fut, blob, start, count


class _Gen:
    """One generation of pool processes and its queue; broken (for good) by a death."""

    def __init__(self, pool: ForkPool) -> None:
        self.pool = pool
        self.cv = threading.Condition()
        self.queue: deque[_Item] = deque()
        self.procs: list[_Proc] = []
        self.broken: str | None = None  # the exit codes that broke it
        self.closing = False

    def add(self, n: int) -> None:
        for _ in range(n):
            p = _Proc(self)
            self.procs.append(p)
            p.start()

    def put(self, item: _Item) -> bool:
        with self.cv:
            if self.broken is not None or self.closing:
                return False
            self.queue.append(item)
            self.cv.notify()
            return True

    def get(self) -> _Item | None:
        with self.cv:
            while not self.queue and self.broken is None and not self.closing:
                self.cv.wait()
            if self.broken is not None or not self.queue:
                return None
            return self.queue.popleft()

    def break_(self, codes: str) -> None:
        """A process died: fail what is queued, kill the others (their chunks fail too)."""
        with self.cv:
            if self.broken is not None:
                return
            self.broken = codes
            queued = list(self.queue)
            self.queue.clear()
            self.cv.notify_all()
        for item in queued:
            self.pool._fail(item, codes)
        for p in self.procs:
            p.kill()

    def close(self, kill: bool) -> list[_Item]:
        with self.cv:
            self.closing = True
            queued = list(self.queue) if kill else []
            if kill:
                self.queue.clear()
            self.cv.notify_all()
        if kill:
            for p in self.procs:
                p.kill()
        return queued


class _Proc:
    """One pool process, served by one thread of the worker."""

    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.token = 0
        self.pid = 0
        self.status: int | None = None
        self._exited = threading.Event()
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            gen.pool.server.spawn(self, child)
        finally:
            child.close()

    def start(self) -> None:
        threading.Thread(target=self._serve, daemon=True, name="parnet-forkpool").start()

    def kill(self) -> None:
        self.gen.pool.server.kill(self.token)

    def exited(self, status: int | None) -> None:
        """The fork server reaped it (``status`` None: the fork server itself is gone)."""
        self.status = status
        self._exited.set()
        pool = self.gen.pool
        if not (self.gen.closing or pool.closed):
            self.gen.break_(self.codes())

    def codes(self) -> str:
        if self.status is None:
            return "{fork server gone}" if self._exited.is_set() else ""
        return "{" + exitcode_name(self.status) + "}"

    def _serve(self) -> None:
        sock = self.sock
        try:
            while True:
                item = self.gen.get()
                if item is None:
                    return
                if not item.fut.set_running_or_notify_cancel():
                    continue
                try:
                    sock.sendall(
                        len(item.blob).to_bytes(8, "big")
                        + item.start.to_bytes(8, "big")
                        + item.count.to_bytes(8, "big")
                    )
                    sock.sendall(item.blob)
                    hdr = _recv_exact(sock, 8)
                    out = _recv_exact(sock, int.from_bytes(hdr, "big")) if hdr else None
                except OSError:
                    out = None
                if out is None:  # the process died with this chunk
                    self._exited.wait(_STATUS_WAIT)
                    codes = self.gen.broken or self.codes()
                    self.gen.break_(codes)
                    self.gen.pool._fail(item, codes)
                    return
                self.gen.pool._finish(item, out)
        finally:
            sock.close()  # the process exits (its socket hangs up)


class PoolBase:
    """What both kinds of pool share: the size, the closed flag, the context manager."""

    def __init__(self, nproc: int) -> None:
        if nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        self._nproc = nproc
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    @property
    def nproc(self) -> int:
        """Number of worker processes."""
        return self._nproc

    @property
    def closed(self) -> bool:
        """Whether ``shutdown`` was called."""
        return self._closed

    @property
    def owner_pid(self) -> int:
        """The process that made the pool (its processes are not a forked child's)."""
        return self._pid

    def _state(self) -> str:
        return "open"

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._state()
        return f"<{type(self).__name__} nproc={self._nproc} {state}>"

    def __enter__(self) -> Any:
        return self

    @staticmethod
    def _pack(task: ChunkTask, count: int, fut: concurrent.futures.Future) -> bytes | None:
        """The task pickled; None (and ``fut`` failed with the reason) if it cannot be."""
        try:
            return cloudpickle.dumps(task, protocol=5)
        except Exception as e:
            e.add_note(
                f"while pickling the chunk at {task.start} ({count} elements) for the process pool"
            )
            fut.set_exception(e)
            return None

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stops the processes (see the subclasses)."""
        raise NotImplementedError


class ForkPool(PoolBase):
    """A pool of processes forked by a fork server; the interface of ``pool.Pool``.

    Args:
        nproc: number of processes (>= 1).
        server: the fork server (``start_forked``, ``start_exec``).
    """

    def __init__(self, nproc: int, server: ForkServer) -> None:
        super().__init__(nproc)
        self.server = server
        self._gen: _Gen | None = None

    def _state(self) -> str:
        g = self._gen
        return "broken" if g and g.broken else "open"

    def pids(self) -> list[int]:
        """The pids of the current processes (those started so far)."""
        g = self._gen
        return [p.pid for p in g.procs if p.pid] if g else []

    def _current(self) -> _Gen:
        with self._lock:
            if self._closed:
                raise PoolShutDownError("the pool is shut down")
            g = self._gen
            if g is None or g.broken is not None:
                if self.server.dead:  # get_pool replaces a closed pool (by a loky one)
                    self._closed = True
                    raise PoolShutDownError("the pool's fork server is gone")
                g = self._gen = _Gen(self)
                try:
                    g.add(self._nproc)
                except OSError:
                    g.break_("{fork server gone}")
                    raise
                log.debug("forked a pool of %d processes", self._nproc)
            return g

    def grow(self, nproc: int) -> None:
        """Makes the pool at least ``nproc`` processes."""
        with self._lock:
            if nproc <= self._nproc or self._closed:
                return
            more, self._nproc = nproc - self._nproc, nproc
            if self._gen is not None and self._gen.broken is None:
                self._gen.add(more)

    def submit(self, task: ChunkTask) -> concurrent.futures.Future[ChunkResult]:
        """Queues one chunk; returns a future of its ``ChunkResult`` (as ``Pool.submit``)."""
        count = len(task.args[0]) if task.args else 0
        fut: concurrent.futures.Future[ChunkResult] = concurrent.futures.Future()
        blob = self._pack(task, count, fut)
        if blob is None:
            return fut
        item = _Item(fut, blob, task.start, count)
        if not self._current().put(item):  # broken just now: one retry on a new generation
            if not self._current().put(item):
                self._fail(item, self._gen.broken if self._gen else "")
        return fut

    def _finish(self, item: _Item, out: bytearray) -> None:
        try:
            item.fut.set_result(pickle.loads(out))
        except concurrent.futures.InvalidStateError:
            pass
        except Exception as e:
            err = ParnetError(
                f"could not unpickle the result of the chunk at {item.start}: "
                f"{type(e).__name__}: {e}"
            )
            err.__cause__ = e
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                item.fut.set_exception(err)

    def _fail(self, item: _Item, codes: str | None) -> None:
        start, count = item.start, item.count
        if self._closed:
            exc: Exception = PoolShutDownError(
                f"the pool was shut down with the chunk at {start} in flight"
            )
        else:
            what = f"exit codes {codes}" if codes else "exit codes unknown"
            exc = WorkerDiedError(
                f"a process of the local pool died while elements {start}..{start + count - 1}"
                f" were in flight ({what}); the pool restarts on the next call",
                codes or "",
            )
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            item.fut.set_exception(exc)

    def shutdown(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stops the processes; chunks still queued or running fail (see ``Pool.shutdown``).
        Idempotent."""
        with self._lock:
            g, self._gen = self._gen, None
            self._closed = True
        if g is None or self._pid != os.getpid():
            return
        for item in g.close(kill):
            self._fail(item, None)
        if kill:
            return
        for p in g.procs:  # the queue drains, then each thread closes its socket
            timeout -= _wait_exit(p, timeout)
        for p in g.procs:
            p.kill()


def _wait_exit(p: _Proc, timeout: float) -> float:
    """Waits at most ``timeout`` for ``p`` to exit; returns the seconds waited."""
    t = time.monotonic()
    p._exited.wait(max(timeout, 0.0))
    return time.monotonic() - t
