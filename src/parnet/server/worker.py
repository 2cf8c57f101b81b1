"""One worker process per client network on a server.

Life of a worker (forked by the daemon, which already read the connection's preamble)::

    authenticate the command link (TLS + SRP, or nothing with --no-tls)  -> tell daemon "A"
    SETUP from the client: node id, all hosts and data ports, cwd, pairwise keys
    fork the fork server of the local pool (maps.forkpool) while this is the only thread
    build the mesh: connect to every later node's data port (tag exchange as initiator);
        take every earlier node's data connection from the daemon (fd passing, responder)
    READY to the client
    loop: run commands in order in one persistent namespace; report failures as ERROR
    CLOSE or the client gone: close links, stop the local pool, exit

The command loop runs in the main thread and waits on the command link alone (one blocking
``recv`` on a plain link). A monitor thread takes what the daemon sends on the control
socket and, while a command has run for 50 ms or more, reads the command link for
INTERRUPT. A watchdog thread waits (in the kernel, no polling) for the client's side of the
command connection to hang up, so a client killed while a command runs still ends its
worker at once. ERROR, OUTPUT and SHUTDOWN frames go out through ``tell_client``, which
announces them on the data link to the client (NOTICE).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import linecache
import logging
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from ..constants import AUTH_DEADLINE, PROTOCOL_VERSION
from ..errors import AuthenticationError, ConnectError, ConnectionClosed, ParnetError, ProtocolError
from ..maps.forkpool import install_fork_server, start_forked
from ..network import Connections, Network, precv, psend, select_sockets
from ..transport import handshake
from ..transport.heartbeat import DEFAULT_TIMEOUT, monitor
from ..transport.link import Link
from ..wire import messages as msg
from ..wire import serialize
from ..wire.messages import versions

log = logging.getLogger("parnet.worker")

_exiting = threading.Lock()


def exit_worker(status: int) -> NoReturn:
    """Ends this worker process with ``status``. Several threads may decide to end it at once
    (the client hung up, the main loop returned, SIGTERM); only the first runs the exit, the
    others wait for it, so code hooked to ``os._exit`` (coverage's data save) runs once."""
    _exiting.acquire()
    os._exit(status)


#: Forwarded output is announced on the data link at most this often (seconds).
NOTICE_EVERY = 0.05

#: Seconds an incoming data link has for TLS and its tags during the mesh set-up.
INCOMING_LINK_DEADLINE = float(os.environ.get("PARNET_LINK_DEADLINE", "3"))
#: Incoming data links authenticated at once during the set-up (beyond: the oldest is aborted).
MAX_INCOMING_LINKS = 16
LINK_FAILURES_LOGGED = 10


@dataclass
class ServerConfig:
    """What the daemon hands each worker (inherited through fork)."""

    use_tls: bool
    data_port: int
    server_ctx: Any = None  # ssl.SSLContext for accepted connections
    client_ctx: Any = None  # ssl.SSLContext for outgoing data links
    cb: bytes = b""  # own certificate binding
    auth: Any = None  # keyfile.ServerAuth
    source: str | None = None  # address for outgoing data links (the bind address, if one)


class _NotingStream(io.TextIOWrapper):
    """A worker's ``sys.stdout``/``sys.stderr``: notes that something was written, so the
    worker sends the output ahead of the next value for the client (``_output_first``)."""

    written = False

    def write(self, s: str) -> int:
        """Writes ``s`` (through to the output pipe) and notes it."""
        _NotingStream.written = True
        return super().write(s)


class Worker:
    """The worker of one client network (see the module docstring)."""

    def __init__(
        self,
        cfg: ServerConfig,
        sock: socket.socket,
        ctl: socket.socket,
        peer: str,
        pre: handshake.Preamble,
        accepted_at: float,
    ) -> None:
        self.cfg = cfg
        self.ctl = ctl
        self.peer = peer
        self.netid = pre.netid
        self.accepted_at = accepted_at
        self._raw_sock = sock
        self.cmd: Link | None = None
        self.net: Network | None = None
        self.ns: dict[str, Any] = {}
        self._code_cache: dict[str, Any] = {}
        self._reval_code: dict[bytes, Any] = {}  # command frame body -> compiled code
        self._tell_lock = threading.RLock()  # RLock: SIGTERM's handler may tell while held
        self._told = 0  # ERROR/OUTPUT/SHUTDOWN frames sent (announced by NOTICE frames)
        self._notice_owed = False  # frames sent since the last NOTICE
        self._notice_at = 0.0  # when the last NOTICE went out
        self._out_lock = threading.Lock()  # the output pipe's reader (see _send_output)
        self._out_r = -1
        self.nlocaljobs = 0
        self.map_runner: Any = None
        #: Command code -> handler of its payload (REVAL, the hot path, is ``_reval``).
        self.commands_by_code: dict[int, Callable[[Any], None]] = {
            msg.CALL: self._call,
            msg.INSTALL: self._install,
            msg.SET: self._set,
            msg.MAP: self._map,
        }
        # The main thread owns the command link except while a command runs: then the
        # monitor thread may read it (for INTERRUPT), deferring other frames.
        self.reader_lock = threading.Lock()
        self.busy = False
        self.commands = 0  # commands started so far (the monitor tells long-running ones)
        self.deferred: deque[Any] = deque()
        self._interrupt_requested = False
        self.running = False
        self.heartbeat = DEFAULT_TIMEOUT
        self._wake = socket.socketpair()  # wakes the set-up when an incoming link is done

    # -- set-up ------------------------------------------------------------------------
    def authenticate(self) -> None:
        """TLS + SRP on the command connection, within the auth deadline."""
        deadline = self.accepted_at + AUTH_DEADLINE
        sock = self._raw_sock
        if self.cfg.use_tls:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock = self.cfg.server_ctx.wrap_socket(sock, server_side=True)
            self.cmd = Link(sock, name=f"client {self.peer}")
            user = handshake.srp_server(
                self.cmd,
                self.cfg.auth.lookup,
                self.cfg.auth.fake_secret,
                self.cfg.cb,
                True,
                deadline,
                on_success=self._tell_daemon,
            )
            log.info("client %s authenticated as %r", self.peer, user)
        else:  # nothing to check: the daemon learns of the client at its SETUP (setup())
            self.cmd = Link(sock, name=f"client {self.peer}", authenticated=True)

    def _tell_daemon(self) -> None:
        with contextlib.suppress(OSError):
            self.ctl.send(b"A")

    def recv_setup(self) -> msg.Setup:
        """Receives SETUP (without TLS, the first frame: it counts as the login)."""
        assert self.cmd is not None
        f = self.cmd.recv_frame(
            time.monotonic() + 60 if self.cfg.use_tls else self.accepted_at + AUTH_DEADLINE
        )
        if f.code != msg.SETUP:
            raise ConnectError(f"expected SETUP, got message {f.code}")
        if not self.cfg.use_tls:
            self._tell_daemon()
        return msg.decode(f.code, f.body, f.buffers)

    def setup(self, s: msg.Setup | None = None) -> None:
        """Builds the mesh of SETUP ``s`` (received here if None), answers READY (or
        SETUP_FAILED)."""
        assert self.cmd is not None
        if s is None:
            s = self.recv_setup()
        node = s.node
        net = self.net = Network(self.netid, s.hosts, node)
        self.data_addrs = [(str(h), int(p)) for h, p in s.data_addrs]
        self.keys = dict(s.keys)
        self.nlocaljobs = s.nlocaljobs
        self.heartbeat = float(s.heartbeat)
        cwd = s.cwd
        os.chdir(cwd if cwd and os.path.isdir(cwd) else tempfile.gettempdir())
        here = os.getcwd()
        if not sys.path or sys.path[0] != here:
            sys.path.insert(0, here)  # the client's modules in that directory import here
        deadline = time.monotonic() + s.timeout
        try:
            self._build_mesh(net, node, deadline)
        except Exception as e:  # noqa: BLE001 - reported to the client, which fails pconnect
            log.warning("network %s: mesh set-up failed: %s", net.id_str[:8], e)
            with contextlib.suppress(OSError):
                self.cmd.send_frame(*msg.encode(msg.SetupFailed(str(e))))
                self.cmd.flush(2)
            raise
        self.ns.update(
            __name__="__parnet__",
            sockets=Connections(net, range(len(net.nodes))),
            psend=psend,
            precv=precv,
            select_sockets=select_sockets,
            np=np,
        )
        nproc = len(os.sched_getaffinity(0))
        if s.forward_output:
            self._redirect_output()
            net.before_send_to_client = self._output_first
        mon = monitor()
        for k, nd in enumerate(net.nodes):
            if nd.data is not None:
                mon.watch(nd.data, self.heartbeat, net.on_link_dead(k))
        self.cmd.send_frame(*msg.encode(msg.Ready(nproc, os.getpid(), versions())))
        log.info("network %s: node %d ready (%d links)", net.id_str[:8], node, len(net.nodes) - 1)

    def _build_mesh(self, net: Network, node: int, deadline: float) -> None:
        n = len(net.nodes)

        def outgoing(j: int) -> Link:
            host, port = self.data_addrs[j - 1]
            pre = handshake.Preamble(
                PROTOCOL_VERSION, handshake.KIND_DATA, self.cfg.use_tls, self.netid, node, j
            )
            try:
                sock, _ = handshake.open_channel(
                    host,
                    port,
                    pre,
                    deadline=deadline,
                    ctx=self.cfg.client_ctx,
                    source=self.cfg.source,
                )
                link = Link(sock, name=f"node {j} ({host})", authenticated=not self.cfg.use_tls)
                if self.cfg.use_tls:
                    from ..auth.tls import peer_binding

                    cb = peer_binding(sock)
                    handshake.tags_initiator(link, self.keys[j], self.netid, node, j, cb, deadline)
                return link
            except (OSError, ParnetError, TimeoutError) as e:
                raise ConnectError(
                    f"server {node} ({net.nodes[node].host}) could not reach server {j} ({host}) "
                    f"at {host}:{port}: {e}"
                ) from e

        pool = ThreadPoolExecutor(max_workers=max(1, n - node - 1)) if node + 1 < n else None
        futures = {j: pool.submit(outgoing, j) for j in range(node + 1, n)} if pool else {}
        try:
            self._accept_links(net, node, deadline)
            for j, fut in futures.items():
                net.nodes[j].data = fut.result(timeout=max(0.01, deadline - time.monotonic()))
        finally:
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)

    def _accept_links(self, net: Network, node: int, deadline: float) -> None:  # noqa: C901
        """Takes the data links of the earlier nodes (and the client) from the daemon.

        Each incoming connection is authenticated in a thread of its own within
        ``INCOMING_LINK_DEADLINE``, at most ``MAX_INCOMING_LINKS`` at a time (beyond, the
        oldest attempt is aborted): one that never starts TLS, or is not from this network,
        cannot delay the real ones (SECURITY.md row 24). The first to authenticate for a node
        wins; later ones are closed.
        """
        waiting = set(range(node))
        lock = threading.Lock()
        self._expect(node, waiting)
        # attempt number -> (when it started, a duplicate of its socket to abort it with)
        inflight: dict[int, tuple[float, socket.socket]] = {}
        failed = [0]
        count = itertools.count()
        wake_r, wake_w = self._wake

        def attempt(pre: handshake.Preamble, sock: socket.socket, key: int) -> None:
            link = None
            try:
                link = self._accept_data(
                    sock, pre, min(deadline, time.monotonic() + INCOMING_LINK_DEADLINE)
                )
            except (OSError, ParnetError, TimeoutError, ValueError) as e:
                failed[0] += 1
                if (
                    failed[0] <= LINK_FAILURES_LOGGED
                ):  # an attacker may send many: a few, then a count
                    log.warning("data connection from node %d refused: %s", pre.src, e)
            with lock:
                _, dup = inflight.pop(key, (0.0, None))
                if dup is not None:
                    dup.close()
                if link is not None and pre.src in waiting:
                    net.nodes[pre.src].data = link
                    waiting.discard(pre.src)
                    self._expect(node, waiting)
                elif link is not None:
                    link.close()  # a second one for that node
            with contextlib.suppress(OSError):
                wake_w.send(b"x")

        try:
            while True:
                with lock:
                    if not waiting:
                        return
                    names = ", ".join(net.name(k) for k in sorted(waiting))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectError(
                        f"server {node} ({net.nodes[node].host}): no data connection "
                        f"from {names} in time"
                    )
                r, _, _ = select.select([self.ctl, wake_r], [], [], left)
                if wake_r in r:
                    wake_r.recv(4096)
                if self.ctl not in r:
                    continue
                got = self._take_fd()
                if got is None:
                    continue
                pre, sock = got
                with lock:
                    if pre.src not in waiting or pre.dst != node:
                        sock.close()
                        continue
                    if len(inflight) >= MAX_INCOMING_LINKS:
                        _abort(min(inflight.values(), key=lambda v: v[0])[1])
                    key = next(count)
                    inflight[key] = (time.monotonic(), sock.dup())
                threading.Thread(
                    target=attempt, args=(pre, sock, key), daemon=True, name="parnet-link-accept"
                ).start()
        finally:
            self._expect(node, set())  # from now on, any data preamble is refused at once
            with lock:
                waiting.clear()  # late successes are closed
                for _, dup in inflight.values():
                    _abort(dup)
            if failed[0] > LINK_FAILURES_LOGGED:
                log.warning(
                    "%d more data connections refused during set-up",
                    failed[0] - LINK_FAILURES_LOGGED,
                )

    def _expect(self, node: int, waiting: set[int]) -> None:
        """Tells the daemon which data links this worker still takes (node ``node``, from
        the nodes ``waiting``): it refuses any other at the preamble, as it refuses an
        unknown network id (SECURITY.md row 31)."""
        with contextlib.suppress(OSError):
            self.ctl.send(b"W" + struct.pack(f"!{1 + len(waiting)}H", node, *sorted(waiting)))

    def _take_fd(self) -> tuple[handshake.Preamble, socket.socket] | None:
        data, fds, _, _ = socket.recv_fds(self.ctl, 64, 1)
        if not data and not fds:
            raise ConnectionClosed("the daemon has gone")
        if not fds:
            return None
        sock = socket.socket(fileno=fds[0])
        try:
            return handshake.parse_preamble(data[: handshake.PREAMBLE.size]), sock
        except ParnetError:
            sock.close()
            return None

    def _accept_data(self, sock: socket.socket, pre: handshake.Preamble, deadline: float) -> Link:
        assert self.net is not None
        name = f"node {pre.src} ({self.net.nodes[pre.src].host or 'client'})"
        if not self.cfg.use_tls:
            return Link(sock, name=name, authenticated=True)
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        tls = self.cfg.server_ctx.wrap_socket(sock, server_side=True)  # takes over the fd
        link = Link(tls, name=name)
        try:
            handshake.tags_responder(
                link, self.keys.get(pre.src), self.netid, pre.src, pre.dst, self.cfg.cb, deadline
            )
        except BaseException:
            link.close()  # refused: closed now, not whenever the link is collected
            raise
        return link

    # -- the command loop ------------------------------------------------------------
    def serve(self) -> None:
        """Runs commands until CLOSE or until the client is gone."""
        assert self.cmd is not None
        cmd = self.cmd
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._monitor_loop, name="parnet-cmd-monitor", daemon=True).start()
        self._acquire_reader()
        while True:
            f = self.deferred.popleft() if self.deferred else cmd.take_frame()
            if f is None:
                try:
                    f = cmd.recv_frame()  # the daemon's control socket is the monitor thread's
                except ConnectionClosed:
                    log.info("network %s: client gone", self.net.id_str[:8] if self.net else "?")
                    return
            if f.code == msg.CLOSE:
                log.info(
                    "network %s: closed by the client", self.net.id_str[:8] if self.net else "?"
                )
                return
            if f.code < msg.FIRST_PICKLED or f.code not in msg.NAMES:
                log.warning(
                    "network %s: protocol error: message %d on the command link; closing",
                    self.net.id_str[:8] if self.net else "?",
                    f.code,
                )
                return
            if f.code == msg.INTERRUPT:
                self._interrupt_maps()
                self._ack_interrupt()
                continue
            self.commands += 1
            self.busy = True
            self.reader_lock.release()
            self.running = True  # SIGINT raises KeyboardInterrupt only while this is set
            try:
                try:
                    self.dispatch(f)
                finally:
                    self.running = False
            except KeyboardInterrupt:
                self.running = False  # a late interrupt: the command had already ended
            self.reader_lock.acquire()  # SIGINT no longer raises here (running is False)
            self.busy = False
            if self._interrupt_requested:
                self._interrupt_requested = False
                self._ack_interrupt()

    def _acquire_reader(self) -> None:
        self.reader_lock.acquire()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.running and self._interrupt_requested:
            raise KeyboardInterrupt("interrupted by the client")

    def _monitor_loop(self) -> None:  # noqa: C901
        """While a command runs, reads the command link for INTERRUPT (and CLOSE); takes what
        the daemon sends on the control socket (exits when the daemon is gone)."""
        assert self.cmd is not None
        main = threading.main_thread().ident
        seen, seen_at = -1, 0.0  # the command seen running, and since when
        while True:
            if select.select([self.ctl], [], [], 0.05)[0]:
                try:
                    self._drain_ctl()
                except (ConnectionClosed, OSError):
                    self._exit_now("the daemon has gone")
            if not self.busy:
                continue
            if self.commands != seen:
                seen, seen_at = self.commands, time.monotonic()
            if time.monotonic() - seen_at < 0.05:
                continue
            if not self.reader_lock.acquire(blocking=False):
                continue
            try:
                if not self.busy:
                    continue
                while (f := self.cmd.recv_frame(block=False)) is not None:
                    if f.code == msg.INTERRUPT:
                        log.info("interrupt requested by the client")
                        self._interrupt_maps()
                        if not self._interrupt_requested:
                            self._interrupt_requested = True
                            signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]
                    elif f.code == msg.CLOSE:
                        self._exit_now("closed by the client while a command ran")
                    else:
                        self.deferred.append(f)
            except (ConnectionClosed, ProtocolError):
                self._exit_now("client gone while a command ran")
            finally:
                self.reader_lock.release()

    def _interrupt_maps(self) -> None:
        if self.map_runner is not None:
            self.map_runner.interrupt()

    def _ack_interrupt(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.cmd.send_frame(msg.INTERRUPT)  # type: ignore[union-attr]

    def _exit_now(self, why: str) -> None:
        log.info("worker %d exits: %s", os.getpid(), why)
        with contextlib.suppress(Exception):
            if self.map_runner is not None:
                self.map_runner.close(kill=True)
        exit_worker(0)

    def _redirect_output(self) -> None:
        """Sends what this process and its pool print to the client (OUTPUT frames)."""
        r, w = os.pipe()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        sys.stdout = _NotingStream(
            io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True
        )
        sys.stderr = _NotingStream(
            io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True
        )
        # pool processes inherit the pipe (they write whole lines: maps.pool._init_worker)
        os.set_blocking(r, False)
        self._out_r = r

        def pump() -> None:
            while True:
                try:
                    owed = NOTICE_EVERY if self._notice_owed else None
                    if not select.select([r], [], [], owed)[0]:
                        self.pay_notice(force=False)  # output has paused: announce what was sent
                        continue
                    if not self._send_output():
                        return
                except OSError:
                    return

        threading.Thread(target=pump, name="parnet-output", daemon=True).start()

    def _send_output(self) -> bool:
        """Sends what the output pipe holds now as OUTPUT frames; False once the pipe or the
        client is gone. The output thread and ``_output_first`` take turns under one lock,
        so the output keeps its order."""
        with self._out_lock:
            while True:
                try:
                    data = os.read(self._out_r, 65536)
                except (BlockingIOError, InterruptedError):
                    return True
                except OSError:
                    return False
                if not data:
                    return False
                try:
                    self.tell_client(msg.OUTPUT, data)
                except OSError:
                    return False

    def _output_first(self) -> None:
        """Before a value or an error report goes to the client: sends what this process
        printed since the last time (and announces it on the data link), so the client shows
        that output before it returns the value or raises. Free when nothing was printed."""
        if _NotingStream.written:
            _NotingStream.written = False
            self._send_output()
            if self._notice_owed:  # (also for output the output thread has just sent)
                self.pay_notice()

    def notify_shutdown(self, reason: str) -> None:
        """Tells the client the server is stopping, then exits (SIGTERM from the daemon)."""
        with contextlib.suppress(Exception):
            self.tell_client(*msg.encode(msg.Shutdown(reason))[:2])
            self.cmd.flush(2.0)  # type: ignore[union-attr]
        self._exit_now(reason)

    def _drain_ctl(self) -> None:
        r, _, _ = select.select([self.ctl], [], [], 0)
        if r:
            got = self._take_fd()
            if got is not None:
                got[1].close()  # a data connection after set-up: not part of this network

    def dispatch(self, f: Any) -> None:
        """Runs one command frame; a failure is reported on the command link."""
        if f.code == msg.REVAL:
            self._reval(f)
            return
        handler = self.commands_by_code.get(f.code)
        if handler is None:
            log.warning("unknown command %d", f.code)
            return
        try:
            payload = msg.decode(f.code, f.body, f.buffers)
        except Exception as e:  # noqa: BLE001
            self.report(e)
            return
        try:
            handler(payload)
        except BaseException as e:  # noqa: BLE001 - user code may raise anything
            self.report(e, skip=1)

    def _reval(self, f: Any) -> None:
        """REVAL: runs the code; a repeated command (same frame body) is neither unpickled
        nor compiled again."""
        co = self._reval_code.get(f.body) if type(f.body) is bytes else None
        if co is None:
            try:
                co = self._compile(msg.decode(f.code, f.body, f.buffers))
            except BaseException as e:  # noqa: BLE001 - a syntax error is the user's
                self.report(e, skip=1)
                return
            if type(f.body) is bytes and len(self._reval_code) < 4096:
                self._reval_code[f.body] = co
        try:
            exec(co, self.ns)
        except BaseException as e:  # noqa: BLE001 - user code may raise anything
            self.report(e, skip=1)

    def _set(self, s: msg.SetOption) -> None:
        if s.key == "nlocaljobs":
            self.nlocaljobs = int(s.value)

    def _compile(self, code: str) -> Any:
        co = self._code_cache.get(code)
        if co is None:
            name = f"<reval-{len(self._code_cache)}>"
            co = compile(code, name, "exec")
            # keep the source so tracebacks show the failing line
            linecache.cache[name] = (len(code), None, code.splitlines(True), name)
            if len(self._code_cache) < 4096:
                self._code_cache[code] = co
        return co

    def _call(self, c: msg.Call) -> None:
        req, nout, isout = c.req, c.nout, c.isout
        try:
            out = c.func(*c.args, **c.kwargs)
            if nout is not None:
                if not isinstance(out, tuple) or len(out) != nout:
                    got = f"a {len(out)}-tuple" if isinstance(out, tuple) else type(out).__name__
                    raise ValueError(
                        f"rfeval: function was to return {nout} outputs (a tuple), got {got}"
                    )
                sel = isout if isout is not None else [True] * nout
                out = [o for o, keep in zip(out, sel, strict=True) if keep]
        except BaseException as e:  # noqa: BLE001
            if c.reply_on_cmd:
                self.report(e, skip=1, req=req)
                return
            raise
        if c.reply_on_cmd:
            assert self.cmd is not None
            self._output_first()
            self.cmd.send_frame(*msg.encode(msg.Result(req, out)))
        else:
            assert self.net is not None
            self.net.psend(out, [0])

    def _install(self, inst: msg.Install) -> None:
        """install_vars: take the values (from the client, or from the parent node in the
        spreading tree over data links), install them, and pass them on to the children."""
        assert self.net is not None
        if inst.values is not None:
            values = inst.values
            frame_body, frame_bufs, flags = (
                serialize.dumps(values) if inst.children else (b"", [], 0)
            )
        else:
            f = self.net.recv_special(inst.parent, msg.INSTALL)
            frame_body, frame_bufs, flags = f.body, f.buffers, f.flags
            values = serialize.loads(f.body, f.buffers)
        for child in inst.children:
            self.net.nodes[child].data.send_frame(msg.INSTALL, frame_body, frame_bufs, flags)  # type: ignore[union-attr]
        self.ns.update(values)

    def _map(self, payload: Any) -> None:
        if self.map_runner is None:
            from .maprunner import WorkerMapRunner

            self.map_runner = WorkerMapRunner(self)
        self.map_runner.run(payload)

    def report(self, e: BaseException, skip: int = 0, req: int | None = None) -> None:
        """Sends an ERROR report for ``e`` to the client (``skip``: leading traceback
        entries to leave out, the machinery's own)."""
        rep = msg.ErrorReport.from_exception(e, skip, req)
        self._output_first()  # what the failing code printed comes first
        log.info("command failed: %s: %s", rep.type, rep.message[:200])
        with contextlib.suppress(OSError, TypeError, ValueError):
            self.tell_client(msg.ERROR, msg.encode(rep)[1])

    def tell_client(self, code: int, body: bytes) -> None:
        """Sends an ERROR, OUTPUT or SHUTDOWN frame on the command link, then a NOTICE with
        the count of such frames on the data link to the client, which may be waiting on
        that link alone (``ClientSession._next_value_frame``).

        ERROR and SHUTDOWN are announced at once. OUTPUT at most every ``NOTICE_EVERY``
        seconds, and only while the data link has nothing queued (a client that does not
        read that link is not waiting on it): the output thread pays what is owed when
        output pauses. So a server that prints a lot neither floods the data link nor
        leaves a waiting client unwoken.
        """
        with self._tell_lock:
            if self.cmd is None:
                return
            self.cmd.send_frame(code, body)
            self._told += 1
            self._notice_owed = True
            if code != msg.OUTPUT or time.monotonic() - self._notice_at >= NOTICE_EVERY:
                self.pay_notice(force=code != msg.OUTPUT)

    def pay_notice(self, force: bool = True) -> None:
        """Sends the NOTICE owed (see ``tell_client``); without ``force``, only if the data
        link to the client has nothing queued."""
        with self._tell_lock:
            data = self.net.nodes[0].data if self.net is not None else None
            if data is None or not data.usable:
                self._notice_owed = False
                return
            if not force and data.queued:
                return
            with contextlib.suppress(OSError):
                data.send_frame(msg.NOTICE, self._told.to_bytes(8, "big"))
            self._notice_owed = False
            self._notice_at = time.monotonic()

    def close(self) -> None:
        """Closes the network's links and stops the local pool."""
        if self.map_runner is not None:
            with contextlib.suppress(Exception):
                self.map_runner.close()
        if self.net is not None:
            for node in self.net.nodes:
                if node.data is not None:
                    node.data.flush(1.0)
            self.net.close()
        if self.cmd is not None:
            self.cmd.flush(1.0)
            self.cmd.close()


def _abort(dup: socket.socket) -> None:
    """Wakes a handshake blocked on the socket that ``dup`` duplicates (used by another
    thread) with an error."""
    with contextlib.suppress(OSError):
        dup.shutdown(socket.SHUT_RDWR)


def _watch_client(fd: int, on_gone: Any) -> None:
    p = select.poll()
    p.register(fd, select.POLLRDHUP)
    while True:
        events = p.poll()
        if any(
            ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
            for _, ev in events
        ):
            on_gone()
            return


def run_worker(
    cfg: ServerConfig,
    sock: socket.socket,
    ctl: socket.socket,
    peer: str,
    pre: handshake.Preamble,
    accepted_at: float,
) -> int:
    """Entry point in the forked child; returns the exit status."""
    w = Worker(cfg, sock, ctl, peer, pre, accepted_at)
    try:
        w.authenticate()
    except (AuthenticationError, OSError, ParnetError, TimeoutError, ValueError) as e:
        with contextlib.suppress(OSError):  # the daemon logs it (rate-limited)
            ctl.send(b"F" + str(e).encode(errors="replace")[:400])
        return 1
    fd = w.cmd.fileno() if w.cmd else -1

    def gone() -> None:
        log.info("client %s hung up; worker %d exits", peer, os.getpid())
        with contextlib.suppress(Exception):
            if w.map_runner is not None:
                w.map_runner.close(kill=True)
        exit_worker(0)

    signal.signal(
        signal.SIGTERM,
        lambda *a: threading.Thread(
            target=w.notify_shutdown, args=("the server is shutting down",), daemon=True
        ).start(),
    )
    try:
        s = w.recv_setup()  # the login without TLS
        # The fork server of this network's pool processes: forked after the login (no
        # process for a stranger) and before this worker starts a thread (maps.forkpool).
        install_fork_server(start_forked())
        threading.Thread(
            target=_watch_client, args=(fd, gone), name="parnet-watchdog", daemon=True
        ).start()
        w.setup(s)
        monitor().watch(w.cmd, w.heartbeat, lambda link, why: gone())
        w.serve()
    except (OSError, ParnetError, TimeoutError) as e:
        log.info("worker for %s ends: %s", peer, e)
    finally:
        w.close()
    return 0
