"""The client's side of a network: the command links next to the data links.

``ClientSession`` is the ``Network`` of node 0. Besides the data links it owns one command
link per server, which carries back what the worker reports: failures (``ERROR`` ->
``RemoteError``), forwarded output, interrupt acknowledgements, shutdown notices, ``rfeval``
results and map results. Those frames are handled by a table from message code to handler
(``_handlers``); they are read whenever a call touches that server (``reval``, ``precv``,
``select_sockets``, ``rfeval``) and, while no call runs, by the output reader thread as
they arrive (``client.output``; ``background_pump``, which only ever tries the read lock).

A ``precv`` waiting on a server also learns of a failure there at once: with a timeout it
waits on both links; without one it waits on the data link alone, where the worker
announces every ERROR/OUTPUT/SHUTDOWN frame it sends on the command link with a NOTICE
(``_next_value_frame``).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

from ..errors import ConnectionClosed, ProtocolError
from ..network import Network, Node
from ..transport.link import Link, poll_ms
from ..wire import messages as msg
from ..wire.framing import Frame

log = logging.getLogger(__name__)
#: Seconds ``precv`` waits at most for the output announced before a value (see
#: ``ClientSession._read_announced``).
ANNOUNCED_WAIT = 2.0
_TOLD = frozenset((msg.ERROR, msg.OUTPUT, msg.SHUTDOWN))  # counted by the worker's NOTICEs


class MapInbox(Protocol):
    """What a map running at the client gives the session: where its results go."""

    inbox: deque[Any]


class ServerNode(Node):
    """A server's slot at the client: its command link and what came on it."""

    def __init__(self, index: int, host: str) -> None:
        super().__init__(index, host)
        self.cmd: Link | None = None
        self.errors: deque[msg.ErrorReport] = deque()
        self.results: dict[int, Any] = {}  # rfeval results that came on the command link
        self.calls: set[int] = (
            set()
        )  # requests whose caller waits for the answer (its own error too)
        self.interrupt_pending = False  # Ctrl-C sent, not yet acknowledged
        self.told = 0  # ERROR/OUTPUT/SHUTDOWN frames read from the command link
        self.out_partial = b""  # forwarded output: the unfinished last line
        self._poller: select.poll | None = None

    def links(self) -> tuple[Link, ...]:
        """The data link and the command link (those that exist)."""
        return tuple(lk for lk in (self.data, self.cmd) if lk is not None)

    def announced(self) -> bool:
        """Whether the data link announced command-link frames not read yet."""
        return self.data is not None and self.data.notice > self.told

    def poller(self) -> select.poll:
        """A poll object over this node's data and command links, cached."""
        if self._poller is None:
            p = select.poll()
            for link in self.links():
                p.register(link.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
            self._poller = p
        return self._poller


class ClientSession(Network):
    """The network as the client (node 0) sees it: ``Network`` plus the command links."""

    nodes: list[ServerNode]  # type: ignore[assignment]

    def __init__(self, netid: bytes, hosts: Sequence[str]) -> None:
        super().__init__(netid, hosts, 0)
        # Whoever reads command links holds this: user calls, or the heartbeat thread that
        # prints forwarded output while no call is running (it only ever tries the lock).
        self.read_lock = threading.RLock()
        self.maps: dict[int, MapInbox] = {}  # network maps running, by map id

    def make_node(self, k: int, host: str) -> ServerNode:
        """Every slot at the client is a ``ServerNode`` (slot 0 has no links)."""
        return ServerNode(k, host)

    # -- the data calls, client side ----------------------------------------------------
    def precv(self, k: int, timeout: float | None = None) -> Any:
        """Receives the next value from server ``k`` (raising its reported failures)."""
        if timeout is None:
            with self.read_lock:
                try:
                    f = self._next_value_frame(k)
                    if f is not None:
                        if self.nodes[k].announced():
                            self._read_announced(k)
                        return pickle.loads(f.body, buffers=f.buffers)
                    return self._precv(k)
                except KeyboardInterrupt:
                    self.interrupt([k])
                    raise
        return self.waiting_call([k], self._precv, k, timeout)

    def _precv(self, k: int, timeout: float | None = None) -> Any:
        value = super()._precv(k, timeout)
        if self.nodes[k].announced():
            self._read_announced(k)
        return value

    def _read_announced(self, k: int) -> None:
        """Reads server ``k``'s command link until every frame announced (NOTICE) before the
        value just taken is in: the output its code printed before sending the value is shown
        before ``precv`` returns it. The worker sent those frames first, so they are in flight
        at most; a stalled command link is waited for ``ANNOUNCED_WAIT`` s at most."""
        node = self.nodes[k]
        deadline = time.monotonic() + ANNOUNCED_WAIT
        while node.announced() and node.cmd is not None and node.cmd.usable:
            self.pump_cmd(k)
            left = deadline - time.monotonic()
            if not node.announced() or left <= 0:
                return
            select.select([node.cmd.fileno()], [], [], left)

    def _next_value_frame(self, k: int) -> Frame | None:
        """The hot path of ``precv``: the next frame from ``k`` when it comes plainly
        (nothing stashed, no pending error); None when the general path (``_precv``) must
        decide.

        It waits on the data link alone (in ``recv``; with TLS in ``poll``, outside the TLS
        lock), not on the command link too: the
        worker follows every ERROR, OUTPUT or SHUTDOWN frame on the command link with a
        NOTICE on this data link carrying their count, and the wait starts only while every
        announced frame has been read (``link.notice <= node.told``). A NOTICE wakes it; the
        general path then reads the command link.
        """
        if not 0 < k < len(self.nodes) or self.closed:
            return None
        node = self.nodes[k]
        link = node.data
        if not node.open or node.stash or node.errors or node.cmd is None or link is None:
            return None
        f = link.take_frame()
        if f is None:
            if link.notice > node.told:
                return None
            try:
                f = link.pull_frame(block=True)
            except ConnectionClosed:
                return None
            if f is None:
                return None
        if f.code != msg.VALUE:
            raise ProtocolError(f"unexpected message {f.code} on the data link from {self.name(k)}")
        return f

    def _wait_value(
        self, k: int, link: Link, deadline: float | None, timeout: float | None
    ) -> Frame | None:
        """Waits on the data link and the command link at once (one cached poll object):
        a failure reported on the command link ends the wait."""
        node = self.nodes[k]
        if node.cmd is None:
            return None
        if node.errors:
            self._raise_errors([k], False)
        poller = node.poller()
        cmd_fd = node.cmd.fileno()
        while True:
            data_readable = False
            for fd, _ in poller.poll(0 if link.has_frame() else poll_ms(deadline)):
                if fd != cmd_fd:
                    data_readable = True
                    continue
                self.pump_cmd(k)
                if node.errors:
                    self._raise_errors([k], False)
            try:
                f = link.pull_frame() if data_readable else link.take_frame()
            except ConnectionClosed as e:
                self.data_lost(k, e)
            if f is not None or link.tls_pending():
                return f
            if not link.usable:
                return None  # recv_frame raises ConnectionClosed
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"precv: nothing from {self.name(k)} within {timeout} s")

    def select(self, idxs: Sequence[int], timeout: float | None) -> list[int]:
        """Positions in ``idxs`` whose node has a value ready for ``precv``."""
        return self.waiting_call(idxs, self._select, idxs, timeout)

    def waiting_call(self, idxs: Sequence[int], fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` holding the read lock of the command links; Ctrl-C during it
        interrupts the servers in ``idxs`` (``interrupt``)."""
        with self.read_lock:
            try:
                return fn(*args)
            except KeyboardInterrupt:
                self.interrupt(idxs)
                raise

    def check_errors(self, idxs: Sequence[int]) -> None:
        """Raises ``RemoteError`` for a failure reported by a server among ``idxs``."""
        self.raise_errors(idxs)

    def _side_links(self, k: int) -> tuple[Link, ...]:
        cmd = self.nodes[k].cmd
        return (cmd,) if cmd is not None and cmd.usable else ()

    def _side_ready(self, k: int) -> None:
        self.pump_cmd(k)

    def data_lost(self, k: int, e: ConnectionClosed) -> NoReturn:
        """The data link of server ``k`` ended: reads what its command link still holds (a
        SHUTDOWN notice or an error report says why), then raises."""
        self.pump_cmd(k)
        self.raise_errors([k], check=False)
        super().data_lost(k, e)

    # -- command links ------------------------------------------------------------------
    def pump_cmd(self, k: int) -> None:
        """Reads whatever frames have arrived on server ``k``'s command link."""
        node = self.nodes[k]
        link = node.cmd
        if link is None or not link.usable:
            return
        try:
            with self.read_lock:
                while (f := link.recv_frame(block=False)) is not None:
                    self._on_cmd_frame(node, f)
        except ConnectionClosed:
            self.lost(k, "command link closed (the server or its worker has gone)")
        except ProtocolError as e:
            self.lost(k, f"protocol error on the command link: {e}")

    def _on_cmd_frame(self, node: ServerNode, f: Frame) -> None:
        if f.code in _TOLD:
            node.told += 1
        handler = self._handlers.get(f.code)
        if handler is None:
            log.warning(
                "unexpected message %s from %s",
                msg.NAMES.get(f.code, f.code),
                self.name(node.index),
            )
        else:
            handler(self, node, f)

    def _on_output(self, node: ServerNode, f: Frame) -> None:
        self._print_output(node, bytes(f.body))

    def _on_error(self, node: ServerNode, f: Frame) -> None:
        rep: msg.ErrorReport = msg.decode(f.code, f.body, f.buffers)
        if rep.interrupted and node.interrupt_pending:
            return  # the Ctrl-C the user pressed, not a failure to report later
        node.errors.append(rep)

    def _on_interrupt_done(self, node: ServerNode, f: Frame) -> None:
        node.interrupt_pending = False

    def _on_shutdown(self, node: ServerNode, f: Frame) -> None:
        s: msg.Shutdown = msg.decode(f.code, f.body)
        self.lost(node.index, f"{s.reason} (notice from {node.host})")

    def _on_result(self, node: ServerNode, f: Frame) -> None:
        r: msg.Result = msg.decode(f.code, f.body, f.buffers)
        node.results[r.req] = r.value

    def _on_map_result(self, node: ServerNode, f: Frame) -> None:
        r: msg.MapResult = msg.decode(f.code, f.body, f.buffers)
        m = self.maps.get(r.map_id)
        if m is not None:  # late results of a map that has ended are dropped
            m.inbox.extend((node.index, job, res, dt) for job, res, dt in r.results)

    #: Command-link frame code -> handler.
    _handlers: dict[int, Callable[[ClientSession, ServerNode, Frame], None]] = {
        msg.OUTPUT: _on_output,
        msg.ERROR: _on_error,
        msg.INTERRUPT: _on_interrupt_done,
        msg.SHUTDOWN: _on_shutdown,
        msg.RESULT: _on_result,
        msg.MAP_RESULT: _on_map_result,
    }

    def _print_output(self, node: ServerNode, data: bytes) -> None:
        lines = (node.out_partial + data).split(b"\n")
        node.out_partial = lines.pop()
        if lines:
            prefix = f"[{node.host}] "
            text = "".join(prefix + ln.decode(errors="replace") + "\n" for ln in lines)
            sys.stderr.write(text)
            sys.stderr.flush()

    def flush_output(self) -> None:
        """Prints the unfinished last line of each server's forwarded output."""
        for node in self.nodes:
            if node.out_partial:
                data, node.out_partial = node.out_partial, b""
                self._print_output(node, data + b"\n")

    def background_pump(self) -> bool:
        """Reads command links if no call is using them (prints output, keeps errors);
        False if a call holds the read lock (it reads the links it waits on itself)."""
        if self.closed:
            return True
        if not self.read_lock.acquire(blocking=False):
            return False
        try:
            for node in self.nodes[1:]:
                if node.cmd is not None and node.cmd.usable and node.cmd.readable_now():
                    self.pump_cmd(node.index)
        finally:
            self.read_lock.release()
        return True

    def interrupt(self, idxs: Sequence[int]) -> None:
        """Ctrl-C at the client: asks these servers to interrupt their running command and
        drop queued map jobs. A second Ctrl-C while one is unanswered closes the network."""
        ks = [k for k in idxs if k != self.self_index and self.nodes[k].open]
        if any(self.nodes[k].interrupt_pending for k in ks):
            log.warning("second interrupt: closing the network")
            self.shutdown()
            return
        for k in ks:
            node = self.nodes[k]
            if node.cmd is not None and node.cmd.usable:
                try:
                    node.cmd.send_frame(msg.INTERRUPT)
                    node.interrupt_pending = True
                except OSError:
                    pass

    def raise_errors(self, idxs: Sequence[int], check: bool = True) -> None:
        """Raises ``RemoteError`` for the first pending remote failure among ``idxs``
        (reading what has arrived on their command links first, unless ``check`` is False)."""
        with self.read_lock:  # command links are read by one thread at a time
            self._raise_errors(idxs, check)

    def _raise_errors(self, idxs: Sequence[int], check: bool) -> None:
        for k in idxs:
            if k == self.self_index:
                continue
            node = self.nodes[k]
            if check and node.cmd is not None and node.cmd.usable and node.cmd.readable_now():
                self.pump_cmd(k)
            if node.errors:
                # A failure of a call another thread waits for is that thread's to raise.
                owned = [r for r in node.errors if r.req is not None and r.req in node.calls]
                if len(owned) == len(node.errors):
                    continue
                rep = next(r for r in node.errors if r.req is None or r.req not in node.calls)
                more = len(node.errors) - len(owned) - 1
                node.errors = deque(owned)
                raise rep.to_remote_error(node.host, k, more)

    def raise_call_error(self, k: int, req: int) -> None:
        """Raises the failure reported for the call ``req`` at server ``k``, if one came."""
        node = self.nodes[k]
        for r in node.errors:
            if r.req == req:
                node.errors.remove(r)
                raise r.to_remote_error(node.host, k)

    def shutdown(self) -> None:
        """Closes the whole network (``sclose``): first prints what the servers said and
        tells every worker to exit (CLOSE). Idempotent."""
        if self.closed:
            return
        with contextlib.suppress(Exception):
            for node in self.nodes[1:]:
                self.pump_cmd(node.index)  # print what the servers said before closing
        for node in self.nodes[1:]:
            if node.open:  # before the workers exit: their hang-ups are not the reason
                node.open = False
                node.closed_reason = "sclose was called"
            if node.cmd is not None and node.cmd.usable:
                try:
                    node.cmd.send_frame(msg.CLOSE)
                    node.cmd.flush(1.0)
                except OSError:
                    pass
        self.close()

    def close(self) -> None:
        """Prints the servers' unfinished output lines, then closes every link."""
        if not self.closed:
            self.flush_output()
        super().close()
