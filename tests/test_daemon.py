"""The server daemon as a program: start, detach, --foreground, --kill, pid files, refusals,
logging, and how clients fail against it (nothing listening, version and TLS mismatch).

Servers here listen on 127.0.0.30 .. 127.0.0.39 (and 127.0.0.1 for the default --no-tls
address) on random ports, and every one is stopped by pid, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    MODE_IDS,
    MODES,
    children,
    free_port_pair,
    pid_alive,
    start_background,
    stop_pid,
    wait_until,
)
from parnet import ConnectError, ParnetError, pconnect, precv, pserver, reval, sclose
from parnet.constants import MAGIC, PROTOCOL_VERSION
from parnet.errors import ConfigError
from parnet.server.daemon import pid_file_path, runtime_dir
from parnet.transport import handshake

_SCRIPT = Path(sys.executable).with_name("parnet")
PARNET = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "parnet"]
QUICK = 3.0  # seconds: "at once" for refusals and mismatches on loopback


# -- helpers ---------------------------------------------------------------------------
def run_parnet(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """``parnet ARGS`` as a subprocess; its output as text."""
    return subprocess.run(
        [*PARNET, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def accepts(ip: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``ip:port`` right now."""
    try:
        with socket.create_connection((ip, port), timeout=2):
            return True
    except OSError:
        return False


def server_opts(ip: str | None, port: int, tls: bool) -> list[str]:
    opts = ["--cmd-port", str(port), "--data-port", str(port + 1), "--allow-root"]
    if ip is not None:
        opts += ["--bind", ip]
    if not tls:
        opts.append("--no-tls")
    return opts


def cli_start(
    ip: str | None, tls: bool, *extra: str
) -> tuple[int, int, subprocess.CompletedProcess]:
    """``parnet server`` on a free random port pair; returns (pid, port, completed process)."""
    for _ in range(5):
        port = free_port_pair()
        r = run_parnet("server", *server_opts(ip, port, tls), *extra)
        if r.returncode == 0:
            m = re.search(r"pid (\d+)", r.stdout)
            assert m, f"no pid in the output of parnet server: {r.stdout!r}"
            return int(m.group(1)), port, r
        if "in use" not in r.stderr:
            raise AssertionError(f"parnet server failed: {r.stderr}")
    raise AssertionError("no free port pair")


def api_start(ip: str, tls: bool, **kw: object) -> tuple[int, int]:
    """A server started from Python (``start_background``); returns (pid, port)."""
    for _ in range(5):
        port = free_port_pair()
        try:
            return start_background(
                use_tls=tls, cmd_port=port, data_port=port + 1, bind=ip, allow_root=True, **kw
            ), port
        except ParnetError as e:
            if "in use" not in str(e):
                raise
    raise AssertionError("no free port pair")


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for signal ``sig``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def unused_port(ip: str) -> int:
    """A port pair on ``ip`` where nothing listens."""
    for _ in range(20):
        port = free_port_pair()
        if not accepts(ip, port):
            return port
    raise AssertionError("no unused port")


@pytest.fixture()
def spawned() -> Iterator[list[int]]:
    """Pids of servers a test started: stopped by pid at the end, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        stop_pid(pid)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[bool, tuple[str, int, int]]]:
    """One idle server per mode for this module: {tls: (ip, port, pid)}."""
    out: dict[bool, tuple[str, int, int]] = {}
    try:
        for tls in MODES:
            ip = "127.0.0.35" if tls else "127.0.0.34"
            pid, port = api_start(ip, tls)
            out[tls] = (ip, port, pid)
        yield out
    finally:
        for _, _, pid in out.values():
            stop_pid(pid)


# -- start, detach, kill -------------------------------------------------------------------
@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_cli_start_detaches_and_kill_stops(tls: bool, spawned: list[int]) -> None:
    ip = "127.0.0.30"
    pid, port, r = cli_start(ip, tls)
    spawned.append(pid)
    assert f"pid {pid}" in r.stdout
    # it returned once listening: both ports accept at once, no waiting
    assert accepts(ip, port) and accepts(ip, port + 1)
    assert pid_alive(pid)
    pid_file = Path(pid_file_path(ip, port))
    assert pid_file.read_text().strip() == str(pid)

    k = run_parnet("server", "--kill", "--bind", ip, "--cmd-port", str(port))
    assert k.returncode == 0, k.stderr
    assert str(pid) in k.stdout
    assert not pid_alive(pid)
    assert not pid_file.exists()
    assert not accepts(ip, port)

    if not tls:
        again = run_parnet("server", "--kill", "--bind", ip, "--cmd-port", str(port))
        assert again.returncode != 0
        assert "no parnet server" in again.stderr


def test_pserver_start_and_kill(spawned: list[int]) -> None:
    ip = "127.0.0.31"
    for _ in range(5):
        port = free_port_pair()
        try:
            assert (
                pserver(use_tls=False, cmd_port=port, data_port=port + 1, bind=ip, allow_root=True)
                is None
            )
            break
        except ParnetError as e:
            if "in use" not in str(e):
                raise
    pid_file = Path(pid_file_path(ip, port))
    pid = int(pid_file.read_text())
    spawned.append(pid)
    assert accepts(ip, port) and accepts(ip, port + 1)
    assert pid_alive(pid)

    pserver("kill", cmd_port=port)  # no bind: the one server on that port, whatever its address
    assert not pid_alive(pid)
    assert not pid_file.exists()
    assert not accepts(ip, port)
    with pytest.raises(ParnetError, match="no parnet server"):
        pserver("kill", cmd_port=port, bind=ip)
    with pytest.raises(ValueError):
        pserver("stop")


def test_foreground_stays_and_exits_0_on_sigterm(tmp_path: Path, spawned: list[int]) -> None:
    ip = "127.0.0.32"
    log = tmp_path / "fg.log"
    for _ in range(5):
        port = free_port_pair()
        proc = subprocess.Popen(
            [
                *PARNET,
                "server",
                "--foreground",
                "--log-file",
                str(log),
                *server_opts(ip, port, tls=False),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        spawned.append(proc.pid)
        # ready: listening, pid file written, and SIGTERM handled (not the default action)
        wait_until(
            lambda: (
                proc.poll() is not None  # noqa: B023
                or (accepts(ip, port) and catches(proc.pid, signal.SIGTERM))  # noqa: B023
            ),
            30,
            "the foreground server to listen",
        )
        if proc.poll() is None:
            break
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert "in use" in err, err
    else:
        raise AssertionError("no free port pair")
    try:
        # it did not detach: the process we started is the server
        assert Path(pid_file_path(ip, port)).read_text().strip() == str(proc.pid)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not Path(pid_file_path(ip, port)).exists()
        assert not accepts(ip, port)
        assert "without TLS" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


PREPARED = r"""
import sys
from parnet.server.daemon import Daemon
port, ip, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
d = Daemon(use_tls=False, cmd_port=port, data_port=port + 1, bind=ip, allow_root=True, log_file=log)
d.prepare()
print("prepared", flush=True)
sys.stdin.readline()
d.run()
"""


def test_sigterm_between_listen_and_serve_stops_cleanly(tmp_path: Path, spawned: list[int]) -> None:
    """The window the CLI has between ``prepare()`` and ``run()``, held open on purpose."""
    ip = "127.0.0.32"
    port = unused_port(ip)
    pid_file = Path(pid_file_path(ip, port))
    proc = subprocess.Popen(
        [sys.executable, "-c", PREPARED, str(port), ip, str(tmp_path / "log")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    spawned.append(proc.pid)
    try:
        assert proc.stdout.readline().strip() == b"prepared"  # type: ignore[union-attr]
        assert accepts(ip, port) and pid_file.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"go\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.wait(timeout=15) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            with contextlib.suppress(BrokenPipeError):
                f.close()  # type: ignore[union-attr]
        if pid_file.exists() and pid_file.read_text().strip() == str(proc.pid):
            pid_file.unlink()


# -- pid file and a second server -----------------------------------------------------------
def test_pid_file_private_and_second_server_refused(spawned: list[int]) -> None:
    ip = "127.0.0.33"
    pid, port = api_start(ip, False)
    spawned.append(pid)
    path = Path(pid_file_path(ip, port))
    rdir = path.parent
    assert str(rdir) == runtime_dir()
    assert rdir.is_relative_to(os.environ["XDG_RUNTIME_DIR"])
    assert rdir != Path(tempfile.gettempdir())  # not a predictable name in the shared /tmp
    st = rdir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    fst = path.stat()
    assert stat.S_IMODE(fst.st_mode) & 0o022 == 0 and fst.st_uid == os.geteuid()
    assert path.read_text().strip() == str(pid)

    r = run_parnet("server", *server_opts(ip, port, tls=False))
    assert r.returncode != 0
    assert re.search(r"in use|already running", r.stderr), r.stderr
    assert f"{port}" in r.stderr
    # the first one is untouched
    assert pid_alive(pid) and accepts(ip, port)
    assert path.read_text().strip() == str(pid)
    with pytest.raises(ParnetError, match="in use|already running"):
        pserver(use_tls=False, cmd_port=port, data_port=port + 1, bind=ip, allow_root=True)
    assert pid_alive(pid) and accepts(ip, port)


def test_stale_pid_file_is_replaced(spawned: list[int]) -> None:
    ip = "127.0.0.33"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    port = unused_port(ip)
    path = Path(pid_file_path(ip, port))
    path.write_text(f"{dead.pid}\n")
    try:
        # --kill on a stale pid file says so and removes the file
        k = run_parnet("server", "--kill", "--bind", ip, "--cmd-port", str(port))
        assert k.returncode != 0 and "not running" in k.stderr
        assert not path.exists()
        # a new server replaces a stale pid file
        path.write_text(f"{dead.pid}\n")
        pid = start_background(
            use_tls=False, cmd_port=port, data_port=port + 1, bind=ip, allow_root=True
        )
        spawned.append(pid)
        assert path.read_text().strip() == str(pid)
    finally:
        if path.exists() and path.read_text().strip() == str(dead.pid):
            path.unlink()


def test_runtime_dir_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "parnet").mkdir(mode=0o755)
    os.chmod(tmp_path / "parnet", 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="private"):
        runtime_dir()
    os.chmod(tmp_path / "parnet", 0o700)
    assert runtime_dir() == str(tmp_path / "parnet")
    # no XDG_RUNTIME_DIR: a private directory under the home directory, never /tmp
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = Path(runtime_dir())
    assert d == tmp_path / "home" / ".local" / "state" / "parnet"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="only as root")
def test_refuses_root_without_allow_root() -> None:
    ip = "127.0.0.31"
    port = unused_port(ip)
    t = time.monotonic()
    r = run_parnet(
        "server", "--no-tls", "--bind", ip, "--cmd-port", str(port), "--data-port", str(port + 1)
    )
    assert r.returncode != 0
    assert "root" in r.stderr.lower()
    assert time.monotonic() - t < 30
    assert not accepts(ip, port)
    assert not Path(pid_file_path(ip, port)).exists()
    with pytest.raises(ParnetError, match="root"):
        pserver(use_tls=False, cmd_port=port, data_port=port + 1, bind=ip)
    assert not accepts(ip, port)


def test_no_tls_without_bind_uses_loopback_and_warns(tmp_path: Path, spawned: list[int]) -> None:
    log = tmp_path / "plain.log"
    pid, port, r = cli_start(None, False, "--log-file", str(log))
    spawned.append(pid)
    assert accepts("127.0.0.1", port)
    assert not accepts("127.0.0.39", port)  # 127.0.0.1 only, not every address
    assert "127.0.0.1" in r.stdout
    text = log.read_text() + r.stderr
    assert "without TLS" in text and "WARNING" in text
    # the address it listens on finds it
    k = run_parnet("server", "--kill", "--bind", "127.0.0.1", "--cmd-port", str(port))
    assert k.returncode == 0, k.stderr
    assert not pid_alive(pid)
    assert not accepts("127.0.0.1", port)


@pytest.mark.skipif(True not in MODES, reason="TLS support not installed")
def test_tls_without_auth_data_refuses_naming_the_file(tmp_path: Path) -> None:
    ip = "127.0.0.36"
    home = tmp_path / "empty_home"
    home.mkdir(mode=0o700)
    port = unused_port(ip)
    env = {**os.environ, "PARNET_HOME": str(home)}
    r = run_parnet("server", *server_opts(ip, port, tls=True), env=env)
    assert r.returncode != 0
    assert str(home / "srp" / "server" / "passwd") in r.stderr, r.stderr
    assert not accepts(ip, port)
    assert not Path(pid_file_path(ip, port)).exists()

    missing = tmp_path / "nowhere" / "passwd"
    r = run_parnet("server", *server_opts(ip, port, tls=True), "--auth-file", str(missing))
    assert r.returncode != 0
    assert str(missing) in r.stderr, r.stderr
    with pytest.raises(ParnetError, match=re.escape(str(missing))):
        pserver(cmd_port=port, data_port=port + 1, bind=ip, allow_root=True, auth_file=str(missing))
    assert not accepts(ip, port)


# -- the log -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_log_file_has_one_line_per_connection_event(
    tls: bool, tmp_path: Path, spawned: list[int]
) -> None:
    ip = "127.0.0.37"
    log = tmp_path / "server.log"
    pid, port = api_start(ip, tls, log_file=str(log))
    spawned.append(pid)
    assert "listening on 127.0.0.37" in log.read_text()
    c = pconnect([f"{ip}:{port}"], use_tls=tls)
    try:
        (wpid,) = children(pid)
        reval("psend(1, sockets[0])", c[1])
        assert precv(c[1], timeout=20) == 1
    finally:
        sclose(c)
    wait_until(
        lambda: f"worker {wpid} exited" in log.read_text(), 15, "the worker's exit in the log"
    )
    lines = log.read_text().splitlines()
    started = [x for x in lines if f"worker {wpid} for network {c.network.id_str[:8]}" in x]
    exited = [x for x in lines if f"worker {wpid} exited (status 0)" in x]
    assert len(started) == 1 and len(exited) == 1, lines
    assert lines.index(started[0]) < lines.index(exited[0])


# -- clients against the daemon -------------------------------------------------------------
@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_host_port_and_nothing_listening(tls: bool, servers) -> None:
    ip, port, pid = servers[tls]
    with pconnect([f"{ip}:{port}"], use_tls=tls) as c:
        reval("import os; psend(os.getpid(), sockets[0])", c[1])
        assert precv(c[1], timeout=20) in children(pid)

    dead = "127.0.0.38"
    dport = unused_port(dead)
    t = time.monotonic()
    with pytest.raises(ConnectError, match=re.escape(f"{dead}:{dport}")):
        pconnect([f"{dead}:{dport}"], use_tls=tls, timeout=20)
    assert time.monotonic() - t < QUICK

    # one unreachable server: ConnectError naming it, and the reachable one is let go
    wait_until(lambda: not children(pid), 15, "idle server")
    t = time.monotonic()
    with pytest.raises(ConnectError, match=re.escape(f"{dead}:{dport}")):
        pconnect([f"{ip}:{port}", f"{dead}:{dport}"], use_tls=tls, timeout=20)
    assert time.monotonic() - t < QUICK
    wait_until(lambda: not children(pid), 15, "the worker of the failed pconnect to exit")


def _raw_preamble(ip: str, port: int, pre: handshake.Preamble) -> tuple[int, str]:
    """Sends a hand-made preamble; returns the daemon's (status, reason)."""
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(pre.pack())
        buf = b""
        while len(buf) < handshake.REPLY.size:
            chunk = s.recv(handshake.REPLY.size - len(buf))
            assert chunk, "the daemon closed without a reply"
            buf += chunk
        magic, _version, status, _dport, rlen = handshake.REPLY.unpack(buf)
        assert magic == MAGIC
        reason = b""
        while len(reason) < rlen:
            chunk = s.recv(rlen - len(reason))
            assert chunk
            reason += chunk
        return status, reason.decode()


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_protocol_version_mismatch(tls: bool, servers) -> None:
    ip, port, pid = servers[tls]
    bad = handshake.Preamble(
        PROTOCOL_VERSION + 1, handshake.KIND_CMD, tls, uuid.uuid4().bytes, 0, 1
    )
    t = time.monotonic()
    status, reason = _raw_preamble(ip, port, bad)
    assert status == handshake.STATUS_ERROR
    assert "version" in reason
    with pytest.raises(ConnectError, match=rf"{re.escape(f'{ip}:{port}')}.*version"):
        handshake.open_channel(ip, port, bad, deadline=time.monotonic() + 20, ctx=None)
    assert time.monotonic() - t < QUICK
    assert not children(pid)
    # the daemon still serves
    with pconnect([f"{ip}:{port}"], use_tls=tls) as c:
        reval("psend('ok', sockets[0])", c[1])
        assert precv(c[1], timeout=20) == "ok"


def test_garbage_preamble_refused(servers) -> None:
    ip, port, pid = servers[MODES[0]]
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n" + bytes(handshake.PREAMBLE.size))
        head = s.recv(handshake.REPLY.size)
        assert handshake.REPLY.unpack(head)[2] == handshake.STATUS_ERROR
    assert not children(pid)


def test_server_reply_with_other_version() -> None:
    """A daemon answering with another protocol version: ConnectError at once, no hang."""
    ls = socket.create_server(("127.0.0.38", 0))
    port = ls.getsockname()[1]

    def fake() -> None:
        s, _ = ls.accept()
        with s:
            s.recv(handshake.PREAMBLE.size)
            s.sendall(
                handshake.REPLY.pack(MAGIC, PROTOCOL_VERSION + 1, handshake.STATUS_OK, port, 0)
            )
            s.recv(1)

    th = threading.Thread(target=fake, daemon=True)
    th.start()
    try:
        t = time.monotonic()
        with pytest.raises(ConnectError, match="version"):
            pconnect([f"127.0.0.38:{port}"], use_tls=False, timeout=20)
        assert time.monotonic() - t < QUICK
    finally:
        ls.close()
        th.join(5)


def test_silent_server_times_out() -> None:
    """Something that accepts and never answers: ConnectError after ``timeout``, naming it."""
    ls = socket.create_server(("127.0.0.38", 0))  # the kernel completes connections; nobody reads
    port = ls.getsockname()[1]
    try:
        t = time.monotonic()
        with pytest.raises(ConnectError, match=re.escape(f"127.0.0.38:{port}")):
            pconnect([f"127.0.0.38:{port}"], use_tls=False, timeout=1)
        assert time.monotonic() - t < 1 + QUICK
    finally:
        ls.close()


@pytest.mark.skipif(True not in MODES, reason="TLS support not installed")
def test_tls_mismatch(servers) -> None:
    for server_tls in (False, True):
        ip, port, pid = servers[server_tls]
        t = time.monotonic()
        with pytest.raises(ConnectError) as ei:
            pconnect([f"{ip}:{port}"], use_tls=not server_tls, timeout=20)
        assert time.monotonic() - t < QUICK
        text = str(ei.value)
        assert f"{ip}:{port}" in text and "TLS" in text
        assert ("requires TLS" if server_tls else "without TLS") in text
        assert not children(pid)
