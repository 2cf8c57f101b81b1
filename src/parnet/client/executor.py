"""``parnet.Executor``: a ``concurrent.futures.Executor`` over the servers of a network.

Theory of operation. An executor is one long-lived network map, a *call stream*, on every
server (``MapSession``; the worker side is ``server.maprunner``'s stream mode): each
``submit`` packs ``(fn, args, kwargs)`` into bytes at once, in the caller's thread (``fn``
as a ``Shared``, pickled once however often it is called), and queues the call. One
dispatcher thread per executor sends queued calls as ``jobs`` of the stream, many in one
frame, and routes each result (``MAP_RESULT``, read by whichever thread reads the command
links) to the call's future by its job id.

Load balancing: server ``k`` holds at most ``nlocal_k`` calls that run plus a prefetch
(calls waiting there, so that no server idles for a round trip): ``nlocal_k`` while call
times are unknown, then ``PREFETCH_WORK`` seconds' worth of the measured mean call time
(none for slow calls, up to ``MAX_PREFETCH`` for tiny ones). Calls go to the server with
the most free slots. A call is ``RUNNING`` (no longer cancellable) once sent.

On the worker, calls run in the worker process while they are fast, and ``nlocaljobs`` at
once in its local pool as soon as one is slow. A server lost while calls run there has them
rerun on the others (a call lost with two servers fails with ``RemoteError``). Ctrl-C while
the caller waits on a future (``result``, ``exception``, ``map``'s iterator, the ``with``
block) cancels the queued calls and interrupts the running ones: each of those fails with
``CancelledError``; the executor and the network stay usable.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import pickle
import select
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from typing import Any

import cloudpickle

from ..errors import ConnectionClosed
from ..maps.common import ChunkResult, Shared, call_chunk, call_packed
from ..network import Connections
from ..wire import messages as msg
from ..wire.serialize import PLAIN
from .api import servers_of
from .netmap import MapSession

__all__ = ["Executor"]

log = logging.getLogger(__name__)

PREFETCH_WORK = 0.005  # seconds of measured call time waiting at each server, at most
MAX_PREFETCH = 1024  # calls waiting at one server, at most
_POLL = 0.25  # seconds between checks of lost servers and a closed network while idle
_FN_CACHE = 64  # functions whose pickled form an executor keeps


class _Call:
    __slots__ = ("id", "fut", "blob", "lost", "sent")

    def __init__(self, cid: int, fut: _ExecFuture, blob: bytes) -> None:
        self.id = cid
        self.fut = fut
        self.blob = blob
        self.lost = 0  # servers that died while it ran there
        self.sent = False


class _ExecFuture(Future):
    """A future whose ``result``/``exception`` turn a Ctrl-C while waiting into an
    interrupt of the executor's calls (then re-raise it)."""

    _executor: Executor | None = None

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        except KeyboardInterrupt as e:
            if e is not self._exception and self._executor is not None:
                self._executor.interrupt()
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except KeyboardInterrupt:
            if self._executor is not None:
                self._executor.interrupt()
            raise


class _CallStream(MapSession):
    """The client side of one executor's call stream (see the module docstring). Everything
    but ``queue``/``flags`` belongs to the dispatcher thread."""

    def __init__(self, connections: Connections, max_workers: int | None) -> None:
        net, ks = servers_of(connections, "Executor")
        super().__init__(net)
        self.alive = [k for k in ks if net.nodes[k].open]
        if not self.alive:
            raise ConnectionClosed("Executor: no open server in these connections")
        self.max_workers = max_workers
        self.queue: deque[_Call] = deque()  # new calls (any thread appends)
        self.retry: deque[_Call] = deque()  # calls of lost servers, already running
        self.out: dict[int, dict[int, _Call]] = {k: {} for k in self.alive}
        self.mean = 0.0  # smoothed call time (seconds), 0 while unknown
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.efd_lock = threading.Lock()
        self.signalled = False  # the eventfd was written and the thread has not woken since
        self.want_interrupt = False
        self.want_cancel = False
        self.stopping = False
        self.broken: BaseException | None = None
        self.interrupt_done = threading.Event()
        self.interrupted: list[Future] = []
        self._rr = 0
        spec = {
            "fun": call_packed,
            "nout": 1,
            "vectorized": False,
            "chunk_size": 1,
            "n": 0,
            "error_handler": None,
            "cum_func": None,
            "stream": True,
        }
        self.register()
        self.alive = [k for k in self.alive if self._send(k, msg.MapStart(self.map_id, spec))]
        self.out = {k: {} for k in self.alive}
        if not self.alive:
            self.unregister()
            os.close(self.efd)
            raise ConnectionClosed("Executor: no server could be reached")

    def stop(self) -> None:
        """No new calls: the dispatcher thread ends once those sent have finished."""
        self.stopping = True
        self.wake()

    def wake(self) -> None:
        """Wakes the dispatcher thread (one write until it has woken: submit stays cheap)."""
        if self.signalled:
            return
        self.signalled = True
        with self.efd_lock:
            if self.efd >= 0:
                os.eventfd_write(self.efd, 1)

    def deliver(self, k: int, results: list[tuple[tuple[int, int], ChunkResult, float]]) -> None:
        super().deliver(k, results)
        self.wake()

    # -- the dispatcher thread -------------------------------------------------------
    def run(self) -> None:
        """The dispatcher thread: until shut down with nothing left, or no server left."""
        try:
            poller = None
            fds: tuple[int, ...] = ()
            while True:
                if tuple(self.alive) != fds:
                    fds = tuple(self.alive)
                    poller = self._poller()
                self._wait(poller)
                self._results()
                if self.want_interrupt:
                    self._do_interrupt()
                if self.want_cancel:
                    self.want_cancel = False
                    self._cancel_queued()
                self._check_lost()
                if self.broken is not None:
                    self._fail_all(self.broken)
                    return
                self._dispatch()
                if (
                    self.stopping
                    and not self.queue
                    and not self.retry
                    and not any(self.out.values())
                ):
                    return
        except BaseException as e:  # noqa: BLE001 - no future may hang on a bug here
            log.exception("Executor: the dispatcher failed")
            self.broken = e
            self._fail_all(e)
        finally:
            for k in self.alive:
                if self.net.nodes[k].open:
                    self._send(k, msg.MapEnd(self.map_id))
            self.unregister()
            with self.efd_lock:
                os.close(self.efd)
                self.efd = -1

    def _poller(self) -> select.poll:
        p = select.poll()
        p.register(self.efd, select.POLLIN)
        for k in self.alive:
            link = self.net.nodes[k].cmd
            if link is not None and link.usable:
                p.register(link.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return p

    def _wait(self, poller: Any) -> None:
        busy = self.inbox or self.want_interrupt or self.want_cancel
        events = poller.poll(0 if busy else int(_POLL * 1000))
        readable = any(fd != self.efd for fd, _ in events)
        if self.signalled or any(fd == self.efd for fd, _ in events):
            # Drain, then clear the flag, then (the caller) look at the queue: a submit
            # that found the flag set appended its call before, so it is seen; one that
            # finds it clear writes the eventfd again. No wake-up is lost.
            try:
                os.eventfd_read(self.efd)
            except BlockingIOError:
                pass
            self.signalled = False
        if readable or self.inbox or any(self.out.values()):
            net = self.net
            # Command links have one reader at a time; another thread holding the lock
            # (a user's precv, a netcellfun) routes our results to deliver() itself.
            if net.read_lock.acquire(timeout=0.05):
                try:
                    for k in self.alive:
                        link = net.nodes[k].cmd
                        if link is not None and link.usable and link.readable_now():
                            net.pump_cmd(k)
                finally:
                    net.read_lock.release()

    def _results(self) -> None:
        while self.inbox:
            k, (j0, _), res, dt = self.inbox.popleft()
            call = self.out.get(k, {}).pop(j0, None)
            if call is None:
                continue  # its server was declared lost and the call rerun elsewhere
            self.mean = dt if not self.mean else 0.8 * self.mean + 0.2 * dt
            fut = call.fut
            try:
                if res.error is None:
                    fut.set_result(res.outputs[0][0])  # type: ignore[index]
                elif res.error[1] == "JobInterrupted":
                    fut.set_exception(CancelledError(f"interrupted on {self.net.name(k)}"))
                else:
                    fut.set_exception(self.job_error(k, res, f"Executor: {_fn_name(call)}"))
            except concurrent.futures.InvalidStateError:
                pass

    def _capacity(self, k: int) -> tuple[int, int]:
        """Calls that may run at server ``k``, and calls that may wait there besides."""
        node = self.net.nodes[k]
        nl = node.nlocaljobs or node.nproc or 1
        if not self.mean:
            return nl, nl
        return nl, min(MAX_PREFETCH, int(PREFETCH_WORK / self.mean))

    def _next_call(self) -> _Call | None:
        while self.retry or self.queue:
            call = self.retry.popleft() if self.retry else self.queue.popleft()
            if call.sent or call.fut.set_running_or_notify_cancel():
                call.sent = True
                return call
        return None

    def _dispatch(self) -> None:
        if not (self.queue or self.retry) or not self.alive:
            return
        caps = {k: self._capacity(k) for k in self.alive}
        total = sum(len(d) for d in self.out.values())
        limit = self.max_workers if self.max_workers is not None else 1 << 62
        items: dict[int, list[Any]] = {k: [] for k in self.alive}
        n = len(self.alive)
        for phase in (0, 1):  # first the free run slots of every server, then the prefetch
            while total < limit and (self.queue or self.retry):
                best, room = -1, 0
                for i in range(n):
                    k = self.alive[(self._rr + i) % n]
                    run, pre = caps[k]
                    free = run + (pre if phase else 0) - len(self.out[k])  # out: this round's too
                    if free > room:
                        best, room = k, free
                if best < 0:
                    break
                self._rr += 1
                call = self._next_call()
                if call is None:
                    break
                items[best].append((call.id, call.id + 1, call.id, [[call.blob]]))
                self.out[best][call.id] = call
                total += 1
        for k, its in items.items():
            if its and not self._send(k, msg.MapJobs(self.map_id, its)):
                pass  # the server is lost: _check_lost reruns these calls

    def _check_lost(self) -> None:
        net = self.net
        if net.closed:
            self.broken = ConnectionClosed("Executor: the network was closed")
            return
        for k in [k for k in self.alive if not net.nodes[k].open]:
            self.alive.remove(k)
            calls = sorted(self.out.pop(k, {}).values(), key=lambda c: c.id)
            again = []
            for call in calls:
                call.lost += 1
                if call.lost >= 2:
                    err = msg.remote_error(
                        net.nodes[k].host,
                        k,
                        "ConnectionClosed",
                        f"Executor: a call of {_fn_name(call)} was lost with two servers "
                        "that died while running it; not retried again",
                    )
                    _set_exception(call.fut, err)
                else:
                    again.append(call)
            self.retry.extendleft(reversed(again))
            if calls:
                log.warning(
                    "Executor: %s is gone (%s); rerunning %d calls elsewhere",
                    net.name(k),
                    net.nodes[k].closed_reason,
                    len(again),
                )
        if not self.alive:
            self.broken = ConnectionClosed("Executor: every server has gone")

    def _cancel_queued(self) -> None:
        while self.queue:
            fut = self.queue.popleft().fut
            fut.cancel()
            fut.set_running_or_notify_cancel()  # wakes wait()/as_completed() on it

    def _do_interrupt(self) -> None:
        """Ctrl-C: cancel what is queued here, drop what waits at servers, stop what runs."""
        self.want_interrupt = False
        self._cancel_queued()
        while self.retry:
            _set_exception(
                self.retry.popleft().fut, CancelledError("interrupted (Ctrl-C at the client)")
            )
        ks = [k for k in self.alive if self.out[k]]
        self.interrupted = [c.fut for k in ks for c in self.out[k].values()]
        for k in ks:
            self._send(k, msg.MapCancel(self.map_id))  # after every call sent: all are answered
        # Not again where an interrupt is still unanswered (a with block's exit after a
        # result() that was interrupted): ClientSession.interrupt would take it for a second Ctrl-C.
        self.net.interrupt([k for k in ks if not self.net.nodes[k].interrupt_pending])
        self.interrupt_done.set()

    def _fail_all(self, e: BaseException) -> None:
        exc = e if isinstance(e, Exception) else ConnectionClosed(f"Executor: {e!r}")
        for call in (
            list(self.queue) + list(self.retry) + [c for d in self.out.values() for c in d.values()]
        ):
            if call.sent or call.fut.set_running_or_notify_cancel():
                _set_exception(call.fut, exc)
        self.queue.clear()
        self.retry.clear()
        for d in self.out.values():
            d.clear()


def _set_exception(fut: Future, e: BaseException) -> None:
    try:
        fut.set_exception(e)
    except concurrent.futures.InvalidStateError:
        pass


def _fn_name(call: _Call) -> str:
    fn = getattr(call.fut, "_fn", None)
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` over the servers of ``connections`` and their
    local processes (``nlocaljobs`` each, see ``network_set``).

    ``submit(fn, *args, **kwargs)`` returns a future; ``map``, ``shutdown`` and ``with``
    work as for the standard executors, and the futures work with
    ``concurrent.futures.wait`` / ``as_completed``. ``fn`` may be any picklable callable,
    lambdas and closures included (cloudpickle). Up to ``nlocaljobs`` calls run at once on
    each server, load-balanced over the servers.

    A call that raises sets ``RemoteError`` on its future. A server lost while calls run
    there has them rerun on the others. Ctrl-C while waiting on a future (or in ``map``'s
    iterator, or a ``with`` block) cancels the queued calls and interrupts the running
    ones (their futures raise ``CancelledError``). Shutting down leaves the network open:
    it belongs to the caller.

    Args:
        connections: the servers to use (the local machine, if included, is ignored).
        max_workers: at most this many calls sent out at once over all servers (running
            or waiting there); default: the servers' ``nlocaljobs`` plus a prefetch.

    Raises:
        ValueError: ``max_workers`` is not an int >= 1.
        ConnectionClosed: no open server among ``connections``.
    """

    def __init__(self, connections: Connections, *, max_workers: int | None = None) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ValueError(
                f"Executor: max_workers must be an int >= 1 or None, got {max_workers!r}"
            )
        self._stream = _CallStream(connections, max_workers)
        self._lock = threading.Lock()
        self._shutdown = False
        self._ids = itertools.count()
        self._fns: dict[int, tuple[Any, Shared]] = {}
        self._thread = threading.Thread(
            target=self._stream.run, name="parnet-executor", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, _CallStream.stop, self._stream)  # forgotten without shutdown

    @property
    def nworkers(self) -> int:
        """Calls that can run at once: the sum of the open servers' ``nlocaljobs`` (capped
        by ``max_workers``)."""
        s = self._stream
        n = sum(s._capacity(k)[0] for k in list(s.alive))
        return min(n, s.max_workers) if s.max_workers else n

    def __repr__(self) -> str:
        s = self._stream
        running = sum(len(d) for d in s.out.values())
        state = "shut down" if self._shutdown else ("broken" if s.broken else "open")
        return (
            f"<parnet.Executor {state}: servers {list(s.alive)}, {running} calls out, "
            f"{len(s.queue)} queued>"
        )

    def _pack(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        got = self._fns.get(id(fn))
        if got is None or got[0] is not fn:
            if len(self._fns) >= _FN_CACHE:
                self._fns.pop(next(iter(self._fns)), None)
            got = self._fns[id(fn)] = (fn, Shared(fn))
        if all(type(a) in PLAIN for a in args) and all(type(v) in PLAIN for v in kwargs.values()):
            return pickle.dumps((got[1], args, kwargs), 5)  # no code to pickle by value: C pickler
        return cloudpickle.dumps((got[1], args, kwargs), protocol=5)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedules ``fn(*args, **kwargs)`` on a server; returns its future.

        A function or argument that cannot be pickled fails the future with that error.

        Raises:
            RuntimeError: the executor was shut down. ConnectionClosed: no server is left.
        """
        if not callable(fn):
            raise TypeError(f"Executor.submit: fn must be callable, got {type(fn).__name__}")
        s = self._stream
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut = _ExecFuture()
        fut._executor = self
        fut._fn = fn  # type: ignore[attr-defined]
        try:
            blob = self._pack(fn, args, kwargs)
        except Exception as e:  # noqa: BLE001 - reported on the future
            e.add_note(
                f"while pickling a call of {getattr(fn, '__qualname__', fn)!r} for the Executor"
            )
            fut.set_exception(e)
            return fut
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if s.broken is not None:
                raise ConnectionClosed(f"Executor: cannot run calls: {s.broken}")
            s.queue.append(_Call(next(self._ids), fut, blob))
        s.wake()
        return fut

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``fn`` over the iterables, results in order; ``chunksize`` calls travel as one.

        Raises:
            ValueError: ``chunksize`` < 1. TimeoutError: a result was not ready ``timeout``
                seconds after the call to ``map``.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Executor.map: chunksize must be an int >= 1, got {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        it = zip(*iterables)  # noqa: B905 - like the built-in map: the shortest one ends it
        chunks = iter(lambda: tuple(itertools.islice(it, chunksize)), ())
        results = super().map(call_chunk, itertools.repeat(fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls from now on; with ``cancel_futures`` the queued ones are cancelled;
        with ``wait`` returns once every call sent has finished. The network stays open."""
        s = self._stream
        with self._lock:
            self._shutdown = True
            s.stopping = True
            if cancel_futures:
                s.want_cancel = True
        s.wake()
        if wait and threading.current_thread() is not self._thread:
            try:
                while self._thread.is_alive():
                    self._thread.join(0.25)
            except KeyboardInterrupt:
                self.interrupt()
                raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.interrupt()
            self.shutdown(wait=True, cancel_futures=True)
            return False
        return super().__exit__(exc_type, exc, tb)

    def interrupt(self, wait: float = 10.0) -> None:
        """Ctrl-C: cancels the queued calls, interrupts the running ones and waits (at most
        ``wait`` seconds) until each has its answer."""
        s = self._stream
        if not self._thread.is_alive():
            return
        s.interrupt_done.clear()
        s.want_interrupt = True
        s.wake()
        if s.interrupt_done.wait(wait):
            concurrent.futures.wait(s.interrupted, timeout=wait)
