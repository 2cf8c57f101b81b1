"""Tools for the fault table (test_faults.py): process trees, CPU use, leak baselines, client
scripts run as subprocesses, and a small TCP proxy that refuses chosen source addresses.

Every wait is on a condition with a deadline (``helpers.wait_until``); nothing sleeps to hope.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from helpers import Cluster, all_children, children, descendants, fd_count, reaped, wait_until  # noqa: F401
from parnet.maps.forkpool import FORK_SERVER_NAME
from parnet.server.daemon import default_log_file

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes -----------------------------------------------------------------------------
def gone(pid: int) -> bool:
    """Not running (a zombie counts as gone: its parent may be a killed daemon)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" once it has gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pool_processes(worker: int) -> list[int]:
    """The pool processes of ``worker``: loky's among its children (not the resource
    trackers), and the children of its fork server (``maps.forkpool``)."""
    out = []
    for p in children(worker):
        if "popen_loky_posix" in cmdline(p):
            out.append(p)
        elif comm(p) == FORK_SERVER_NAME:
            out += children(p)
    return out


def comm(pid: int) -> str:
    """The name of ``pid`` (``/proc/<pid>/comm``; "" once it has gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (None once it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if st[0] == "Z":
        return None
    return (int(st[11]) + int(st[12])) / CLK_TCK


def busy_pids(pids: Iterable[int], window: float = 0.5, limit: float = 0.06) -> dict[int, float]:
    """Those of ``pids`` that used more than ``limit`` of a CPU over ``window`` seconds (low:
    on a loaded machine a process that never stops computing may get a small share)."""
    pids = list(pids)
    before = {p: cpu_seconds(p) for p in pids}
    time.sleep(window)  # a measurement window, not a wait for something to happen
    out = {}
    for p in pids:
        a, b = before[p], cpu_seconds(p)
        if a is not None and b is not None and (b - a) / window > limit:
            out[p] = (b - a) / window
    return out


def kill_quietly(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    """Sends ``sig`` to each of ``pids`` that still exists."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


# -- leak baselines ------------------------------------------------------------------------
def wait_idle(cluster: Cluster, timeout: float = 20) -> None:
    """Until no daemon of ``cluster`` has a child (left over from an earlier test)."""
    for pid in cluster.pids:
        wait_until(
            lambda: not all_children(pid),  # noqa: B023
            timeout,
            f"server {pid} to have no workers",
        )


def pipe_fds(pid: int) -> int:
    """How many pipe ends ``pid`` holds."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return n


class Baseline:
    """The fd counts of the daemons of ``cluster`` (idle) and of this process."""

    def __init__(self, cluster: Cluster) -> None:
        wait_idle(cluster)
        for pid in cluster.pids:  # in its loop: a daemon makes its wake-up pipe after "ok"
            wait_until(lambda: pipe_fds(pid) == 2, 10, f"server {pid} to run its loop")  # noqa: B023
        self.cluster = cluster
        self.fds = {p: fd_count(p) for p in cluster.pids}
        self.own = fd_count(os.getpid())

    def check(
        self,
        *,
        dead_daemons: Sequence[int] = (),
        gone_pids: Iterable[int] = (),
        timeout: float = 15,
        own: bool = True,
    ) -> None:
        """Every surviving daemon back to no children and its baseline fds; every pid in
        ``gone_pids`` gone; this process back to (at most) its baseline fds."""
        gone_pids = list(gone_pids)
        live = [p for p in self.cluster.pids if p not in dead_daemons]

        def settled() -> bool:
            return (
                all(gone(p) for p in gone_pids)
                and not any(all_children(p) for p in live)
                and all(fd_count(p) == self.fds[p] for p in live)
                and (not own or fd_count(os.getpid()) <= self.own)
            )  # (others may close theirs)

        def state() -> str:
            left = [p for p in gone_pids if not gone(p)]
            kids = {p: all_children(p) for p in live}
            return (
                f"left: {[(p, cmdline(p)[:80]) for p in left]}, daemon children {kids}, "
                f"daemon fds {[fd_count(p) for p in live]} (baseline "
                f"{[self.fds[p] for p in live]}), own fds {fd_count(os.getpid())} "
                f"(baseline {self.own})"
            )

        try:
            wait_until(settled, timeout, "everything back to baseline")
        except AssertionError as e:
            raise AssertionError(f"{e}: {state()}") from None
        for p in dead_daemons:
            assert gone(p), f"daemon {p} still runs"


def server_log(cluster: Cluster, k: int) -> str:
    """The log file of server ``k`` of ``cluster``."""
    return default_log_file(cluster.ips[k], cluster.port)


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_since(path: str, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# -- client scripts as subprocesses ---------------------------------------------------------
class ClientProc:
    """A client script run as ``python -c``; stdout read line by line, stderr collected."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""
        self.err = b""
        self._err_thread = threading.Thread(target=self._read_err, daemon=True)
        self._err_thread.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.err += chunk

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        return self.err.decode(errors="replace")

    def line(self, timeout: float) -> str:
        """The next line the script prints (stripped), within ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0.0, left))
            if not r:
                raise AssertionError(
                    f"no line from the client script within {timeout} s "
                    f"(got {self._buf!r}; stderr: {self.stderr_text()[-3000:]})"
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                self._err_thread.join(5)
                raise AssertionError(
                    f"the client script ended (status {self.proc.wait(5)}): "
                    f"{self._buf!r}; stderr: {self.stderr_text()[-3000:]}"
                )
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def expect(self, word: str, timeout: float) -> str:
        """Reads lines until one starts with ``word``; returns the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            ln = self.line(max(0.01, deadline - time.monotonic()))
            if ln.split(" ", 1)[0] == word:
                return ln[len(word) :].strip()

    def json(self, timeout: float) -> Any:
        """The JSON document the script prints on a line starting with ``json``."""
        return json.loads(self.expect("json", timeout))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._err_thread.join(5)
        return code

    def stop(self) -> None:
        """Kills the script if it still runs (also when stopped) and closes the pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
        self._err_thread.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


# -- TCP ------------------------------------------------------------------------------------
def bytes_acked(sock: socket.socket) -> int:
    """``tcpi_bytes_acked`` of a TCP socket: how much of what we sent the peer has."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
    return struct.unpack_from("Q", raw, 120)[0]


class RefusingProxy:
    """Forwards ``listen_ip:port`` to ``target_ip:port`` for each of ``ports``, except that a
    connection whose source address is in ``refuse`` is closed at once (before any byte)."""

    def __init__(
        self, listen_ip: str, target_ip: str, ports: Sequence[int], refuse: set[str]
    ) -> None:
        self.target_ip = target_ip
        self.refuse = refuse
        self.refused: list[tuple[str, int]] = []  # (source address, port)
        self.forwarded: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._listeners = []
        try:
            for port in ports:
                self._listeners.append(socket.create_server((listen_ip, port)))
        except BaseException:
            self.close()
            raise
        for ls in self._listeners:
            self._spawn(self._accept_loop, ls)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        th = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(th)
        th.start()

    def _accept_loop(self, ls: socket.socket) -> None:
        port = ls.getsockname()[1]
        while not self._stop.is_set():
            r, _, _ = select.select([ls], [], [], 0.05)
            if not r:
                continue
            try:
                conn, addr = ls.accept()
            except OSError:
                return
            if addr[0] in self.refuse:
                self.refused.append((addr[0], port))
                conn.close()
                continue
            try:
                up = socket.create_connection((self.target_ip, port), timeout=5)
            except OSError:
                conn.close()
                continue
            self.forwarded.append((addr[0], port))
            with self._lock:
                self._socks |= {conn, up}
            self._spawn(self._pump, conn, up)
            self._spawn(self._pump, up, conn)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                r, _, _ = select.select([src], [], [], 0.05)
                if not r:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # the end of one direction travels on

    def close(self) -> None:
        """Stops forwarding and closes every socket."""
        self._stop.set()
        for th in self._threads:
            th.join(5)
        for s in [*self._listeners, *self._socks]:
            s.close()


__all__ = [
    "Baseline",
    "ClientProc",
    "RefusingProxy",
    "all_children",
    "busy_pids",
    "bytes_acked",
    "cmdline",
    "cpu_seconds",
    "descendants",
    "gone",
    "kill_quietly",
    "log_since",
    "log_size",
    "pipe_fds",
    "pool_processes",
    "reaped",
    "server_log",
    "wait_idle",
]
