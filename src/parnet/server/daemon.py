"""The server daemon: accept loop on both ports, preamble routing, one worker per network.

Theory of operation. One thread, one ``selectors`` loop, no user code and no secrets of any
session. It accepts on the command and the data port, reads each connection's fixed-size
plaintext preamble (with a deadline, and caps on pending connections in total and per source
address), and then:

* command preamble (a new client network): answers OK and forks a worker process that
  inherits the socket and does TLS + SRP itself (``worker.run_worker``). The daemon is
  single-threaded and has numpy and cloudpickle imported already, so the fork is cheap and
  the worker starts warm: the daemon is its own fork server.
* data preamble: looks up the worker of that network id and passes the socket to it over a
  Unix socket (``SCM_RIGHTS``) together with the preamble; unknown ids get a generic refusal.

Workers tell the daemon over that Unix socket when their client has authenticated (``A``)
or failed (``F``, which counts toward a growing delay for that address); its EOF means the
worker is exiting, and SIGCHLD makes the loop reap it. SIGTERM stops every worker and exits.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import select
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..constants import (
    AUTH_DEADLINE,
    CMD_PORT,
    DATA_PORT,
    LISTEN_BACKLOG,
    MAX_PENDING,
    MAX_PENDING_PER_IP,
    PROTOCOL_VERSION,
)
from ..errors import ConfigError, ParnetError
from ..transport import handshake
from .worker import ServerConfig, run_worker

log = logging.getLogger("parnet.daemon")


def runtime_dir() -> str:
    """A private directory for pid files: ``$XDG_RUNTIME_DIR/parnet`` or ``~/.local/state/parnet``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        d = os.path.join(base, "parnet")
    else:
        d = os.path.join(os.path.expanduser("~"), ".local", "state", "parnet")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(f"{d}: runtime directory must be owned by you and private (chmod 700 {d})")
    return d


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


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
        pid = int(open(path).read().strip())
    except (OSError, ValueError) as e:
        raise ParnetError(f"{path}: unreadable pid file: {e}") from e
    if not _pid_alive(pid):
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ParnetError(f"the server of {path} (pid {pid}) is not running; removed its pid file")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return pid


@dataclass
class _Pending:
    sock: socket.socket
    ip: str
    port_kind: int
    accepted_at: float
    buf: bytearray = field(default_factory=bytearray)
    not_before: float = 0.0


@dataclass
class _WorkerRec:
    pid: int
    ctl: socket.socket
    netid: bytes
    ip: str
    authenticated: bool = False


class Daemon:
    """A parnet server (see the module docstring). ``prepare()`` then ``run()``."""

    def __init__(self, *, use_tls: bool = True, auth_file: str | None = None, cmd_port: int = CMD_PORT,
                 data_port: int = DATA_PORT, bind: str | None = None, allow_root: bool = False,
                 log_file: str | None = None) -> None:
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
        self.by_ctl: dict[int, _WorkerRec] = {}
        self.failures: dict[str, tuple[int, float]] = {}
        self._stop = False
        self._listeners: list[socket.socket] = []
        self._wake_r = self._wake_w = -1

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
            raise ParnetError("refusing to run as root (code sent by clients would run as root); "
                              "use --allow-root / allow_root=True to override")
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
            self.cfg = ServerConfig(True, self.data_port, server_context(cert, key), client_context(),
                                    cert_binding(load_cert_der(cert)), auth)
        else:
            msg = (f"WARNING: parnet server on {self.bind} without TLS: anyone who can connect to "
                   f"ports {self.cmd_port}/{self.data_port} can run code as this user")
            log.warning(msg)
            print(msg, file=sys.stderr)
            self.cfg = ServerConfig(False, self.data_port)
        if self.bind_arg and self.bind_arg not in ("0.0.0.0", "::", ""):
            self.cfg.source = self.bind_arg  # outgoing data links leave from the bound address
        for port in (self.cmd_port, self.data_port):
            self._listeners.append(self._listen(port))
        self._write_pid_file()
        log.info("listening on %s: command port %d, data port %d, TLS %s (pid %d)", self.bind,
                 self.cmd_port, self.data_port, "on" if self.use_tls else "OFF", os.getpid())

    def _setup_logging(self) -> None:
        root = logging.getLogger("parnet")
        root.setLevel(logging.DEBUG if os.environ.get("PARNET_DEBUG") else logging.INFO)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        h = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
        h.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
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
                raise ParnetError(f"port {port} on {self.bind} is already in use "
                                  f"(another parnet server? `parnet server --kill`)") from e
            raise ParnetError(f"cannot listen on {self.bind}:{port}: {e.strerror}") from e
        s.listen(LISTEN_BACKLOG)
        s.setblocking(False)
        return s

    def _write_pid_file(self) -> None:
        """Writes the pid file atomically: a complete file appears under its name or none
        (a temporary file linked into place; the link fails if the name exists)."""
        path = self.pid_file
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        try:
            for _ in range(2):
                try:
                    os.link(tmp, path)
                    return
                except FileExistsError:
                    try:
                        old = int(open(path).read().strip() or 0)
                    except (OSError, ValueError):
                        old = 0
                    if old and _pid_alive(old):
                        raise ParnetError(f"a server is already running for {self.bind}:{self.cmd_port} "
                                          f"(pid {old}, {path})") from None
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        finally:
            os.unlink(tmp)

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
            t = min(t, max(0.0, p.accepted_at + AUTH_DEADLINE - now))
            if p.not_before:
                t = min(t, max(0.0, p.not_before - now))
        return t

    def _unauth_count(self, ip: str | None = None) -> int:
        n = sum(1 for p in self.pending.values() if ip is None or p.ip == ip)
        n += sum(1 for w in self.workers.values() if not w.authenticated and (ip is None or w.ip == ip))
        return n

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
            if self._unauth_count() >= MAX_PENDING or self._unauth_count(ip) >= MAX_PENDING_PER_IP:
                log.warning("refused connection from %s: too many pending connections", ip)
                sock.close()
                continue
            sock.setblocking(False)
            p = _Pending(sock, ip, kind, time.monotonic())
            self.pending[sock.fileno()] = p
            self.sel.register(sock, selectors.EVENT_READ, ("pending", p))

    def _drop_pending(self, p: _Pending, close: bool = True) -> None:
        self.pending.pop(p.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(p.sock)
        if close:
            p.sock.close()

    def _refuse(self, p: _Pending, reason: str, log_reason: str | None = None) -> None:
        log.warning("refused %s connection from %s: %s", "command" if p.port_kind == 1 else "data",
                    p.ip, log_reason or reason)
        with contextlib.suppress(OSError):
            p.sock.send(handshake.pack_reply(False, 0, reason))
        self._drop_pending(p)

    def _read_preamble(self, p: _Pending) -> None:
        need = handshake.PREAMBLE.size - len(p.buf)
        try:
            data = p.sock.recv(need)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.info("connection from %s failed before its preamble: %s", p.ip, e)
            self._drop_pending(p)
            return
        if not data:
            log.info("connection from %s closed before its preamble", p.ip)
            self._drop_pending(p)
            return
        p.buf += data
        if len(p.buf) < handshake.PREAMBLE.size:
            return
        fails, last = self.failures.get(p.ip, (0, 0.0))
        if fails and time.monotonic() - last < 60:
            p.not_before = last + min(8.0, 0.25 * 2 ** min(fails - 1, 6))
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(p.sock)
            if time.monotonic() < p.not_before:
                return  # handled by _expire when the delay has passed
        self._route(p)

    def _route(self, p: _Pending) -> None:
        try:
            pre = handshake.parse_preamble(bytes(p.buf))
        except ParnetError as e:
            self._refuse(p, str(e))
            return
        if pre.version != PROTOCOL_VERSION:
            self._refuse(p, f"protocol version mismatch: server speaks {PROTOCOL_VERSION}, "
                            f"client {pre.version}")
            return
        if pre.use_tls != self.use_tls:
            self._refuse(p, "this server requires TLS (connect with use_tls=True)" if self.use_tls
                         else "this server runs without TLS (connect with use_tls=False)")
            return
        if pre.kind != p.port_kind:
            self._refuse(p, "wrong port for this kind of connection")
            return
        if pre.kind == handshake.KIND_CMD:
            if pre.netid in self.workers or pre.src != 0:
                self._refuse(p, handshake.GENERIC_REFUSAL, "network id in use")
                return
            self._start_worker(p, pre)
            return
        rec = self.workers.get(pre.netid)
        if rec is not None:
            # Read what the worker said so far: its "authenticated" note is written before the
            # client can know it may connect, and its EOF (exited) before anyone could know.
            self._drain_ctl(rec)
            rec = self.workers.get(pre.netid)
        if rec is None or not rec.authenticated:
            self._refuse(p, handshake.GENERIC_REFUSAL, "unknown network id")
            return
        try:
            p.sock.send(handshake.pack_reply(True, self.data_port))
            socket.send_fds(rec.ctl, [bytes(p.buf)], [p.sock.fileno()])
        except OSError as e:
            log.warning("could not pass a data connection to worker %d: %s", rec.pid, e)
        self._drop_pending(p)

    def _start_worker(self, p: _Pending, pre: handshake.Preamble) -> None:
        parent_ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            p.sock.send(handshake.pack_reply(True, self.data_port))
        except OSError as e:
            log.info("connection from %s failed: %s", p.ip, e)
            parent_ctl.close()
            child_ctl.close()
            self._drop_pending(p)
            return
        self._drop_pending(p, close=False)
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                self._in_child(parent_ctl)
                p.sock.setblocking(True)
                status = run_worker(self.cfg, p.sock, child_ctl, p.ip, pre, p.accepted_at)  # type: ignore[arg-type]
            except BaseException:  # noqa: BLE001
                log.exception("worker crashed")
            finally:
                logging.shutdown()
                os._exit(status)
        child_ctl.close()
        p.sock.close()
        parent_ctl.setblocking(False)
        rec = _WorkerRec(pid, parent_ctl, pre.netid, p.ip, authenticated=not self.use_tls)
        self.workers[pre.netid] = rec
        self.by_ctl[parent_ctl.fileno()] = rec
        self.sel.register(parent_ctl, selectors.EVENT_READ, ("ctl", rec))
        log.info("connection from %s: worker %d for network %s", p.ip, pid, pre.netid.hex()[:8])

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
        for q in list(self.pending.values()):
            q.sock.close()
        for w in self.workers.values():
            w.ctl.close()
        keep_out.close()

    def _drain_ctl(self, rec: _WorkerRec) -> None:
        if not _pid_alive(rec.pid):  # exited: its EOF may not have shown yet
            self._forget(rec)
            return
        for _ in range(16):
            if self.workers.get(rec.netid) is not rec:
                return  # gone
            r, _, _ = select.select([rec.ctl], [], [], 0)
            if not r:
                return
            self._on_ctl(rec)

    def _on_ctl(self, rec: _WorkerRec) -> None:
        try:
            data = rec.ctl.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data == b"A":
            rec.authenticated = True
            self.failures.pop(rec.ip, None)
        elif data == b"F":
            fails, _ = self.failures.get(rec.ip, (0, 0.0))
            self.failures[rec.ip] = (fails + 1, time.monotonic())
        elif not data:
            self._forget(rec)

    def _forget(self, rec: _WorkerRec) -> None:
        """The worker has exited: drop its record and control socket."""
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(rec.ctl)
        self.by_ctl.pop(rec.ctl.fileno(), None)
        rec.ctl.close()
        if self.workers.get(rec.netid) is rec:
            del self.workers[rec.netid]

    def _expire(self) -> None:
        now = time.monotonic()
        if self.failures:  # forget addresses quiet for a minute (bounded memory)
            self.failures = {ip: v for ip, v in self.failures.items() if now - v[1] < 60}
        for p in list(self.pending.values()):
            if p.not_before and now >= p.not_before:
                self._route(p)
            elif now - p.accepted_at > AUTH_DEADLINE:
                log.warning("closed connection from %s: no preamble within %.0f s", p.ip, AUTH_DEADLINE)
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
            log.info("worker %d exited (%s)", pid, f"signal {-code}" if code < 0 else f"status {code}")

    def _shutdown(self) -> None:
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
            if int(open(self.pid_file).read().strip()) == os.getpid():
                os.unlink(self.pid_file)
        log.info("stopped")

    @staticmethod
    def _not_reaped(pid: int) -> bool:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0
