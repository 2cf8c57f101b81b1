"""Liveness of links: heartbeats out, and peers that fall silent declared dead.

One daemon thread per process watches every registered link. Every ``interval`` it sends a
``PING`` on each link that sent nothing lately (the receiving decoder drops PINGs), and it
asks the kernel how long ago data last *arrived* on the socket (``TCP_INFO``'s
``tcpi_last_data_recv``) — arrival, not reading, so a peer whose pings sit unread in our
receive queue still counts as alive. A link whose peer has been silent for ``timeout``
seconds while nothing is waiting unread in our receive queue is declared dead: its socket
is shut down, so a ``precv`` waiting on it wakes at once with ``ConnectionClosed`` naming
the peer and the silence. This catches what TCP alone notices only after minutes: a
machine powered off, a cable pulled, a process frozen by SIGSTOP (whose kernel still ACKs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ..wire import messages as msg
from . import bufpool

log = logging.getLogger(__name__)

#: Seconds of silence after which a peer is declared dead (PARNET_HEARTBEAT_TIMEOUT).
DEFAULT_TIMEOUT = float(os.environ.get("PARNET_HEARTBEAT_TIMEOUT", "10"))


class _Entry:
    __slots__ = ("link", "timeout", "on_dead", "sends", "__weakref__")

    def __init__(self, link: Any, timeout: float, on_dead: Callable[[Any, str], None] | None) -> None:
        self.link = link
        self.timeout = timeout
        self.on_dead = on_dead
        self.sends = -1  # the link's send count at the last beat


class Monitor:
    """The process's heartbeat thread (started on first use)."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tasks: list[Callable[[], None]] = []  # extra periodic work (client: pump output)
        self._wake = threading.Event()
        self.interval = max(0.05, DEFAULT_TIMEOUT / 4)

    def watch(self, link: Any, timeout: float | None = None,
              on_dead: Callable[[Any, str], None] | None = None) -> None:
        """Starts heartbeats on ``link`` and declares it dead after ``timeout`` s of silence."""
        t = DEFAULT_TIMEOUT if timeout is None else timeout
        with self._lock:
            self._entries[id(link)] = _Entry(link, t, on_dead)
            self.interval = min(self.interval, max(0.05, t / 4))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="parnet-heartbeat", daemon=True)
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
                if link.sends == e.sends:  # nothing sent since the last beat
                    with contextlib.suppress(OSError):
                        link.send_frame(msg.PING)
                e.sends = link.sends
                quiet = link.silent_for()
                if quiet is not None and quiet > e.timeout:
                    reason = f"no sign of life from {link.name} for {quiet:.0f} s"
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
