"""The server daemon: accept loop on both ports, preamble routing, one worker per network.

Theory of operation. One thread, one ``selectors`` loop, no user code and no secrets of any
session. It accepts on the command and the data port, reads each connection's fixed-size
plaintext preamble, and then:

* command preamble (a new client network): answers OK, waits for the client's first bytes
  (its TLS handshake, or its SETUP without TLS), and forks a worker process that inherits the socket and does TLS +
  SRP itself (``worker.run_worker``). The daemon is single-threaded and has numpy and
  cloudpickle imported already, so the fork is cheap and the worker starts warm: the daemon
  is its own fork server.
* data preamble: looks up the worker of that network id and passes the socket to it over a
  Unix socket (``SCM_RIGHTS``) together with the preamble; unknown ids get a generic refusal.

Workers tell the daemon over that Unix socket when their client has authenticated (``A``)
or failed (``F`` and the reason, which counts toward a growing delay for that address); its
EOF means the worker is exiting, and SIGCHLD makes the loop reap it. SIGTERM stops every
worker and exits.

Before authentication (SECURITY.md rows 22-25), so that idle or hanging connections cannot
lock clients out and junk cannot fill the log:

* a connection has ``PREAMBLE_DEADLINE`` (1.5 s) for its preamble and, with TLS, as long again
  after the OK for its first TLS bytes (without TLS, ``AUTH_DEADLINE`` for its SETUP); only
  then is a worker forked (at most
  ``FORKS_PER_SECOND``, a token bucket; later ones wait their turn);
* each port has its own table of pending connections, ``MAX_PENDING`` in all and
  ``MAX_PENDING_PER_IP`` per source. A newcomer beyond either evicts the oldest connection
  that has sent nothing, else the oldest one of the most represented source: an honest
  client, which sends its preamble at once, is never the one evicted;
* beyond ``DROP_START_RATE`` accepts per second on a port, newcomers are dropped at random
  (OpenSSH's MaxStartups), with a "server busy" reply, which clients retry;
* at most ``MAX_UNAUTH_WORKERS`` workers wait for their client's login: beyond, the oldest
  one (of the most represented source) is stopped, or the newcomer gets "server busy";
* refusals are logged through ``logs.RefusalLog`` (rate-limited, summed up every
  ``LOG_WINDOW``), into a rotated log file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import ipaddress
import logging
import os
import random
import select
import selectors
import signal
import socket
import struct
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from ..constants import (
    AUTH_DEADLINE,
    CMD_PORT,
    DATA_PORT,
    DROP_FULL_RATE,
    DROP_MAX_PROBABILITY,
    DROP_START_RATE,
    FORKS_PER_SECOND,
    GLOBAL_FAILURES,
    LISTEN_BACKLOG,
    MAX_PENDING,
    MAX_PENDING_PER_IP,
    MAX_UNAUTH_WORKERS,
    PREAMBLE_DEADLINE,
    PROTOCOL_VERSION,
)
from ..errors import ConfigError, ParnetError
from ..transport import handshake
from ..transport.files import pid_alive, read_pid_file, runtime_dir
from .logs import LogFile, RefusalLog
from .worker import ServerConfig, exit_worker, run_worker

log = logging.getLogger("parnet.daemon")


def effective_bind(bind: str | None, use_tls: bool) -> str:
    """The address a server listens on: ``bind``, else all with TLS and 127.0.0.1 without."""
    return bind or ("0.0.0.0" if use_tls else "127.0.0.1")


def _bind_label(bind: str | None) -> str:
    return (bind or "0.0.0.0").replace(":", "_").replace("/", "_")


def pid_file_path(bind: str | None, cmd_port: int) -> str:
    """The pid file of the server listening on ``bind``/``cmd_port``."""
    return os.path.join(runtime_dir(), f"server-{_bind_label(bind)}-{cmd_port}.pid")


def default_log_file(bind: str | None, cmd_port: int) -> str:
    """Default log file of a server: in the runtime directory."""
    return os.path.join(runtime_dir(), f"server-{_bind_label(bind)}-{cmd_port}.log")


def find_pid_files(cmd_port: int, bind: str | None) -> list[str]:
    """Pid files matching ``bind`` (None: any address) and ``cmd_port``."""
    if bind is not None:
        p = pid_file_path(bind, cmd_port)
        return [p] if os.path.exists(p) else []
    return sorted(glob.glob(os.path.join(runtime_dir(), f"server-*-{cmd_port}.pid")))


def kill_server(cmd_port: int = CMD_PORT, bind: str | None = None, timeout: float = 5.0) -> int:
    """Stops the server on ``bind``/``cmd_port`` (SIGTERM, then SIGKILL); returns its pid.

    Raises:
        ParnetError: no such server, or several match and ``bind`` must choose.
    """
    files = find_pid_files(cmd_port, bind)
    if not files:
        raise ParnetError(f"no parnet server found for {bind or 'any address'} port {cmd_port}")
    if len(files) > 1:
        names = ", ".join(os.path.basename(f) for f in files)
        raise ParnetError(f"several servers use port {cmd_port} ({names}); give bind= to choose")
    path = files[0]
    try:
        pid = read_pid_file(path)
    except (OSError, ValueError) as e:
        raise ParnetError(f"{path}: unreadable pid file: {e}") from e
    if not _pid_file_locked(path) or not pid_alive(pid):
        # The daemon holds a lock on its pid file for its whole life: without it, the pid
        # may belong to an unrelated process by now (a crash, then pid reuse).
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ParnetError(f"the server of {path} (pid {pid}) is not running; removed its pid file")
    started = _start_time(pid)  # the same process, not a later one with its pid

    def running() -> bool:
        return pid_alive(pid) and _start_time(pid) == started

    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        time.sleep(0.02)
    if running():
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return pid


def peer_uid(sock: socket.socket) -> int | None:
    """The user owning the other end of a loopback TCP connection ``sock`` (Linux: the
    peer's own socket in ``/proc/net/tcp`` or ``tcp6``, found by the 4-tuple); None if not
    found."""
    try:
        here, there = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    six = sock.family == socket.AF_INET6

    def hexaddr(a: tuple) -> str:
        raw = socket.inet_pton(sock.family, a[0])
        words = [raw[k : k + 4] for k in range(0, len(raw), 4)]
        return "".join(f"{int.from_bytes(w, sys.byteorder):08X}" for w in words) + f":{a[1]:04X}"

    key = f" {hexaddr(there)} {hexaddr(here)} "  # local and remote, as the peer's socket sees them
    try:
        with open("/proc/net/tcp6" if six else "/proc/net/tcp") as f:
            text = f.read()
        at = text.find(key)
        if at < 0:
            return None
        return int(
            text[at : text.find("\n", at)].split()[6]
        )  # after local, remote: st, queues, tr, retr, uid
    except (OSError, ValueError, IndexError):
        return None


def source_key(ip: str) -> str:
    """The source an address counts as for budgets and back-off: an IPv6 address by its /64
    (one host usually has a whole /64), an IPv4-mapped one as IPv4."""
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(a, ipaddress.IPv6Address):
        if a.ipv4_mapped is not None:
            return str(a.ipv4_mapped)
        return str(ipaddress.IPv6Network((a, 64), strict=False))
    return ip


def _delay(fails: int) -> float:
    """Back-off before the next login after ``fails`` failures: 0.25 s doubling, at most 8 s."""
    return min(8.0, 0.25 * 2 ** min(fails - 1, 6))


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_file_locked(path: str) -> bool:
    """Whether a running daemon holds the lock of pid file ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


@dataclass
class _Pending:
    sock: socket.socket
    ip: str
    port_kind: int
    accepted_at: float
    buf: bytearray = field(default_factory=bytearray)
    not_before: float = 0.0  # routed (or forked) no earlier than this: back-off, fork budget
    ok_at: float = 0.0  # when the OK went out (command port with TLS: waiting for TLS bytes)
    pre: handshake.Preamble | None = None
    note: str = ""  # why it was delayed, for the client
    key: str = ""  # the source for budgets and back-off (IPv6: its /64)

    def __post_init__(self) -> None:
        self.key = source_key(self.ip)

    watched: bool = True


@dataclass
class _WorkerRec:
    pid: int
    ctl: socket.socket
    netid: bytes
    ip: str
    authenticated: bool = False  # may take data connections (at once without TLS)
    logged_in: bool = False  # said "A": logged in, or without TLS sent its SETUP
    started: float = 0.0
    evicted: bool = False
    #: (its node, the nodes whose data links it still takes), once its set-up has begun
    expect: tuple[int, frozenset[int]] | None = None


class Daemon:
    """A parnet server (see the module docstring). ``prepare()`` then ``run()``."""

    def __init__(
        self,
        *,
        use_tls: bool = True,
        auth_file: str | None = None,
        cmd_port: int = CMD_PORT,
        data_port: int = DATA_PORT,
        bind: str | None = None,
        allow_root: bool = False,
        log_file: str | None = None,
    ) -> None:
        self.use_tls = use_tls
        self.auth_file = auth_file
        self.cmd_port = cmd_port
        self.data_port = data_port
        self.bind_arg = bind
        self.bind = effective_bind(bind, use_tls)
        self.allow_root = allow_root
        self.log_file = log_file or default_log_file(self.bind, cmd_port)
        self.pid_file = pid_file_path(self.bind, cmd_port)
        self.cfg: ServerConfig | None = None
        self.sel = selectors.DefaultSelector()
        self.pending: dict[int, _Pending] = {}
        self.workers: dict[bytes, _WorkerRec] = {}
        self.failures: dict[str, tuple[int, float]] = {}
        self._stop = False
        self._listeners: list[socket.socket] = []
        self._wake_r = self._wake_w = -1
        self.rlog = RefusalLog(log)
        self._accepts: dict[int, deque[float]] = {
            handshake.KIND_CMD: deque(),
            handshake.KIND_DATA: deque(),
        }
        self._tokens = float(FORKS_PER_SECOND)
        self._tokens_at = time.monotonic()
        self.recent_failures: deque[float] = deque(maxlen=4096)  # failed logins, all sources
        self._pid_fd = -1
        self.warnings: list[str] = []  # for the terminal that starts the server
        #: from the OK to a command preamble to the client's first bytes (its TLS handshake;
        #: without TLS its SETUP, which waits for the client's other logins: longer)
        self.first_bytes_deadline = PREAMBLE_DEADLINE if use_tls else AUTH_DEADLINE
        #: without TLS on loopback, only the server's own user may connect (SECURITY.md row 27)
        self.own_uid_only = (
            not use_tls and ipaddress.ip_address(self.bind.split("%", 1)[0]).is_loopback
        )  # the pid file, locked while the daemon runs
        self._stopped: set[int] = set()  # waiting workers stopped to make room (not reaped yet)

    # -- start -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Checks, loads auth data, binds both ports and writes the pid file.

        Raises:
            ParnetError / ConfigError: running as root, bad auth files, port in use.
        """
        # Until run() starts, SIGTERM/SIGINT just ask to stop (run() then returns at once
        # and cleans up): a service manager may stop a server that is still starting.
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if os.geteuid() == 0 and not self.allow_root:
            raise ParnetError(
                "refusing to run as root (code sent by clients would run as root); "
                "use --allow-root / allow_root=True to override"
            )
        self._setup_logging()
        if os.geteuid() == 0:
            log.warning("running as root (--allow-root): clients' code runs as root")
        if self.use_tls:
            from ..auth.keyfile import load_server_auth
            from ..auth.tls import (
                cert_binding,
                client_context,
                ensure_server_identity,
                load_cert_der,
                server_context,
            )

            auth = load_server_auth(self.auth_file)
            cert, key = ensure_server_identity()
            self.cfg = ServerConfig(
                True,
                self.data_port,
                server_context(cert, key),
                client_context(),
                cert_binding(load_cert_der(cert)),
                auth,
            )
        else:
            msg = (
                f"WARNING: parnet server on {self.bind} without TLS: anyone who can connect to "
                f"ports {self.cmd_port}/{self.data_port} can run code as this user"
            )
            if self.own_uid_only:
                msg += (
                    f"; on this loopback address it accepts only connections from processes of "
                    f"its own user (uid {os.geteuid()})"
                )
            log.warning(msg)
            print(msg, file=sys.stderr)
            self.warnings.append(msg)
            self.cfg = ServerConfig(False, self.data_port)
        if self.bind_arg and self.bind_arg not in ("0.0.0.0", "::", ""):
            self.cfg.source = self.bind_arg  # outgoing data links leave from the bound address
        for port in (self.cmd_port, self.data_port):
            self._listeners.append(self._listen(port))
        self._write_pid_file()
        log.info(
            "listening on %s: command port %d, data port %d, TLS %s (pid %d)",
            self.bind,
            self.cmd_port,
            self.data_port,
            "on" if self.use_tls else "OFF",
            os.getpid(),
        )

    def _setup_logging(self) -> None:
        root = logging.getLogger("parnet")
        root.setLevel(logging.DEBUG if os.environ.get("PARNET_DEBUG") else logging.INFO)
        try:
            h = LogFile(self.log_file)
        except OSError as e:
            raise ConfigError(
                f"{self.log_file}: cannot open the log file: {e.strerror or e}"
                + (" (a symbolic link: remove it)" if e.errno == errno.ELOOP else "")
            ) from None
        h.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
        )
        root.addHandler(h)

    def _listen(self, port: int) -> socket.socket:
        fam = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.bind, port))
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                raise ParnetError(
                    f"port {port} on {self.bind} is already in use "
                    f"(another parnet server? `parnet server --kill`)"
                ) from e
            raise ParnetError(f"cannot listen on {self.bind}:{port}: {e.strerror}") from e
        s.listen(LISTEN_BACKLOG)
        s.setblocking(False)
        return s

    def _write_pid_file(self) -> None:
        """Writes the pid file atomically (a temporary file linked into place; the link fails
        if the name exists) and keeps an ``flock`` on it for the daemon's life, so that
        ``kill_server`` never trusts a pid file left by a crash (SECURITY.md row 26)."""
        path = self.pid_file
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            for _ in range(2):
                try:
                    os.link(tmp, path)
                    self._pid_fd, fd = fd, -1
                    return
                except FileExistsError:
                    if _pid_file_locked(path):
                        try:
                            old = int(open(path).read().strip() or 0)
                        except (OSError, ValueError):
                            old = 0
                        raise ParnetError(
                            f"a server is already running for {self.bind}:{self.cmd_port} "
                            f"(pid {old}, {path})"
                        ) from None
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        finally:
            os.unlink(tmp)
            if fd >= 0:
                os.close(fd)

    # -- loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Serves until SIGTERM/SIGINT."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        for s, kind in zip(self._listeners, (handshake.KIND_CMD, handshake.KIND_DATA), strict=True):
            self.sel.register(s, selectors.EVENT_READ, ("listen", kind))
        try:
            while not self._stop:
                timeout = self._next_timeout()
                for key, _ in self.sel.select(timeout):
                    what, arg = key.data
                    if what == "listen":
                        self._accept(key.fileobj, arg)
                    elif what == "pending":
                        self._read_preamble(arg)
                    elif what == "ctl":
                        self._on_ctl(arg)
                    elif what == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                self._expire()
                self._reap()
        finally:
            self._shutdown()

    def _on_stop(self, *args: Any) -> None:
        self._stop = True

    def _next_timeout(self) -> float:
        now = time.monotonic()
        t = 1.0
        for p in self.pending.values():
            if p.not_before:
                t = min(t, max(0.0, p.not_before - now))
            elif p.ok_at:
                t = min(t, max(0.0, p.ok_at + self.first_bytes_deadline - now))
            elif len(p.buf) < handshake.PREAMBLE.size:
                t = min(t, max(0.0, p.accepted_at + PREAMBLE_DEADLINE - now))
        return t

    def _accept(self, ls: Any, kind: int) -> None:
        for _ in range(64):
            try:
                sock, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            ip = addr[0]
            rate = self._accept_rate(kind)
            if rate > DROP_START_RATE and random.random() < min(
                DROP_MAX_PROBABILITY, (rate - DROP_START_RATE) / (DROP_FULL_RATE - DROP_START_RATE)
            ):
                self.rlog.note(
                    ip, f"dropped connection from {ip}: {rate} new connections in the last second"
                )
                _say_busy(sock)
                sock.close()
                continue
            self._make_room(kind, ip)
            sock.setblocking(False)
            p = _Pending(sock, ip, kind, time.monotonic())
            self.pending[sock.fileno()] = p
            self.sel.register(sock, selectors.EVENT_READ, ("pending", p))
            self._read_preamble(p)  # a real client's preamble is usually there already

    def _accept_rate(self, kind: int) -> int:
        """Connections accepted on this port in the last second, this one included."""
        q = self._accepts[kind]
        now = time.monotonic()
        q.append(now)
        while q[0] < now - 1.0:
            q.popleft()
        return len(q)

    def _make_room(self, kind: int, ip: str) -> None:
        """Evicts a pending connection if a newcomer from ``ip`` on this port would exceed
        the port's or the source's budget."""
        port = [p for p in self.pending.values() if p.port_kind == kind]
        mine = [p for p in port if p.key == source_key(ip)]
        if len(mine) >= MAX_PENDING_PER_IP:
            self._evict(mine, "too many pending connections from that address")
        elif len(port) >= MAX_PENDING:
            self._evict(port, "too many pending connections")

    def _evict(self, cands: list[_Pending], why: str) -> None:
        """Closes the oldest of ``cands`` that has sent nothing, else the oldest one; of the
        most represented source among those, in both cases."""
        pool = [p for p in cands if not p.buf] or cands
        counts = Counter(p.key for p in pool)
        top = max(counts.values())
        victim = min((p for p in pool if counts[p.key] == top), key=lambda p: p.accepted_at)
        self.rlog.note(
            victim.ip, f"closed a pending connection from {victim.ip} to make room: {why}"
        )
        if len(victim.buf) == handshake.PREAMBLE.size and not victim.ok_at:
            _say_busy(victim.sock)  # it waits for an answer: tell it why
        self._drop_pending(victim)

    def _watch(self, p: _Pending, on: bool) -> None:
        if on and not p.watched:
            self.sel.register(p.sock, selectors.EVENT_READ, ("pending", p))
        elif not on and p.watched:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(p.sock)
        p.watched = on

    def _drop_pending(self, p: _Pending, close: bool = True) -> None:
        self.pending.pop(p.sock.fileno(), None)
        self._watch(p, False)
        if close:
            p.sock.close()

    def _refuse(self, p: _Pending, reason: str, log_reason: str | None = None) -> None:
        kind = "command" if p.port_kind == handshake.KIND_CMD else "data"
        self.rlog.note(p.ip, f"refused {kind} connection from {p.ip}: {log_reason or reason}")
        with contextlib.suppress(OSError):
            p.sock.send(handshake.pack_reply(False, 0, reason))
        self._drop_pending(p)

    def _read_preamble(self, p: _Pending) -> None:
        if p.ok_at:
            self._on_first_bytes(p)
            return
        data = self._recv_or_drop(p, handshake.PREAMBLE.size - len(p.buf), 0, "its preamble")
        if data is None:
            return
        p.buf += data
        if len(p.buf) < handshake.PREAMBLE.size:
            return
        self._read_all_ctl()  # failures that workers reported but this loop has not read yet
        now = time.monotonic()
        fails, last = self.failures.get(p.key, (0, 0.0))
        if now - last >= 60:
            fails = 0
        while self.recent_failures and self.recent_failures[0] < now - 60:
            self.recent_failures.popleft()
        excess = len(self.recent_failures) - GLOBAL_FAILURES
        # back-off per source (IPv6: per /64), and past a budget for the whole server
        mine = last + _delay(fails) if fails else 0.0
        everyone = self.recent_failures[-1] + _delay(excess) if excess > 0 else 0.0
        if max(mine, everyone) > now:
            p.not_before = max(mine, everyone)
            p.note = (
                f"login delayed after {fails} failed attempt{'s' if fails > 1 else ''} from this address"
                if mine >= everyone
                else f"login delayed after {len(self.recent_failures)} failed attempts on this server "
                "in the last minute"
            )
            self._watch(p, False)
            return  # routed by _expire when the delay has passed
        self._route(p)

    def _recv_or_drop(self, p: _Pending, n: int, flags: int, before: str) -> bytes | None:
        """Up to ``n`` bytes of a pending connection; None if none yet, or if it closed or
        failed (then it is dropped, and that is logged)."""
        try:
            data = p.sock.recv(n, flags)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self.rlog.note(
                p.ip, f"connection from {p.ip} failed before {before}: {e}", logging.INFO
            )
            self._drop_pending(p)
            return None
        if not data:
            self.rlog.note(p.ip, f"connection from {p.ip} closed before {before}", logging.INFO)
            self._drop_pending(p)
            return None
        return data

    def _route(self, p: _Pending) -> None:  # noqa: C901
        # looked up only for a whole preamble: idle junk costs no read of /proc/net/tcp
        if self.own_uid_only and (uid := peer_uid(p.sock)) != os.geteuid():
            self._refuse(
                p,
                f"this server runs without TLS and accepts only its own user's connections "
                f"(uid {os.geteuid()})",
                f"peer of uid {uid} (not this server's user)",
            )
            return
        try:
            pre = handshake.parse_preamble(bytes(p.buf))
        except ParnetError as e:
            self._refuse(p, str(e))
            return
        if pre.version != PROTOCOL_VERSION:
            self._refuse(
                p,
                f"protocol version mismatch: server speaks {PROTOCOL_VERSION}, "
                f"client {pre.version}",
            )
            return
        if pre.use_tls != self.use_tls:
            self._refuse(
                p,
                "this server requires TLS (connect with use_tls=True)"
                if self.use_tls
                else "this server runs without TLS (connect with use_tls=False)",
            )
            return
        if pre.kind != p.port_kind:
            self._refuse(p, "wrong port for this kind of connection")
            return
        if pre.kind == handshake.KIND_CMD:
            if pre.netid in self.workers or pre.src != 0:
                self._refuse(p, handshake.GENERIC_REFUSAL, "network id in use")
                return
            if not self._worker_room(min_age=1.0):
                self._refuse(p, handshake.BUSY, "server busy: too many workers waiting for a login")
                return
            p.pre = pre
            try:
                p.sock.send(handshake.pack_reply(True, self.data_port, p.note))
            except OSError as e:
                self.rlog.note(p.ip, f"connection from {p.ip} failed: {e}", logging.INFO)
                self._drop_pending(p)
                return
            p.ok_at = time.monotonic()
            self._watch(p, True)
            return
        rec = self.workers.get(pre.netid)
        if rec is None:  # its command connection may still wait for its first bytes
            cmd = next(
                (
                    q
                    for q in self.pending.values()
                    if q.pre is not None and q.ok_at and q.pre.netid == pre.netid
                ),
                None,
            )
            if cmd is not None and not cmd.not_before:
                self._on_first_bytes(cmd)
            rec = self.workers.get(pre.netid)
            if rec is None and cmd is not None and self.pending.get(cmd.sock.fileno()) is cmd:
                p.not_before = time.monotonic() + 0.02  # try again soon (bounded by cmd's deadline)
                self._watch(p, False)
                return
        if rec is not None:
            # Read what the worker said so far: its "authenticated" note is written before the
            # client can know it may connect, and its EOF (exited) before anyone could know.
            self._drain_ctl(rec)
            rec = self.workers.get(pre.netid)
        if rec is None or not rec.authenticated:
            self._refuse(p, handshake.GENERIC_REFUSAL, "unknown network id")
            return
        if rec.expect is None and time.monotonic() - p.accepted_at < AUTH_DEADLINE:
            p.not_before = time.monotonic() + 0.02  # its set-up has not begun: try again soon
            self._watch(p, False)
            return
        if rec.expect is None or pre.dst != rec.expect[0] or pre.src not in rec.expect[1]:
            # a running network answers like an unknown one: its id is no secret
            self._refuse(p, handshake.GENERIC_REFUSAL, "not a data link that network waits for")
            return
        try:
            p.sock.send(handshake.pack_reply(True, self.data_port))
            socket.send_fds(rec.ctl, [bytes(p.buf)], [p.sock.fileno()])
        except OSError as e:
            log.warning("could not pass a data connection to worker %d: %s", rec.pid, e)
        self._drop_pending(p)

    def _on_first_bytes(self, p: _Pending) -> None:
        """A command connection after its OK: fork its worker once its first bytes arrive."""
        if self._recv_or_drop(p, 1, socket.MSG_PEEK, "its first message") is None:
            if self.pending.get(p.sock.fileno()) is p:
                self._watch(p, True)  # nothing yet
            return
        if not self._take_fork_token():
            p.not_before = time.monotonic() + 1.0 / FORKS_PER_SECOND
            self._watch(p, False)
            return
        self._worker_room(min_age=0.0)
        assert p.pre is not None
        self._start_worker(p, p.pre)

    def _take_fork_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(
            float(FORKS_PER_SECOND), self._tokens + (now - self._tokens_at) * FORKS_PER_SECOND
        )
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _worker_room(self, min_age: float) -> bool:
        """Whether one more worker may wait for a login; stops a waiting worker to make room:
        the oldest one started ``min_age`` s ago or more, of the source with the most waiting
        workers that has such a one."""
        waiting = [w for w in self.workers.values() if not w.logged_in and not w.evicted]
        if len(waiting) < MAX_UNAUTH_WORKERS:
            return True
        now = time.monotonic()
        counts = Counter(source_key(w.ip) for w in waiting)
        old = [w for w in waiting if now - w.started >= min_age]
        if not old:
            return False
        victim = min(old, key=lambda w: (-counts[source_key(w.ip)], w.started))
        victim.evicted = True
        self._stopped.add(victim.pid)
        with contextlib.suppress(OSError):
            os.kill(victim.pid, signal.SIGKILL)
        self.rlog.note(
            victim.ip,
            f"stopped the worker of a login from {victim.ip} to make room: "
            "too many workers waiting for a login",
        )
        return True

    def _start_worker(self, p: _Pending, pre: handshake.Preamble) -> None:
        if not p.ok_at and not self._take_fork_token():
            self._refuse(p, handshake.BUSY, "server busy: too many new workers")
            return
        parent_ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if not p.ok_at:
                p.sock.send(handshake.pack_reply(True, self.data_port))
        except OSError as e:
            self.rlog.note(p.ip, f"connection from {p.ip} failed: {e}", logging.INFO)
            parent_ctl.close()
            child_ctl.close()
            self._drop_pending(p)
            return
        self._drop_pending(p, close=False)
        started = p.ok_at or time.monotonic()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                self._in_child(parent_ctl)
                p.sock.setblocking(True)
                status = run_worker(self.cfg, p.sock, child_ctl, p.ip, pre, started)  # type: ignore[arg-type]
            except BaseException:  # noqa: BLE001
                log.exception("worker crashed")
            finally:
                logging.shutdown()
                exit_worker(status)
        child_ctl.close()
        p.sock.close()
        parent_ctl.setblocking(False)
        rec = _WorkerRec(
            pid, parent_ctl, pre.netid, p.ip, authenticated=not self.use_tls, started=started
        )
        self.workers[pre.netid] = rec
        self.sel.register(parent_ctl, selectors.EVENT_READ, ("ctl", rec))
        log.debug("connection from %s: worker %d for network %s", p.ip, pid, pre.netid.hex()[:8])

    def _in_child(self, keep_out: socket.socket) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        for s in self._listeners:
            s.close()
        if self._pid_fd >= 0:  # the lock stays the daemon's (closing a copy keeps it)
            os.close(self._pid_fd)
        for q in list(self.pending.values()):
            q.sock.close()
        for w in self.workers.values():
            w.ctl.close()
        keep_out.close()

    def _drain_ctl(self, rec: _WorkerRec) -> None:
        if not pid_alive(rec.pid):  # exited: its EOF may not have shown yet
            self._forget(rec)
            return
        for _ in range(16):
            if self.workers.get(rec.netid) is not rec:
                return  # gone
            r, _, _ = select.select([rec.ctl], [], [], 0)
            if not r:
                return
            self._on_ctl(rec)

    def _read_all_ctl(self) -> None:
        """Takes what every worker has said so far (without waiting)."""
        if not self.workers:
            return
        poll = select.poll()
        by_fd = {rec.ctl.fileno(): rec for rec in self.workers.values()}
        for fd in by_fd:
            poll.register(fd, select.POLLIN)
        for fd, _ in poll.poll(0):
            self._on_ctl(by_fd[fd])

    def _on_ctl(self, rec: _WorkerRec) -> None:
        try:
            data = rec.ctl.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data == b"A":
            rec.authenticated = rec.logged_in = True
            self.failures.pop(source_key(rec.ip), None)
            log.info(
                "connection from %s: worker %d for network %s authenticated",
                rec.ip,
                rec.pid,
                rec.netid.hex()[:8],
            )
        elif data[:1] == b"W" and len(data) >= 3 and len(data) % 2 == 1:
            node, *srcs = struct.unpack(f"!{(len(data) - 1) // 2}H", data[1:])
            rec.expect = (node, frozenset(srcs))
        elif data[:1] == b"F":
            fails, _ = self.failures.get(source_key(rec.ip), (0, 0.0))
            self.failures[source_key(rec.ip)] = (fails + 1, time.monotonic())
            self.recent_failures.append(time.monotonic())
            why = data[1:].decode(errors="replace")
            self.rlog.note(
                rec.ip, f"client {rec.ip}: authentication failed{': ' if why else ''}{why}"
            )
        elif not data:
            self._forget(rec)

    def _forget(self, rec: _WorkerRec) -> None:
        """The worker has exited: drop its record and control socket."""
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(rec.ctl)
        rec.ctl.close()
        if self.workers.get(rec.netid) is rec:
            del self.workers[rec.netid]

    def _expire(self) -> None:
        now = time.monotonic()
        if self.failures:  # forget addresses quiet for a minute (bounded memory)
            self.failures = {ip: v for ip, v in self.failures.items() if now - v[1] < 60}
        self.rlog.flush()
        for p in list(self.pending.values()):
            if p.sock.fileno() < 0 or self.pending.get(p.sock.fileno()) is not p:
                continue  # dropped meanwhile (evicted by a worker's room-making)
            if p.ok_at and now - p.ok_at > self.first_bytes_deadline:
                self.rlog.note(
                    p.ip,
                    f"closed connection from {p.ip}: nothing within "
                    f"{self.first_bytes_deadline:g} s of its preamble's answer",
                )
                self._drop_pending(p)
            elif p.not_before:
                if now >= p.not_before:
                    p.not_before = 0.0
                    if p.ok_at:
                        self._on_first_bytes(p)
                    else:
                        self._route(p)
            elif len(p.buf) < handshake.PREAMBLE.size and now - p.accepted_at > PREAMBLE_DEADLINE:
                self.rlog.note(
                    p.ip,
                    f"closed connection from {p.ip}: no preamble within {PREAMBLE_DEADLINE:g} s",
                )
                self._drop_pending(p)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            # status 1 is a failed login (logged as such); a stopped waiting worker was logged too
            quiet = code == 1 or (code == -signal.SIGKILL and pid in self._stopped)
            self._stopped.discard(pid)
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "worker %d exited (%s)",
                pid,
                f"signal {-code}" if code < 0 else f"status {code}",
            )

    def _shutdown(self) -> None:
        self.rlog.flush(force=True)
        log.info("shutting down (%d workers)", len(self.workers))
        pids = [w.pid for w in self.workers.values()]
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if self._not_reaped(pid)]
            if pids:
                time.sleep(0.01)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        for s in self._listeners:
            s.close()
        with contextlib.suppress(OSError):
            if read_pid_file(self.pid_file) == os.getpid():
                os.unlink(self.pid_file)
        log.info("stopped")

    @staticmethod
    def _not_reaped(pid: int) -> bool:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0


def _say_busy(sock: socket.socket) -> None:
    """Tells a refused client the server is busy (it retries), best effort."""
    with contextlib.suppress(OSError):
        sock.send(handshake.pack_reply(False, 0, handshake.BUSY))
