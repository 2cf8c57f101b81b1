"""Edges that the other files leave out (issue 14, item 12): rfeval's nout/isout checks, host
parsing (IPv6, default port), Connections refuse to pickle, install_vars of a module global,
netmap argument checks and outputs that cannot be pickled, ``parnet server --kill`` with
several or unreadable pid files or a server that ignores SIGTERM, ``parnet keygen`` errors and
its terminal prompt, and the close at interpreter exit.
"""

from __future__ import annotations

import os
import pickle
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from helpers import Cluster, wait_until
from parnet import (
    ParnetError,
    RemoteError,
    install_vars,
    netarrayfun,
    netcellfun,
    precv,
    psend,
    reval,
    rfeval,
)
from parnet.client.api import parse_host
from parnet.constants import CMD_PORT
from parnet.server.daemon import kill_server, pid_file_path

PY = sys.executable
MODULE_GLOBAL = {"from": "the test module's globals", "n": 17}


# -- rfeval: nout / isout ----------------------------------------------------------------------
def test_rfeval_nout_and_isout_checked_before_sending(conns) -> None:
    for nout in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="nout must be an int >= 0"):
            rfeval(lambda: (1, 2), connection=conns[1], nout=nout)
    with pytest.raises(ValueError, match="isout needs nout"):
        rfeval(lambda: (1, 2), connection=conns[1], isout=[True, False])
    with pytest.raises(ValueError, match="nout elements"):
        rfeval(lambda: (1, 2), connection=conns[1], nout=2, isout=[True])
    with pytest.raises(ValueError, match="local machine"):
        rfeval(lambda: 1, connection=conns[0])
    # none of these reached the server: it answers the next call at once, in order
    assert rfeval(lambda: (1, 2, 3), connection=conns[1], nout=3, isout=[True, False, True]) == [
        1,
        3,
    ]
    assert rfeval(lambda: (1, 2), connection=conns[1], nout=2) == [1, 2]


def test_rfeval_nout_not_returned_is_a_remote_error(conns) -> None:
    with pytest.raises(RemoteError) as ei:
        rfeval(lambda: (1, 2), connection=conns[1], nout=3)
    assert ei.value.node == 1 and "3" in ei.value.message, ei.value.message
    with pytest.raises(RemoteError):
        rfeval(lambda: 5, connection=conns[2], nout=2)  # not a tuple at all
    assert rfeval(lambda: 7, connection=conns[1]) == 7  # the server goes on


# -- host parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, want",
    [
        ("node7", ("node7", CMD_PORT)),
        (" node7:23456 ", ("node7", 23456)),
        ("[::1]:23456", ("::1", 23456)),
        ("[fe80::1%eth0]:2000", ("fe80::1%eth0", 2000)),
        ("[::1]", ("::1", CMD_PORT)),
        ("::1", ("::1", CMD_PORT)),
        ("2001:db8::7", ("2001:db8::7", CMD_PORT)),
    ],
)
def test_parse_host(spec: str, want: tuple[str, int]) -> None:
    assert parse_host(spec) == want


@pytest.mark.parametrize(
    "spec, message",
    [
        ("[::1", r"expected '\[address\]'"),
        ("[]:2000", r"expected '\[address\]'"),
        ("[::1]2000", r"expected '\[address\]'"),
        (":2000", "no host name"),
        ("   ", "empty host name"),
        ("[::1]:0", "port"),
        ("[::1]:http", "port"),
    ],
)
def test_parse_host_refuses(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_host(spec)


# -- Connections are not sent anywhere -----------------------------------------------------------
def test_connections_refuse_to_pickle(conns) -> None:
    for dumps in (pickle.dumps, cloudpickle.dumps):
        with pytest.raises(TypeError, match="use `sockets` there"):
            dumps(conns)
        with pytest.raises(TypeError, match="use `sockets` there"):
            dumps({"inside": [conns[1]]})
    with pytest.raises(TypeError, match="use `sockets` there"):
        psend(conns[1:], conns[1])
    psend("still fine", conns[1])  # the refused psend sent nothing
    reval("psend(precv(sockets[0]), sockets[0])", conns[1])
    assert precv(conns[1], timeout=30) == "still fine"


# -- install_vars of a module global -------------------------------------------------------------
def test_install_vars_module_global_and_bad_names(conns) -> None:
    assert "MODULE_GLOBAL" not in locals()
    install_vars("MODULE_GLOBAL", connections=conns[1:])
    reval("psend(MODULE_GLOBAL, sockets[0])", conns[1:])
    assert [precv(conns[k], timeout=30) for k in (1, 2)] == [MODULE_GLOBAL, MODULE_GLOBAL]
    MODULE_GLOBAL_local = "a local"  # noqa: F841 - looked up by name
    with pytest.raises(NameError, match="not_defined_anywhere"):
        install_vars("not_defined_anywhere", connections=conns[1:])
    for bad in ("1x", "a b", 3):
        with pytest.raises(ValueError, match="bad variable name"):
            install_vars(bad, connections=conns[1:])
    install_vars(connections=conns[1:])  # nothing to install: nothing happens
    install_vars("MODULE_GLOBAL_local", connections=conns[0])  # only the local machine: nothing
    reval("psend('MODULE_GLOBAL_local' in dir(), sockets[0])", conns[1])
    assert precv(conns[1], timeout=30) is False


# -- netmap: argument checks, outputs that cannot come back --------------------------------------
def test_netmap_argument_checks(conns) -> None:
    for fn in (netcellfun, netarrayfun):
        name = fn.__name__
        with pytest.raises(TypeError, match=f"{name}: fun must be callable"):
            fn(conns, 5, [1, 2])
        with pytest.raises(ValueError, match=f"{name}: chunk_size must be an int >= 1"):
            fn(conns, abs, [1, 2], chunk_size=0)
        with pytest.raises(ValueError, match=f"{name}: nout must be an int >= 1"):
            fn(conns, abs, [1, 2], nout=0)
        with pytest.raises(TypeError, match=f"{name}: verbose must be an int"):
            fn(conns, abs, [1, 2], verbose="yes")
        with pytest.raises(ValueError, match="no servers"):
            fn(conns[0], abs, [1, 2])
    with pytest.raises(ValueError, match="same length"):
        netcellfun(conns, lambda a, b: a, [1, 2], [1])
    with pytest.raises(ValueError, match="same shape"):
        netarrayfun(conns, lambda a, b: a, np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="at least one"):
        netcellfun(conns, abs)
    assert netcellfun(conns, abs, [-1, -2]).tolist() == [1, 2]  # nothing was left behind


def test_netmap_output_that_cannot_be_pickled(conns) -> None:
    def make_lock(x: int) -> object:
        import threading

        return threading.Lock() if x == 3 else x

    with pytest.raises(RemoteError) as ei:
        netcellfun(conns, make_lock, range(6), uniform_output=False)
    assert "3" in str(ei.value) and "lock" in str(ei.value).lower(), str(ei.value)
    assert netcellfun(conns, make_lock, [0, 1, 2], uniform_output=False) == [0, 1, 2]
    with pytest.raises(RemoteError, match="lock"):
        rfeval(make_lock, 3, connection=conns[1])
    assert rfeval(make_lock, 4, connection=conns[1]) == 4


# -- parnet server --kill ------------------------------------------------------------------------
def _free_port() -> int:
    from helpers import free_port_pair

    return free_port_pair()


def test_kill_with_several_pid_files_and_unreadable_ones() -> None:
    port = _free_port()
    files = [pid_file_path(ip, port) for ip in ("127.0.0.91", "127.0.0.92")]
    try:
        for f in files:
            Path(f).write_text(f"{os.getpid()}\n")
        r = subprocess.run(
            [PY, "-m", "parnet", "server", "--kill", "--cmd-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0
        assert "several servers use port" in r.stderr and "give bind= to choose" in r.stderr, (
            r.stderr
        )
        assert all(os.path.exists(f) for f in files)  # nothing was touched
        Path(files[0]).write_text("not a pid\n")
        with pytest.raises(ParnetError, match="unreadable pid file"):
            kill_server(port, "127.0.0.91")
        os.unlink(files[1])
        with pytest.raises(ParnetError, match="unreadable pid file"):
            kill_server(port)  # the only match, even without bind
        os.unlink(files[0])
        with pytest.raises(ParnetError, match="no parnet server found"):
            kill_server(port)
    finally:
        for f in files:
            if os.path.exists(f):
                os.unlink(f)


def test_kill_escalates_to_sigkill() -> None:
    """A process that ignores SIGTERM behind a pid file it holds locked (as a daemon does) is
    killed with SIGKILL."""
    port = _free_port()
    path = pid_file_path("127.0.0.93", port)
    p = subprocess.Popen(
        [
            PY,
            "-c",
            "import fcntl, os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "f = open(sys.argv[1], 'w')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write(f'{os.getpid()}\\n'); f.flush()\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n",
            path,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        assert kill_server(port, "127.0.0.93", timeout=1.0) == p.pid
        assert p.wait(timeout=30) == -signal.SIGKILL
        assert not os.path.exists(path)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if os.path.exists(path):
            os.unlink(path)


# -- parnet keygen -------------------------------------------------------------------------------
def test_keygen_error_exit(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run(
        [PY, "-m", "parnet", "keygen", "alice", "--dir", str(blocker / "srp")],
        input="a-long-enough-password\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.startswith("parnet keygen: error:"), r.stderr
    r = subprocess.run(
        [PY, "-m", "parnet", "keygen", "a:b", "--dir", str(tmp_path / "d")],
        input="\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "must not contain ':'" in r.stderr, r.stderr
    assert not (tmp_path / "d" / "server" / "passwd").exists()
    r = subprocess.run([PY, "-m", "parnet", "keygen"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "USERNAME" in r.stderr


def _pty_session(
    argv: list[str], answers: list[tuple[str, str]], timeout: float = 120
) -> tuple[int, str]:
    """Runs ``argv`` on a new terminal; answers each prompt (a text it waits for) with a line.
    Returns (exit status, everything it wrote)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execv(argv[0], argv)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        todo = list(answers)
        while True:
            if todo and todo[0][0].encode() in out:
                os.write(fd, todo.pop(0)[1].encode() + b"\n")
                out += b"\n"  # (the prompt counts once)
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; the terminal shows {out!r}"
            if select.select([fd], [], [], min(left, 1.0))[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_keygen_prompts_at_a_terminal(tmp_path: Path) -> None:
    argv = [PY, "-m", "parnet", "keygen", "carol", "--dir", str(tmp_path / "a")]
    code, out = _pty_session(
        argv,
        [
            ("Password for carol", "terminal-password-1"),
            ("Repeat the password", "terminal-password-1"),
        ],
    )
    assert code == 0, out
    assert "terminal-password-1" not in out  # not echoed
    assert (
        tmp_path / "a" / "client" / "user_passwd"
    ).read_text().strip() == "carol:terminal-password-1"
    # two different passwords: refused, nothing written
    argv = [PY, "-m", "parnet", "keygen", "dave", "--dir", str(tmp_path / "b")]
    code, out = _pty_session(
        argv,
        [("Password for dave", "one-password-here"), ("Repeat the password", "another-password")],
    )
    assert code == 1 and "do not match" in out, out
    assert not (tmp_path / "b" / "server" / "passwd").exists()


# -- the close at interpreter exit ------------------------------------------------------------------
AT_EXIT = r"""
import atexit, os, sys

def after_parnet():  # registered before parnet's own handler, so it runs after it
    net = c.network
    print("closed" if net.closed and all(n.cmd is None or n.cmd.closed for n in net.nodes)
          else "open", flush=True)

atexit.register(after_parnet)
from parnet import pconnect, rfeval
c = pconnect(sys.argv[2:], use_tls=sys.argv[1] == "1")
print(*[rfeval(os.getpid, connection=c[k]) for k in (1, 2)], flush=True)
# no sclose: the interpreter's exit closes the network
"""


def test_open_network_closed_at_exit(tmp_path: Path) -> None:
    from helpers import reaped

    cl = Cluster(2, True, first_ip=94)
    try:
        r = subprocess.run(
            [PY, "-c", AT_EXIT, "1", *cl.hosts], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        workers, state = r.stdout.splitlines()
        assert state == "closed", r.stdout
        wait_until(lambda: all(reaped(int(w)) for w in workers.split()), 30, "the workers to exit")
    finally:
        cl.stop()
