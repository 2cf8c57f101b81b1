"""Real servers for integration tests: started as detached daemons, stopped by pid."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from parnet import pconnect
from parnet.server.launch import pid_alive, start_background, stop_pid  # noqa: F401

PASSWORD = "test-password-0123456789"
USER = "tester"


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Polls ``cond`` until it returns a true value; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# TLS + SRP is a core part of parnet: if its layer cannot be imported the suite fails here,
# instead of quietly dropping every TLS mode.
import parnet.auth.keyfile  # noqa: E402, F401
import parnet.auth.pairkeys  # noqa: E402, F401
import parnet.auth.srp  # noqa: E402, F401
import parnet.auth.tls  # noqa: E402, F401

MODES = [False, True]
MODE_IDS = ["tls" if t else "plain" for t in MODES]


def children(pid: int, zombies: bool = False) -> list[int]:
    """Direct child pids of ``pid`` (live ones; zombies too with ``zombies``)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(st[1]) == pid and (zombies or st[0] != "Z"):
                out.append(int(d))
    return out


def reaped(pid: int) -> bool:
    """Gone for good: not running and not a zombie waiting for its parent."""
    return not os.path.exists(f"/proc/{pid}")


def all_children(pid: int) -> list[int]:
    """Direct children of ``pid``, zombies included."""
    return children(pid, zombies=True)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def free_port_pair() -> int:
    """An even port in a high range whose +1 is the data port (random per call)."""
    return random.randrange(20000, 40000, 2)


class Cluster:
    """``n`` real parnet servers on 127.0.0.2, 127.0.0.3, ... (one port pair for all)."""

    def __init__(self, n: int, tls: bool, first_ip: int = 2) -> None:
        self.tls = tls
        self.port = free_port_pair()
        self.ips = [f"127.0.0.{first_ip + k}" for k in range(n)]
        self.pids: list[int] = []
        self.hosts = [f"{ip}:{self.port}" for ip in self.ips]
        try:
            for ip in self.ips:
                self.pids.append(self.start_one(ip))
        except BaseException:
            self.stop()
            raise

    def start_one(self, ip: str) -> int:
        """Starts the server for ``ip``; returns its pid."""
        for _ in range(5):
            try:
                return start_background(
                    use_tls=self.tls,
                    cmd_port=self.port,
                    data_port=self.port + 1,
                    bind=ip,
                    allow_root=True,
                )
            except Exception as e:  # port taken by something else: try another pair
                if "in use" not in str(e) or self.pids:
                    raise
                self.port = free_port_pair()
                self.hosts = [f"{x}:{self.port}" for x in self.ips]
        raise RuntimeError("no free port pair")

    def connect(self, **kw: Any) -> Any:
        """``pconnect`` to every server in the mode of this cluster."""
        return pconnect(self.hosts, use_tls=self.tls, **kw)

    def workers(self, k: int) -> list[int]:
        """Worker pids of server ``k`` (0-based position)."""
        return children(self.pids[k])

    def stop(self) -> None:
        """Stops every server by pid."""
        for pid in self.pids:
            stop_pid(pid)
