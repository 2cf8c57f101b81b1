"""Starting and stopping a server by pid: an address that is not this machine's is refused with
the system's reason, ``stop_pid`` ends a server that ignores SIGTERM, and the daemon's helpers
that decide whether a pid file is held and who is on the other end of a connection."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port_pair, pid_alive, start_background, stop_pid
from parnet.errors import ParnetError
from parnet.server import daemon


def test_address_not_of_this_machine_is_refused() -> None:
    port = free_port_pair()
    pid = None
    try:
        with pytest.raises(ParnetError, match=rf"cannot listen on 192\.0\.2\.1:{port}: \w"):
            pid = start_background(
                use_tls=False, cmd_port=port, data_port=port + 1, bind="192.0.2.1", allow_root=True
            )
    finally:
        if pid is not None:
            stop_pid(pid)


def test_stop_pid_kills_what_ignores_sigterm() -> None:
    code = (
        "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready\n"  # type: ignore[union-attr]
        stop_pid(proc.pid, timeout=0.5)
        assert not pid_alive(proc.pid)
        assert not os.path.exists(f"/proc/{proc.pid}")  # reaped, no zombie left
    finally:
        if proc.poll() is None and pid_alive(proc.pid):
            proc.kill()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]


def test_pid_file_lock_tells_a_running_daemon(tmp_path: Path) -> None:
    path = tmp_path / "server.pid"
    assert not daemon._pid_file_locked(str(path))  # no file
    path.write_text(f"{os.getpid()}\n")
    assert not daemon._pid_file_locked(str(path))  # a file left by a crash: nobody holds it
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running daemon does
        assert daemon._pid_file_locked(str(path))
    finally:
        os.close(fd)
    assert not daemon._pid_file_locked(str(path))
    link = tmp_path / "link.pid"
    link.symlink_to(path)
    assert not daemon._pid_file_locked(str(link))  # never through a symbolic link


def test_start_time_of_a_process() -> None:
    mine = daemon._start_time(os.getpid())
    assert mine is not None and mine.isdigit() and daemon._start_time(os.getpid()) == mine
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert daemon._start_time(int(done.stdout)) is None  # exited and reaped


def test_peer_uid_of_loopback_connections() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    lone = socket.socket()
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    try:
        assert daemon.peer_uid(b) == os.geteuid() and daemon.peer_uid(a) == os.geteuid()
        assert daemon.peer_uid(lone) is None  # not connected
    finally:
        for s in (a, b, srv, lone):
            s.close()


def test_source_key_of_a_name_is_the_name() -> None:
    assert daemon.source_key("not-an-address") == "not-an-address"
