"""The client side: ``pconnect`` and the calls that send commands to servers.

``pconnect`` sets a network up in three parallel phases (DESIGN.md, "Connection set-up"):

1. to every server at once: command connection, preamble, TLS, SRP (client checks the
   server's proof before anything else is sent);
2. SETUP to every worker (its node id, every node's address, the cwd, and only its own
   pairwise keys); meanwhile the client opens its own data link to every server;
3. wait for every worker's READY (its links to all other nodes are up).

Any failure closes everything opened so far and raises ``ConnectError`` naming the server.
"""

from __future__ import annotations

import atexit
import dataclasses
import getpass
import ipaddress
import itertools
import os
import socket
import sys
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..checks import function as check_function
from ..checks import port as check_port
from ..checks import seconds as check_seconds
from ..constants import CMD_PORT, PROTOCOL_VERSION
from ..errors import AuthenticationError, ConnectError, ConnectionClosed, ParnetError, ProtocolError
from ..network import Connections, NodeInfo, single_index
from ..transport import handshake
from ..transport.heartbeat import DEFAULT_TIMEOUT, check_timeout, monitor
from ..transport.link import Link, wait_links
from ..wire import messages as msg
from ..wire import serialize
from ..wire.framing import encode_small
from ..wire.messages import versions
from .output import watch_output
from .session import ClientSession

_open_networks: weakref.WeakSet[ClientSession] = weakref.WeakSet()
_req_ids = itertools.count(1)


def parse_host(spec: str) -> tuple[str, int]:
    """``"name"``, ``"name:port"``, ``"[v6addr]:port"`` or a bare IPv6 address -> (host, port)."""
    if not isinstance(spec, str):
        raise TypeError(f"pconnect: a host must be a str, got {type(spec).__name__} {spec!r:.60}")
    if not spec.strip():
        raise ValueError(f"pconnect: empty host name {spec!r}")
    spec = spec.strip()
    what = f"pconnect: host {spec!r}"
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not host or not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: expected '[address]' or '[address]:port'")
        return host, check_port(rest[1:], what) if rest else CMD_PORT
    if spec.count(":") == 1:
        host, port = spec.split(":")
        if not host:
            raise ValueError(f"{what}: no host name before the ':'")
        return host, check_port(port, what)
    return spec, CMD_PORT


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos
    )


def _check_hosts(hosts: Sequence[str]) -> list[tuple[str, int]]:
    if isinstance(hosts, str) or not isinstance(hosts, Sequence) or not hosts:
        raise ValueError("hosts must be a non-empty list of server names")
    addrs = [parse_host(h) for h in hosts]
    if len(set(addrs)) != len(addrs):
        raise ValueError(f"server names must be unique: {list(hosts)}")
    loop = [_is_loopback(h) for h, _ in addrs]
    if any(loop[1:]) and not all(loop):
        bad = [hosts[k] for k in range(1, len(hosts)) if loop[k]]
        raise ValueError(
            f"a loopback name ({', '.join(bad)}) is accepted only as the first server, or when "
            "every server is on this machine: the other servers must reach it by that name"
        )
    return addrs


def _credentials(password_file: str | None, user: str | None) -> tuple[str, str]:
    if user is not None:
        if not isinstance(user, str) or not user:
            raise TypeError(f"pconnect: user must be a non-empty str, got {user!r:.60}")
        try:
            return user, getpass.getpass(f"parnet password for {user}: ")
        except EOFError:
            raise ConnectError(
                f"pconnect(user={user!r}): no terminal to ask for the password (standard "
                "input is at its end); use password_file= instead"
            ) from None
    if password_file is not None and not isinstance(password_file, (str, os.PathLike)):
        raise TypeError(
            f"pconnect: password_file must be a path, got {type(password_file).__name__}"
        )
    from ..auth.keyfile import read_client_password

    return read_client_password(password_file)


def pconnect(  # noqa: C901
    hosts: Sequence[str],
    *,
    use_tls: bool = True,
    password_file: str | None = None,
    user: str | None = None,
    timeout: float = 30.0,
    forward_output: bool = True,
    heartbeat: float | None = None,
) -> Connections:
    """Connects to the servers ``hosts`` and sets up the full mesh between all of them.

    Args:
        hosts: server names, ``"name"`` or ``"name:cmdport"`` (IPv6: ``"[addr]:port"``).
        use_tls: TLS + SRP authentication (the servers must agree).
        password_file: the client SRP file (default ``$PARNET_HOME/srp/client/user_passwd``).
        user: ask for this user's password at the terminal instead of reading the file.
        timeout: seconds for the whole set-up.
        forward_output: print what the servers' code prints on this process's stderr, each
            line prefixed with the server's name (beyond Octave).
        heartbeat: seconds after which a server whose machine or network has stopped
            answering counts as dead (default ``$PARNET_HEARTBEAT_TIMEOUT`` or 10; beyond
            Octave). A server that is only busy (even holding the GIL for hours) or frozen
            (SIGSTOP) is never declared dead: its kernel still answers (API.md, "Liveness").

    Returns:
        The network's ``Connections``: ``[0]`` is this machine, ``[1:]`` the servers in order.

    Raises:
        ValueError: bad or duplicate names, misplaced loopback name, a ``heartbeat`` that is
            not a finite number of seconds > 0 (``TypeError``: not a number).
        ConnectError: a server could not be reached, set up, or (``AuthenticationError``)
            authenticated; the message names it. Nothing is left open.
    """
    addrs = _check_hosts(hosts)
    names = [str(h) for h in hosts]
    timeout = check_seconds(timeout, "pconnect: timeout", none_ok=False, zero_ok=False)  # type: ignore[assignment]
    if heartbeat is not None:
        heartbeat = check_seconds(heartbeat, "pconnect: heartbeat", zero_ok=False)
    hb = (
        check_timeout(DEFAULT_TIMEOUT, "PARNET_HEARTBEAT_TIMEOUT")
        if heartbeat is None
        else check_timeout(heartbeat, "pconnect: heartbeat")
    )  # also finite
    deadline = time.monotonic() + timeout
    username = password = ""
    ctx = None
    master = None
    if use_tls:
        from ..auth.pairkeys import new_master_secret
        from ..auth.tls import client_context

        username, password = _credentials(password_file, user)
        ctx = client_context()
        master = new_master_secret()
    netid = uuid.uuid4().bytes
    net = ClientSession(netid, names)
    n = len(addrs)
    pool = ThreadPoolExecutor(max_workers=min(32, n))
    certs: dict[int, bytes] = {}  # node -> its command link's certificate hash
    try:

        def login(k: int) -> tuple[Link, int]:
            host, port = addrs[k - 1]
            pre = handshake.Preamble(PROTOCOL_VERSION, handshake.KIND_CMD, use_tls, netid, 0, k)
            sock, dport = handshake.open_channel(host, port, pre, deadline=deadline, ctx=ctx)
            link = Link(sock, name=f"{names[k - 1]} (node {k}, command)", authenticated=not use_tls)
            try:
                if use_tls:
                    from ..auth import known_servers
                    from ..auth.tls import peer_binding

                    cb = certs[k] = peer_binding(sock)
                    where = known_servers.server_key(host, port)
                    new = known_servers.check(where, cb)  # pinned on first use, like ssh
                    handshake.srp_client(link, username, password, cb, True, deadline)
                    if new:
                        known_servers.pin(where, cb)
            except AuthenticationError as e:
                link.close()
                raise AuthenticationError(f"{names[k - 1]}: {e}") from e
            except BaseException:
                link.close()
                raise
            return link, dport

        results = _gather(pool, login, range(1, n + 1), names)
        data_addrs = []
        for k, (link, dport) in enumerate(results, start=1):
            net.nodes[k].cmd = link
            data_addrs.append((addrs[k - 1][0], dport))
        for k in range(1, n + 1):
            keys = {}
            if master is not None:
                from ..auth.pairkeys import pair_key

                keys = {j: pair_key(master, netid, k, j) for j in range(n + 1) if j != k}
            setup = msg.Setup(
                k,
                names,
                data_addrs,
                os.getcwd(),
                keys,
                0,
                max(0.5, deadline - time.monotonic()),
                forward_output,
                hb,
                versions(),
            )
            net.nodes[k].cmd.send_frame(*msg.encode(setup))  # type: ignore[union-attr]

        def data_link(k: int) -> Link:
            host, dport = data_addrs[k - 1]
            pre = handshake.Preamble(PROTOCOL_VERSION, handshake.KIND_DATA, use_tls, netid, 0, k)
            sock, _ = handshake.open_channel(host, dport, pre, deadline=deadline, ctx=ctx)
            link = Link(sock, name=f"{names[k - 1]} (node {k})", authenticated=not use_tls)
            if use_tls:
                from ..auth.pairkeys import pair_key
                from ..auth.tls import peer_binding

                cb = peer_binding(sock)
                if cb != certs[k]:
                    link.close()
                    raise ConnectError(
                        f"{names[k - 1]}: its data port presented another certificate than its "
                        "command port (a redirect to another server?)"
                    )
                handshake.tags_initiator(
                    link,
                    pair_key(master, netid, 0, k),  # type: ignore[arg-type]
                    netid,
                    0,
                    k,
                    cb,
                    deadline,
                )
            return link

        for k, link in enumerate(_gather(pool, data_link, range(1, n + 1), names), start=1):
            net.nodes[k].data = link
        for k in range(1, n + 1):
            _await_ready(net, k, deadline)
        _warn_versions(net)
        mon = monitor()
        for k in range(1, n + 1):
            for link in (net.nodes[k].cmd, net.nodes[k].data):
                mon.watch(link, hb, net.on_link_dead(k))
    except BaseException:
        net.close()
        raise
    finally:
        pool.shutdown(wait=True)
        if master is not None:
            master[:] = bytes(len(master))
    _open_networks.add(net)
    watch_output(net)  # what the servers print arrives as it is printed
    return Connections(net, range(n + 1))


def _gather(
    pool: ThreadPoolExecutor, fn: Callable[[int], Any], ks: range, names: list[str]
) -> list[Any]:
    """Runs ``fn(k)`` for every k at once; on any failure closes what the others opened."""
    futs = [pool.submit(fn, k) for k in ks]
    out: list[Any] = []
    first: BaseException | None = None
    for k, fut in zip(ks, futs, strict=True):
        try:
            out.append(fut.result())
        except BaseException as e:  # noqa: BLE001
            if first is None:
                first = e if isinstance(e, ConnectError) else ConnectError(f"{names[k - 1]}: {e}")
                first.__cause__ = e if first is not e else e.__cause__
    if first is not None:
        for r in out:
            (r[0] if isinstance(r, tuple) else r).close()
        raise first
    return out


def _await_ready(net: ClientSession, k: int, deadline: float) -> None:
    node = net.nodes[k]
    assert node.cmd is not None
    try:
        f = node.cmd.recv_frame(deadline)
    except TimeoutError:
        raise ConnectError(
            f"{node.host}: the server did not finish setting up the network in time"
        ) from None
    except (ConnectionClosed, ProtocolError) as e:
        raise ConnectError(f"{node.host}: {e}") from e
    if f.code not in (msg.SETUP_FAILED, msg.READY):
        raise ConnectError(f"{node.host}: unexpected message {f.code} during set-up")
    try:
        reply = msg.decode(f.code, f.body, f.buffers)
    except Exception as e:  # noqa: BLE001 - a bad reply fails this server's set-up
        raise ConnectError(f"{node.host}: bad reply during set-up: {e}") from e
    if isinstance(reply, msg.SetupFailed):
        raise ConnectError(f"{node.host}: {reply.reason}")
    node.nproc = int(reply.nproc)
    node.versions = reply.versions


def _warn_versions(net: ClientSession) -> None:
    """A different Python, parnet or library version on a node is worth a warning: pickles
    and code objects may not travel between them."""
    mine = versions()
    diffs = []
    for node in net.nodes[1:]:
        theirs = node.versions
        d = [
            f"{key} {theirs.get(key, '?')} (client {mine[key]})"
            for key in mine
            if theirs.get(key) != mine[key]
        ]
        if d:
            diffs.append(f"{node.host} (node {node.index}): " + ", ".join(d))
    if diffs:
        warnings.warn(
            "parnet: versions differ between nodes; values or functions may not travel: "
            + "; ".join(diffs),
            RuntimeWarning,
            stacklevel=3,
        )


_reval_frames: dict[str, bytes] = {}  # encoded REVAL frames of recent command strings


def servers_of(connections: Connections, what: str) -> tuple[ClientSession, list[int]]:
    """The client's session of ``connections`` and its server indices (``what``: the
    calling function, for errors)."""
    if not isinstance(connections, Connections):
        raise TypeError(f"{what}: expected a Connections object, got {type(connections).__name__}")
    net = connections.network
    if not isinstance(net, ClientSession):
        raise ParnetError(f"{what} can only be called at the client")
    if net.closed:
        raise ConnectionClosed("the network is closed")
    return net, [k for k in connections.indices if k != 0]


def _send_cmd(
    net: ClientSession, k: int, code: int, body: bytes, bufs: Sequence = (), flags: int = 0
) -> None:
    """Sends a command frame to server ``k`` after raising its pending errors (``code`` 0:
    ``body`` is a whole encoded frame)."""
    node = net.nodes[k]
    net.raise_errors([k])
    if node.open and node.data is not None and not node.data.usable and not node.data.has_frame():
        net.lost(k, f"data link broken: {node.data.error or 'closed'}")
    if node.cmd is None or not node.open:
        raise ConnectionClosed(f"{net.name(k)} is not open: {node.closed_reason or 'closed'}")
    try:
        if code:
            node.cmd.send_frame(code, body, bufs, flags)
        else:
            node.cmd.send_encoded(body)
    except ConnectionClosed:
        net.lost(k, "command link closed")
        raise


def reval(commands: str, connections: Connections, *, wait: bool = False) -> None:
    """Runs the Python source ``commands`` at every server in ``connections``.

    Returns as soon as the command is sent; commands run in order, in one namespace per
    server and network, where ``sockets``, ``psend``, ``precv``, ``select_sockets`` and
    ``np`` are predefined. A failure is reported by the next call that involves that server.

    Args:
        commands: Python source (statements), run with ``exec``.
        connections: the servers to run it at (the local machine, if included, is skipped).
        wait: return only once the commands have run on every server, and raise their
            failure now rather than in a later call (beyond Octave). Do not wait for
            commands that wait for something this client sends later.

    Raises:
        RemoteError: these commands (with ``wait``) or an earlier command at one of these
            servers failed.
        ConnectionClosed: a server is gone.
    """
    if not isinstance(commands, str):
        raise TypeError("reval: commands must be a str of Python source")
    net = connections.network if type(connections) is Connections else None
    if type(net) is ClientSession and not net.closed:
        ks: Sequence[int] = connections.indices  # the hot path (node 0 is skipped below)
    else:
        net, ks = servers_of(connections, "reval")
    frame = _reval_frames.get(commands)
    if frame is None:
        body, _, _ = serialize.dumps(commands)
        frame = encode_small(msg.REVAL, body)
        if len(frame) <= 4096 and len(_reval_frames) < 1024:
            _reval_frames[commands] = frame
    for k in ks:
        if k == 0:
            continue
        node = net.nodes[k]
        cmd = node.cmd
        data = node.data
        if node.errors or cmd is None or not node.open or data is None or not data.usable:
            careful = True
        else:
            with net.read_lock:  # one reader of command links at a time
                careful = cmd.readable_now()
        if careful:
            _send_cmd(net, k, 0, frame)  # pending errors, closed links
        else:
            assert cmd is not None
            try:
                cmd.send_encoded(frame)
            except ConnectionClosed:
                net.lost(k, "command link closed")
                raise
    if wait:
        _barrier(net, [k for k in ks if k != 0])


def _barrier(net: ClientSession, ks: Sequence[int]) -> None:
    """Returns once every server in ``ks`` has run every command sent to it before, and
    raises the first failure among them (a no-op call each, answered in command order)."""
    _call_and_wait(net, {k: next(_req_ids) for k in ks}, msg.Call(0, int, (), {}, None, None, True))


def rfeval(
    func: Callable[..., Any],
    *args: Any,
    connection: Connections,
    nout: int | None = None,
    isout: Sequence[bool] | None = None,
    wait: bool = True,
    **kwargs: Any,
) -> Any:
    """Calls ``func(*args, **kwargs)`` at the one server ``connection``.

    Args:
        func: any callable: a function importable at the server, a lambda, a closure.
        *args: positional arguments for ``func``.
        connection: exactly one server (for example ``conns[1]``).
        nout: ``func`` returns an ``nout``-tuple; the result is then a list of its items.
        isout: with ``nout``, ``nout`` bools choosing which items are returned.
        wait: ``False`` returns at once; the result is read later with ``precv``.
        **kwargs: keyword arguments for ``func``.

    Returns:
        With ``wait``: the result (with ``nout=k``: a list of the outputs picked by ``isout``
        from the k-tuple ``func`` returns). Without: ``None``; read the result later with
        ``precv(connection)``.

    Raises:
        RemoteError: ``func`` raised there.
        ConnectionClosed: the server is gone.
        ValueError: ``connection`` is not one server, or a bad ``nout``/``isout``.
    """
    check_function(func, "rfeval: func")
    k = single_index(connection, "rfeval")
    net, _ = servers_of(connection, "rfeval")
    if k == 0:
        raise ValueError("rfeval: the connection must be a server, not the local machine")
    if nout is not None and (not isinstance(nout, int) or nout < 0):
        raise ValueError("rfeval: nout must be an int >= 0")
    if isout is not None:
        isout = [bool(b) for b in isout]
        if nout is None or len(isout) != nout:
            raise ValueError("rfeval: isout needs nout and must have nout elements")
    req = next(_req_ids)
    if not wait:
        _send_cmd(net, k, *msg.encode(msg.Call(req, func, args, kwargs, nout, isout, wait)))
        return None
    return _call_and_wait(net, {k: req}, msg.Call(req, func, args, kwargs, nout, isout, True))[k]


def _call_and_wait(net: ClientSession, reqs: dict[int, int], call: Any) -> dict[int, Any]:
    """Sends ``call`` (its ``req`` replaced by ``reqs[k]``) to every server ``k`` and waits for
    every answer. Raises the first failure among them: its own, else that of a command that
    no call waits for (a ``reval``), which ran before it; other threads' calls are theirs."""
    nodes = {k: net.nodes[k] for k in reqs}
    for k, req in reqs.items():
        nodes[k].calls.add(req)  # before sending: its failure may come back at once
    try:
        for k, req in reqs.items():
            _send_cmd(net, k, *msg.encode(dataclasses.replace(call, req=req)))

        def wait_all() -> dict[int, Any]:
            out: dict[int, Any] = {}
            while len(out) < len(reqs):
                for k, req in reqs.items():
                    if k in out:
                        continue
                    node = nodes[k]
                    net.pump_cmd(k)
                    net.raise_call_error(k, req)
                    net.raise_errors([k], check=False)
                    if req in node.results:
                        out[k] = node.results.pop(req)
                    elif not node.open:
                        raise ConnectionClosed(f"{net.name(k)} is gone: {node.closed_reason}")
                left = [nodes[k].cmd for k in reqs if k not in out]
                if left:
                    wait_links(left, None)  # type: ignore[arg-type]
            return out

        return net.waiting_call(list(reqs), wait_all)
    finally:
        for k, req in reqs.items():
            nodes[k].calls.discard(req)
            nodes[k].results.pop(req, None)


def sclose(connections: Connections) -> None:
    """Closes the whole network ``connections`` belongs to; its server workers exit.

    Closes all of it, even when given a subset or a single connection. Idempotent; the
    servers themselves keep running for other clients.

    Args:
        connections: any part of the network to close.
    """
    if not isinstance(connections, Connections):
        raise TypeError(f"sclose: expected a Connections object, got {type(connections).__name__}")
    connections.network.shutdown()


def network_get_info(connections: Connections) -> list[NodeInfo]:
    """Describes each node in ``connections``.

    Args:
        connections: the nodes to describe (the local machine included, if in it).

    Returns:
        One ``NodeInfo`` per node, in the order of ``connections``.
    """
    if not isinstance(connections, Connections):
        raise TypeError(
            f"network_get_info: expected a Connections object, got {type(connections).__name__}"
        )
    net = connections.network
    out = []
    for k in connections.indices:
        node = net.nodes[k]
        if k == net.self_index:
            out.append(
                NodeInfo(
                    True,
                    len(os.sched_getaffinity(0)),
                    node.nlocaljobs,
                    "",
                    not net.closed,
                    net.id_str,
                    k,
                )
            )
            continue
        if isinstance(net, ClientSession) and not net.closed:
            net.pump_cmd(k)
        links_ok = all(lk.usable for lk in node.links())
        is_open = node.open and links_ok and not net.closed
        out.append(NodeInfo(False, node.nproc, node.nlocaljobs, node.host, is_open, net.id_str, k))
    return out


def network_set(connections: Connections, key: str, val: int) -> None:
    """Sets a property of every server in ``connections``.

    Args:
        connections: the servers to change.
        key: only ``"nlocaljobs"``, the number of local processes a map uses there.
        val: an int >= 0; 0 restores the default (the server's processor count).

    Raises:
        ValueError: an unknown key or a bad value.
    """
    if key != "nlocaljobs":
        raise ValueError(f"network_set: unknown key {key!r} (known: 'nlocaljobs')")
    if isinstance(val, bool) or not isinstance(val, int) or val < 0:
        raise ValueError("network_set: nlocaljobs needs an int >= 0")
    net, ks = servers_of(connections, "network_set")
    frame = msg.encode(msg.SetOption(key, val))
    for k in ks:
        _send_cmd(net, k, *frame)
        net.nodes[k].nlocaljobs = val


def install_vars(*names: str, connections: Connections, **values: Any) -> None:
    """Installs variables into the ``reval`` namespace of every server in ``connections``.

    Each name in ``names`` is looked up in the caller's scope (locals, then globals);
    ``values`` gives name=value pairs. The data goes to one server only and spreads from
    there over server-to-server links along a binary tree, so the client uploads it once.

    Args:
        *names: names of variables in the caller's scope.
        connections: the servers to install them at.
        **values: more variables, given as name=value.

    Raises:
        NameError: a name is not defined in the caller's scope.
    """
    frame = sys._getframe(1)
    allv: dict[str, Any] = {}
    try:
        for name in names:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"install_vars: bad variable name {name!r}")
            if name in frame.f_locals:
                allv[name] = frame.f_locals[name]
            elif name in frame.f_globals:
                allv[name] = frame.f_globals[name]
            else:
                raise NameError(f"install_vars: name {name!r} is not defined")
    finally:
        del frame
    allv.update(values)
    net, ks = servers_of(connections, "install_vars")
    if not ks or not allv:
        return
    children = {p: [ks[c] for c in (2 * p + 1, 2 * p + 2) if c < len(ks)] for p in range(len(ks))}
    _send_cmd(net, ks[0], *msg.encode(msg.Install(allv, 0, children[0])))
    for p in range(1, len(ks)):
        _send_cmd(net, ks[p], *msg.encode(msg.Install(None, ks[(p - 1) // 2], children[p])))


@atexit.register
def _close_all() -> None:
    for net in list(_open_networks):
        try:
            sclose(Connections(net, [0]))
        except Exception:  # noqa: BLE001, S110 - best effort at exit
            pass
