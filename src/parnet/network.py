"""A node's view of one client network: the N+1 slots, their data links, and the data calls.

The same ``Network`` type serves each server worker (node i >= 1); the client (node 0) uses
its subclass ``client.session.ClientSession``, which adds the command links (remote errors,
forwarded output, interrupts, ``rfeval`` results). Slot ``self_index`` is the local machine
and has no link; every other slot has one data link (``Link``). ``psend``/``precv``/
``select_sockets`` run entirely in the caller's thread (see ``link``): no reader threads.
The subclass hooks in where a wait must also watch the command links: ``_wait_value``,
``_side_links``, ``check_errors`` and ``data_lost``.
"""

from __future__ import annotations

import logging
import numbers
import pickle
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .checks import seconds as check_seconds
from .errors import ConnectionClosed, ProtocolError
from .transport.link import Link, wait_links
from .wire import messages as msg
from .wire import serialize
from .wire.framing import encode_small

log = logging.getLogger(__name__)
#: Bodies up to this size are sent as one pre-joined frame (``Link.send_encoded``).
SMALL_BODY = 64 * 1024


@dataclass
class NodeInfo:
    """What ``network_get_info`` reports about one node.

    Attributes:
        local_machine: ``True`` for the node of the calling process.
        nproc: usable processors of that machine.
        nlocaljobs: local processes a map uses there (0: the default, ``nproc``).
        peername: the server's name as given to ``pconnect`` (empty for the local machine).
        open: whether the connection to it is open.
        network_id: the network's UUID.
        real_node_id: 0 for the client, servers from 1.
    """

    local_machine: bool
    nproc: int
    nlocaljobs: int
    peername: str
    open: bool
    network_id: str
    real_node_id: int


class Node:
    """One slot of the network as this process sees it."""

    def __init__(self, index: int, host: str) -> None:
        self.index = index
        self.host = host
        self.data: Link | None = None
        self.nproc = 0
        self.nlocaljobs = 0
        self.open = True
        self.stash: deque[Any] = deque()  # VALUE frames read while looking for another kind
        self.closed_reason: str = ""
        self.versions: dict[str, str] = {}  # the node's (client side: from its READY)

    def __repr__(self) -> str:
        return f"<Node {self.index} {self.host!r}{'' if self.open else ' closed'}>"

    def links(self) -> tuple[Link, ...]:
        """This node's links (the data link; at the client also the command link)."""
        return () if self.data is None else (self.data,)


class Network:
    """The nodes of one client network, from this process's side.

    Args:
        netid: the 16-byte network id.
        hosts: the server names in ``pconnect`` order (slot 0, the client, is not in it).
        self_index: this process's slot (0 at the client).
    """

    def __init__(self, netid: bytes, hosts: Sequence[str], self_index: int) -> None:
        self.netid = netid
        self.self_index = self_index
        self.nodes = [self.make_node(0, "")] + [
            self.make_node(k + 1, h) for k, h in enumerate(hosts)
        ]
        self.closed = False
        self.on_close: list[Callable[[], None]] = []
        #: Called before a value goes to node 0 (at a server: what the worker printed is
        #: sent first, so the client shows it before it returns the value).
        self.before_send_to_client: Callable[[], None] | None = None
        self._singles: dict[int, Connections] = {}

    def make_node(self, k: int, host: str) -> Node:
        """The ``Node`` of slot ``k`` (a subclass makes its own kind)."""
        return Node(k, host)

    def single(self, k: int) -> Connections:
        """The single connection to node ``k`` (one object per node, made once)."""
        c = self._singles.get(k)
        if c is None:
            c = self._singles[k] = Connections(self, (k,))
        return c

    @property
    def is_client(self) -> bool:
        """Whether this process is the client (node 0)."""
        return self.self_index == 0

    @property
    def id_str(self) -> str:
        """The network id as a UUID string."""
        return str(uuid.UUID(bytes=self.netid))

    def name(self, k: int) -> str:
        """How node ``k`` is named in messages."""
        if k == 0:
            return "the client (node 0)"
        return f"{self.nodes[k].host} (node {k})"

    # -- the data calls --------------------------------------------------------------
    def psend(self, value: Any, idxs: Sequence[int]) -> None:
        """Sends ``value`` to every node in ``idxs`` except this one."""
        if self.before_send_to_client is not None and 0 in idxs:
            self.before_send_to_client()
        if len(idxs) == 1 and type(value) in serialize.PLAIN:  # the hot path: one small value
            k = idxs[0]
            if k == self.self_index:
                return
            body = pickle.dumps(value, 5)
            if len(body) <= SMALL_BODY:
                link = self._data_link(k)
                try:
                    link.send_encoded(encode_small(msg.VALUE, body))
                except ConnectionClosed as e:
                    self.lost(k, f"data link broken: {e}")
                    raise
                return
        targets = [k for k in idxs if k != self.self_index]
        if not targets:
            return
        body, buffers, flags = serialize.dumps(value)
        for k in targets:
            link = self._data_link(k)
            try:
                link.send_frame(msg.VALUE, body, buffers, flags)
            except ConnectionClosed as e:
                self.lost(k, f"data link broken: {e}")
                raise

    def precv(self, k: int, timeout: float | None = None) -> Any:
        """Receives the next value from node ``k``."""
        return self._precv(k, timeout)

    def _precv(self, k: int, timeout: float | None = None) -> Any:
        if k == self.self_index:
            raise ValueError("precv: cannot receive from the local machine itself")
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        link = self._data_link(k)
        node = self.nodes[k]
        if node.stash:
            f = node.stash.popleft()
            return serialize.loads(f.body, f.buffers)
        f = self._wait_value(k, link, deadline, timeout)
        try:
            if f is None:
                f = link.recv_frame(deadline)
        except TimeoutError:
            raise TimeoutError(f"precv: nothing from {self.name(k)} within {timeout} s") from None
        except ConnectionClosed as e:
            self.data_lost(k, e)
        if f.code != msg.VALUE:
            raise ProtocolError(f"unexpected message {f.code} on the data link from {self.name(k)}")
        return serialize.loads(f.body, f.buffers)

    def _wait_value(self, k: int, link: Link, deadline: float | None, timeout: float | None) -> Any:
        """Hook of ``precv``: waits for the next frame of ``k``'s data ``link`` while also
        watching what else matters (the client: the command link), or returns None to let
        ``link.recv_frame`` wait alone."""
        return None

    def select(self, idxs: Sequence[int], timeout: float | None) -> list[int]:
        """Positions in ``idxs`` whose node has a value ready for ``precv``."""
        return self._select(idxs, timeout)

    def _select(self, idxs: Sequence[int], timeout: float | None) -> list[int]:  # noqa: C901
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            self.check_errors(idxs)
            ready = []
            links: list[Link] = []
            owners: list[int] = []
            for pos, k in enumerate(idxs):
                if k == self.self_index:
                    continue
                node = self.nodes[k]
                link = node.data
                if link is None:
                    continue
                if node.stash:
                    ready.append(pos)
                    continue
                try:
                    if link.ready():
                        ready.append(pos)
                        continue
                except ConnectionClosed:
                    self.lost(k, "data link closed")
                    ready.append(pos)  # precv will raise ConnectionClosed at once
                    continue
                links.append(link)
                owners.append(-1 - pos)
                for side in self._side_links(k):
                    links.append(side)
                    owners.append(k)
            if ready or not links:
                return ready
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            got = wait_links(links, deadline)
            for g in got:
                if owners[g] >= 0:
                    self._side_ready(owners[g])
            if not got and deadline is not None and time.monotonic() >= deadline:
                return []

    def check_errors(self, idxs: Sequence[int]) -> None:
        """Hook of ``select``: raises a failure reported by one of ``idxs`` (the client)."""

    def _side_links(self, k: int) -> tuple[Link, ...]:
        """Hook of ``select``: other links of node ``k`` whose traffic ends a wait."""
        return ()

    def _side_ready(self, k: int) -> None:
        """Hook of ``select``: one of ``_side_links(k)`` has something to read."""

    def data_lost(self, k: int, e: ConnectionClosed) -> NoReturn:
        """The data link of node ``k`` ended: marks the node lost and raises
        ``ConnectionClosed`` (naming the reason the node gave, if it gave one)."""
        node = self.nodes[k]
        self.lost(k, f"data link closed: {e}")  # keeps a notice's reason if one came first
        raise ConnectionClosed(f"{self.name(k)}: {node.closed_reason}") from e

    def recv_special(self, k: int, code: int, deadline: float | None = None) -> Any:
        """Receives the next frame of kind ``code`` from node ``k``'s data link, keeping any
        user values that come before it for later ``precv`` calls (in order)."""
        link = self._data_link(k)
        while True:
            f = link.recv_frame(deadline)
            if f.code == code:
                return f
            if f.code != msg.VALUE:
                raise ProtocolError(
                    f"unexpected message {f.code} on the data link from {self.name(k)}"
                )
            self.nodes[k].stash.append(f)

    def on_link_dead(self, k: int) -> Callable[[Link, str], None]:
        """The heartbeat's callback for a link of node ``k`` whose peer fell silent."""
        return lambda link, why: self.lost(k, why)

    def lost(self, k: int, why: str) -> None:
        """Node ``k`` is gone (``why``): marks it closed and its links dead. The first
        reason given is kept."""
        node = self.nodes[k]
        if node.open:
            node.open = False
            node.closed_reason = why
            for link in node.links():
                if link.error is None and not link.closed:
                    link.declare_dead(f"{self.name(k)}: {why}")
            log.info("lost %s: %s", self.name(k), why)

    def _data_link(self, k: int) -> Link:
        if not 0 <= k < len(self.nodes):
            raise IndexError(f"no node {k} in this network")
        if self.closed:
            raise ConnectionClosed("the network is closed")
        node = self.nodes[k]
        if node.data is None:
            raise ConnectionClosed(f"no data link to {self.name(k)}")
        if not node.open and not node.data.has_frame():
            why = node.closed_reason or "closed"
            raise ConnectionClosed(f"{self.name(k)} is not open: {why}")
        return node.data

    def shutdown(self) -> None:
        """Closes the whole network (``sclose``; the client first tells its workers)."""
        self.close()

    def close(self) -> None:
        """Closes every link of this node. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for node in self.nodes:
            node.open = False
            for link in node.links():
                link.close()
        for cb in self.on_close:
            cb()


class Connections:
    """A network's nodes, or a subset of them, as ``pconnect`` returns them.

    ``conns[0]`` is the local machine (no real connection), ``conns[1:]`` the servers in the
    order given to ``pconnect``. Indexing with an int gives a single connection, with a
    slice, a list of ints or a list of bools a subset; iterating yields single connections.
    ``str(conns)`` shows the network id and each node with its state. ``with conns:``
    closes the network on exit. At a server, ``reval`` code sees the same network as
    ``sockets``, in the same order.
    """

    __slots__ = ("_net", "_idx")

    def __init__(self, net: Network, idx: Sequence[int]) -> None:
        self._net = net
        self._idx = tuple(idx)

    @property
    def network(self) -> Network:
        """The network these connections belong to."""
        return self._net

    @property
    def indices(self) -> tuple[int, ...]:
        """The node indices (0 = client) of this subset."""
        return self._idx

    def __len__(self) -> int:
        return len(self._idx)

    def __iter__(self) -> Iterator[Connections]:
        for k in self._idx:
            yield self._net.single(k)

    def __getitem__(self, key: int | slice | Sequence[int] | Sequence[bool]) -> Connections:
        idx = self._idx
        if type(key) is int:  # the common case, e.g. sockets[0]: one cached object per node
            return self._net.single(idx[key])
        if isinstance(key, bool):
            raise TypeError("index with an int, a slice, or a list of ints or bools")
        if isinstance(key, numbers.Integral):
            return self._net.single(idx[int(key)])
        if isinstance(key, slice):
            return Connections(self._net, idx[key])
        if isinstance(key, (str, bytes)) or not isinstance(key, Iterable):
            raise TypeError(
                f"Connections index must be an int, a slice, or a list of ints or bools, "
                f"got {type(key).__name__} {key!r:.40}"
            )
        keys = list(key)
        if keys and all(isinstance(b, bool) for b in keys):
            if len(keys) != len(idx):
                raise IndexError(f"bool index of length {len(keys)} for {len(idx)} connections")
            return Connections(self._net, [k for k, b in zip(idx, keys, strict=True) if b])
        if not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in keys):
            raise TypeError("Connections index must be an int, a slice, or a list of ints or bools")
        picked = [idx[int(k)] for k in keys]
        if len(set(picked)) != len(picked):
            raise ValueError(f"Connections index {keys} names a node twice")
        return Connections(self._net, picked)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Connections) and other._net is self._net and other._idx == self._idx
        )

    def __hash__(self) -> int:
        return hash((id(self._net), self._idx))

    def __str__(self) -> str:
        net = self._net
        lines = [
            f"parnet network {net.id_str} ({len(self._idx)} of {len(net.nodes)} nodes"
            f"{', closed' if net.closed else ''}):"
        ]
        for k in self._idx:
            node = net.nodes[k]
            if k == net.self_index:
                desc = "local machine"
            else:
                desc = f"{node.host or 'client'}  {'open' if node.open and not net.closed else 'closed'}"
            lines.append(f"  [{k}] node {k}: {desc}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        """One line: the network id, then each node (up to 8) with its state, e.g.
        ``<Connections 1a2b3c4d: [0] local, [1] srv1 open 8 cpus, [2] srv2 closed (...)>``."""
        net = self._net
        parts = []
        for k in self._idx[:8]:
            node = net.nodes[k]
            if k == net.self_index:
                parts.append(f"[{k}] local")
            elif node.open and not net.closed:
                cpus = f" {node.nlocaljobs or node.nproc} jobs" if node.nproc else ""
                parts.append(f"[{k}] {node.host or 'client'} open{cpus}")
            else:
                why = node.closed_reason or "closed"
                parts.append(f"[{k}] {node.host or 'client'} closed ({why[:60]})")
        if len(self._idx) > 8:
            parts.append(f"... {len(self._idx) - 8} more")
        state = " closed" if net.closed else ""
        return f"<Connections {net.id_str[:8]}{state}: {', '.join(parts)}>"

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, *exc: object) -> None:
        self._net.shutdown()

    def __reduce__(self) -> Any:
        raise TypeError("Connections cannot be sent to another machine; use `sockets` there")


def single_index(conns: Connections, what: str) -> int:
    if not isinstance(conns, Connections):
        raise TypeError(f"{what}: expected a Connections object, got {type(conns).__name__}")
    if len(conns) != 1:
        raise ValueError(f"{what}: needs one single connection, got {len(conns)}")
    return conns.indices[0]


def psend(value: Any, connections: Connections) -> None:
    """Sends ``value`` to every node in ``connections`` except the calling one.

    Never waits for the receiver to call ``precv``: what the socket does not take at once is
    queued and written in the background, in order.

    Args:
        value: any value cloudpickle can pickle (NumPy arrays travel without extra copies).
        connections: the target nodes; the calling node, if included, is skipped.

    Raises:
        ConnectionClosed: a target node is gone.
        pickle.PicklingError, TypeError: the value cannot be sent.
    """
    if not isinstance(connections, Connections):
        raise TypeError(f"psend: expected a Connections object, got {type(connections).__name__}")
    connections._net.psend(value, connections._idx)


def precv(single_connection: Connections, timeout: float | None = None) -> Any:
    """Returns the next value sent by the one node in ``single_connection``, in send order.

    Args:
        single_connection: one node other than the calling one (for example ``conns[1]``,
            or ``sockets[0]`` at a server for the client).
        timeout: seconds to wait; ``None`` waits without limit.

    Returns:
        The value, as ``psend`` sent it.

    Raises:
        ValueError: the connection is the calling node itself, or not a single one.
        TimeoutError: nothing arrived within ``timeout`` seconds.
        ConnectionClosed: the peer is gone.
        RemoteError: (client) the server reported a failed command.
    """
    if timeout is not None:
        timeout = check_seconds(timeout, "precv: timeout", negative_ok=True)
    if type(single_connection) is Connections and len(single_connection._idx) == 1:  # the hot path
        return single_connection._net.precv(single_connection._idx[0], timeout)
    k = single_index(single_connection, "precv")
    return single_connection.network.precv(k, timeout)


def select_sockets(
    connections: Connections, timeout: float | None, nfds: int | None = None
) -> list[int]:
    """Positions (0-based, into ``connections``) of the nodes ``precv`` can read at once.

    Args:
        connections: the nodes to watch.
        timeout: seconds; negative or ``None`` waits without limit; 0 polls.
        nfds: accepted for compatibility with Octave and ignored.

    Returns:
        The 0-based positions of the ready nodes (empty when the timeout passed).

    Raises:
        RemoteError: (client) a server among ``connections`` reported a failed command.
    """
    if not isinstance(connections, Connections):
        raise TypeError(
            f"select_sockets: expected a Connections object, got {type(connections).__name__}"
        )
    timeout = check_seconds(timeout, "select_sockets: timeout", negative_ok=True)
    return connections.network.select(connections.indices, timeout)
