"""Liveness of links: a peer is dead when its *machine* stops answering, never for being busy.

What counts (API.md, "Liveness"):

* **Process died**: its kernel closes the connection (FIN or RST); the waiting receive wakes
  at once with ``ConnectionClosed``. Nothing here is needed for that.
* **Machine or network gone** (powered off, cable pulled, partition): reported within the
  link's ``timeout`` (the ``heartbeat`` of ``pconnect``). Two detectors, both measuring the
  peer's *kernel*, which acknowledges TCP segments whatever its Python does:

  - an idle link: TCP keepalive (``keepalive_settings``), probes every ``k`` s after ``k`` s
    without traffic and ``KEEPCNT`` unanswered probes make the kernel abort the connection
    (``ETIMEDOUT``), at most ``timeout`` s after the last acknowledgement. It works even while
    this process's own Python is busy. Keepalive counts whole seconds, so below 2 s the
    monitor also sends a small ``PING`` on links that sent nothing in a beat;
  - data in flight: this thread reads ``TCP_INFO`` every beat; a link that has had
    unacknowledged segments (``tcpi_unacked``), or a second unanswered probe
    (``tcpi_probes``: a busy peer's kernel answers each probe, which resets that count),
    since a beat at which its peer had sent neither data nor an acknowledgement since
    (``tcpi_last_data_recv``, ``tcpi_last_ack_recv``), for ``timeout`` s less two beats, is
    declared dead (TCP itself would retransmit for minutes). Counting from the beat that
    saw the wait, not from the last acknowledgement, a segment just sent on a quiet link
    is not mistaken for one long unanswered.

  A declared or kernel-aborted link is shut down, so a ``precv`` waiting on it wakes with
  ``ConnectionClosed`` naming the peer, and ``on_dead`` is called.
* **Alive but busy** (a call holding the GIL in C code for hours, a machine at load 50): its
  kernel acknowledges our data and our keepalive probes, so it is never declared dead; calls
  to it wait, or end by their own ``timeout``. No application-level ping decides anything
  (an answer to one needs the peer's Python, so it cannot tell busy from dead).
* **Frozen** (SIGSTOP, Ctrl-Z): its kernel acknowledges too, so it counts as alive but busy,
  the honest answer (``fg`` resumes it, and its network with it). Only a call's own
  ``timeout`` (``precv(..., timeout=)``) ends a wait on it. A worker whose client froze
  keeps running; it exits when the client's process ends (FIN) or its machine goes silent.

Not used: TCP_USER_TIMEOUT, which would also abort a connection whose busy peer keeps a
full receive window (zero-window probes answered) longer than the timeout. So a peer whose
window has stayed full for a long time (it stopped reading) and then loses its network is
noticed at its second unanswered zero-window probe, which the kernel spaces up to 2 minutes
apart after a long full window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from ..wire import messages as msg
from . import bufpool

log = logging.getLogger(__name__)

#: Seconds without an acknowledgement from a peer's machine after which it is dead
#: (PARNET_HEARTBEAT_TIMEOUT).
DEFAULT_TIMEOUT = float(os.environ.get("PARNET_HEARTBEAT_TIMEOUT", "10"))
_TCP_CLOSE = 7  # tcpi_state of a connection the kernel has ended (e.g. keepalive abort)
_KEEPIDLE_MAX, _KEEPCNT_MAX = 32767, 127


def check_timeout(timeout: Any, what: str = "heartbeat") -> float:
    """``timeout`` as a float, or ``ValueError`` unless it is a finite number of seconds > 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"{what} must be a number of seconds > 0, got {timeout!r}")
    t = float(timeout)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{what} must be a number of seconds > 0, got {timeout!r}")
    return t


def keepalive_settings(timeout: float) -> tuple[int, int]:
    """``(k, count)``: keepalive probes start after ``k`` s without traffic and follow every
    ``k`` s; ``count`` unanswered ones end the connection, ``(count + 1) * k <= timeout`` s
    after the peer's last acknowledgement (whole seconds: at least 2 s)."""
    k = min(_KEEPIDLE_MAX, max(1, int(timeout / 5)))
    return k, min(_KEEPCNT_MAX, max(1, int(timeout // k) - 1))


def set_keepalive(sock: socket.socket, timeout: float) -> None:
    """Turns on TCP keepalive on ``sock`` so the kernel ends it when the peer's machine stops
    answering for ``timeout`` s (``keepalive_settings``). Not TCP: nothing to do."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    k, count = keepalive_settings(timeout)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, k)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, k)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class PeerState(NamedTuple):
    """What the kernel knows of a TCP peer (``TCP_INFO``)."""

    ended: bool  # the kernel has ended the connection (tcpi_state CLOSE)
    unanswered: bool  # it ended after unanswered retransmissions or probes
    unacked: int  # segments sent and not yet acknowledged
    probes: int  # keepalive or zero-window probes sent since the last acknowledgement
    silence: float  # seconds since the peer sent data or acknowledged ours


def peer_state(sock: socket.socket) -> PeerState | None:
    """The kernel's view of ``sock``'s peer, or None when it cannot be told (not TCP)."""
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 64)
    except (OSError, ValueError):
        return None
    if len(raw) < 60:
        return None
    state, _, retransmits, probes = raw[0], raw[1], raw[2], raw[3]
    (unacked,) = struct.unpack_from("I", raw, 24)
    data_ms, ack_ms = struct.unpack_from("II", raw, 52)  # tcpi_last_data_recv, tcpi_last_ack_recv
    return PeerState(
        state == _TCP_CLOSE,
        bool(retransmits or probes),
        unacked,
        probes,
        min(data_ms, ack_ms) / 1000.0,
    )


def silence_reason(name: str, seconds: float) -> str:
    """The message for a peer whose machine stopped answering."""
    return (
        f"no sign of life from {name} for {seconds:.1f} s: its machine does not acknowledge "
        f"(machine or network gone)"
    )


def beat(timeout: float) -> float:
    """Seconds between two checks of a link watched with ``timeout``."""
    return max(0.05, timeout / 8)


class _Entry:
    __slots__ = ("link", "timeout", "on_dead", "sends", "ping", "waiting", "__weakref__")

    def __init__(
        self, link: Any, timeout: float, on_dead: Callable[[Any, str], None] | None
    ) -> None:
        self.link = link
        self.timeout = timeout
        self.on_dead = on_dead
        self.sends = -1  # the link's send count at the last beat
        self.waiting: float | None = None  # since when it waits for an answer (monotonic)
        k, count = keepalive_settings(timeout)
        self.ping = (count + 1) * k > timeout  # keepalive's whole seconds are too coarse


class Monitor:
    """The process's liveness thread (started on first use)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tasks: list[Callable[[], None]] = []  # extra periodic work
        self._wake = threading.Event()
        self.interval = beat(DEFAULT_TIMEOUT)

    def watch(
        self,
        link: Any,
        timeout: float | None = None,
        on_dead: Callable[[Any, str], None] | None = None,
    ) -> None:
        """Turns on keepalive on ``link`` and checks it every beat: its peer is declared dead
        when its machine has not answered for ``timeout`` s (module docstring)."""
        t = DEFAULT_TIMEOUT if timeout is None else check_timeout(timeout)
        link.keepalive(t)
        with self._lock:
            self._entries[id(link)] = _Entry(link, t, on_dead)
            self.interval = min(self.interval, beat(t))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="parnet-heartbeat", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def unwatch(self, link: Any) -> None:
        """Stops watching ``link``."""
        with self._lock:
            self._entries.pop(id(link), None)

    def add_task(self, fn: Callable[[], None]) -> None:
        """Runs ``fn()`` on every beat (exceptions are logged, not raised)."""
        with self._lock:
            self._tasks.append(fn)

    def check(self, e: _Entry) -> str | None:
        """One beat for one link: the reason its peer is dead, or None."""
        link = e.link
        if e.ping and link.sends == e.sends and not link.queued:
            with contextlib.suppress(OSError):
                link.send_frame(msg.PING)  # data in flight: its acknowledgement is the sign
        e.sends = link.sends
        st = link.peer_state()
        if st is None:
            return None
        if st.ended:
            # keepalive (or retransmission) gave up; a reset or close is the reader's to report
            return silence_reason(link.name, e.timeout) if st.unanswered else None
        if not (st.unacked or st.probes > 1):
            e.waiting = None
            return None
        now = time.monotonic()
        if e.waiting is None or now - st.silence > e.waiting:
            e.waiting = now  # seen waiting first now, or the peer answered since: a new wait
            return None
        if now - e.waiting > e.timeout - 2 * beat(e.timeout):
            return silence_reason(link.name, st.silence)
        return None

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            with self._lock:
                entries = list(self._entries.values())
                tasks = list(self._tasks)
            for e in entries:
                link = e.link
                if not link.usable:
                    self.unwatch(link)
                    continue
                reason = self.check(e)
                if reason is None:
                    continue
                log.warning("%s: declared dead", reason)
                link.declare_dead(reason)
                self.unwatch(link)
                if e.on_dead is not None:
                    try:
                        e.on_dead(link, reason)
                    except Exception:  # noqa: BLE001
                        log.exception("heartbeat callback failed")
            bufpool.trim()  # idle receive memory goes back to the system
            for fn in tasks:
                try:
                    fn()
                except Exception:  # noqa: BLE001
                    log.exception("periodic task failed")


_monitor: Monitor | None = None
_monitor_pid = 0


def monitor() -> Monitor:
    """The heartbeat monitor of this process (a fresh one after a fork)."""
    global _monitor, _monitor_pid
    if _monitor is None or _monitor_pid != os.getpid():
        _monitor = Monitor()
        _monitor_pid = os.getpid()
    return _monitor
