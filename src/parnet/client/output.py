"""The client's output reader: what servers print reaches this process's stderr as it comes.

One daemon thread per client process waits in ``poll`` on the command links of every open
network (and on a wake-up pipe for networks opened or closed meanwhile). When one has
something, it takes that network's read lock and reads its command links
(``ClientSession.background_pump``): forwarded output is printed, error reports and results are
kept for the call that wants them. A call that is running holds the read lock and reads
the command links it waits on itself, so the reader never takes a frame from under it: it
leaves that network out of its wait and tries again 50 ms later (no busy loop on a link
that stays readable meanwhile). The thread and its pipe exist only while a network is open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import weakref

from .session import ClientSession as Network

log = logging.getLogger(__name__)

#: While a call holds a network's read lock, the reader looks again this often (seconds).
RETRY = 0.05
#: The longest wait in one ``poll``: a wait holds a reference to each socket, so a socket
#: closed without a shutdown elsewhere would not really close (no FIN, no RST) before it ends.
IDLE = 1.0
_EVENTS = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class OutputReader:
    """Reads the command links of client networks while no call does (module docstring)."""

    def __init__(self) -> None:
        self._nets: weakref.WeakSet[Network] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._retired = False
        self._thread = threading.Thread(target=self._run, name="parnet-output-reader", daemon=True)
        self._thread.start()

    def add(self, net: Network) -> None:
        """Reads ``net``'s command links from now on (until it is closed); ``_reader_lock``
        held (see ``watch_output``)."""
        with self._lock:
            self._nets.add(net)
        net.on_close.append(self.wake)
        self.wake()

    def _retire(self) -> bool:
        """Ends the reader if no network is open (True), closing its pipe."""
        global _reader
        with _reader_lock, self._lock:
            if any(not n.closed for n in self._nets):
                return False
            if _reader is self:
                _reader = None
            self._retired = True
            os.close(self._wake_r)
            os.close(self._wake_w)
            return True

    def wake(self) -> None:
        """Makes the thread look at the set of networks again."""
        with self._lock, contextlib.suppress(OSError):
            if not self._retired:  # its pipe is closed (the numbers may be reused)
                os.write(self._wake_w, b"w")

    def _run(self) -> None:
        busy: list[Network] = []  # networks whose read lock a call held at the last try
        while True:
            p = select.poll()
            p.register(self._wake_r, select.POLLIN)
            fds: dict[int, Network] = {}
            with self._lock:
                nets = [n for n in self._nets if not n.closed]
            if not nets and self._retire():
                return
            for net in nets:
                if net in busy:
                    continue
                for node in net.nodes[1:]:
                    link = node.cmd
                    if link is not None and link.usable:
                        fds[link.fileno()] = net
                        p.register(link.fileno(), _EVENTS)
            try:
                events = p.poll(RETRY * 1000 if busy else IDLE * 1000)
            except OSError:  # a link closed under the poll: look again
                events = []
            ready = {fds[fd] for fd, _ in events if fd in fds}
            if any(fd == self._wake_r for fd, _ in events):
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
            ready.update(n for n in busy if not n.closed)
            busy = []
            for net in ready:
                try:
                    if not net.background_pump():
                        busy.append(net)
                except Exception:  # noqa: BLE001 - the reader must not die
                    log.exception("reading the command links of a network failed")


_reader: OutputReader | None = None
_reader_pid = 0
_reader_lock = threading.Lock()


def watch_output(net: Network) -> None:
    """Prints what ``net``'s servers say as it comes, until ``net`` is closed (starts this
    process's reader if none runs; a fresh one after a fork)."""
    global _reader, _reader_pid
    with _reader_lock:
        if _reader is None or _reader_pid != os.getpid():
            _reader = OutputReader()
            _reader_pid = os.getpid()
        _reader.add(net)
