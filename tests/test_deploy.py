"""`parnet up/down/status` on this machine: the remote script run by a local shell instead of ssh.

The same script runs over real ssh on the namespace bed (tests/hosts/); here each case is one
real server started and stopped by it, and the bad inputs it must name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from helpers import free_port_pair, pid_alive, stop_pid, wait_until
from parnet import deploy

PY = sys.executable
ROOT = os.geteuid() == 0


def run(op: str, hosts=("here",), env: dict[str, str] | None = None, **kw):
    runner = ["env", *(f"{k}={v}" for k, v in (env or {}).items()), "sh", "-c"]
    kw.setdefault("python", PY)
    kw.setdefault("allow_root", ROOT and op == "up")
    if op != "up":
        kw.pop("allow_root")
    return deploy.run(op, list(hosts), _runner=runner, timeout=60, **kw)


@pytest.fixture()
def port() -> int:
    p = free_port_pair()
    yield p
    # whatever a test left running on this port is stopped by pid
    for s in run("status", cmd_port=p):
        if s.pid:
            stop_pid(s.pid)


def test_up_status_down_idempotent(port: int, tmp_path) -> None:
    remote_home = tmp_path / "remote"
    remote_home.mkdir(mode=0o700)
    env = {"PARNET_HOME": str(remote_home)}
    [s] = run("up", env=env, copy_keys=True, cmd_port=port, data_port=port + 1)
    assert s.state == "started", s
    assert s.pid and pid_alive(s.pid) and s.version == deploy.__version__
    assert "keys copied" in s.note and s.name == f"here:{port}"
    d = remote_home / "srp" / "server"
    assert (d.stat().st_mode & 0o777) == 0o700 and (remote_home / "srp").stat().st_mode & 0o077 == 0
    assert (d / "passwd").stat().st_mode & 0o777 == 0o600
    assert (d / "passwd").read_bytes() == open(
        os.path.join(os.environ["PARNET_HOME"], "srp", "server", "passwd"), "rb"
    ).read()
    [again] = run("up", env=env, copy_keys=True, cmd_port=port, data_port=port + 1)
    assert again.state == "running" and again.pid == s.pid
    assert "keys identical" in again.note and "already running" in again.note
    [st] = run("status", cmd_port=port)
    assert st.state == "running" and st.pid == s.pid
    # different settings on the same port: refused, the running server left alone
    [other] = run("up", use_tls=False, cmd_port=port, data_port=port + 1)
    assert other.state == "failed" and "other settings" in other.reason and pid_alive(s.pid)
    [dn] = run("down", cmd_port=port)
    assert dn.state == "stopped" and dn.pid == s.pid
    wait_until(lambda: not pid_alive(s.pid), 10, "the server to exit")
    [dn2] = run("down", cmd_port=port)
    assert dn2.ok and dn2.state == "not running" and "no server" in dn2.note
    [st2] = run("status", cmd_port=port)
    assert st2.ok and st2.state == "not running"


def test_port_in_use(port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port + 1))
        s.listen()
        [r] = run("up", use_tls=False, cmd_port=port, data_port=port + 1)
    assert r.state == "failed" and r.kind == "port" and f"port {port + 1}" in r.reason, r


@pytest.mark.skipif(not ROOT, reason="only root can see the root refusal")
def test_refuses_root(port: int) -> None:
    [r] = run("up", use_tls=False, cmd_port=port, data_port=port + 1, allow_root=False)
    assert r.state == "failed" and r.kind == "root" and "root" in r.reason, r


def test_python_parnet_and_version_missing(tmp_path, port: int) -> None:
    [r] = run("up", python=str(tmp_path / "no-python"), cmd_port=port)
    assert r.kind == "python" and "Python not found" in r.reason and "no-python" in r.reason, r
    bare = tmp_path / "bare"
    bare.mkdir()  # a Python that has no parnet: the test venv's, with parnet hidden
    (bare / "parnet.py").write_text("raise ImportError('No module named parnet')\n")
    [r] = run("status", env={"PYTHONPATH": str(bare)}, cmd_port=port)
    assert r.kind == "parnet" and "not installed" in r.reason, r
    old = tmp_path / "old" / "parnet"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("__version__ = '0.0.1'\n")
    [r] = run("up", env={"PYTHONPATH": str(old.parent)}, cmd_port=port)
    assert r.kind == "version" and "0.0.1 there" in r.reason and deploy.__version__ in r.reason, r


def test_pure_parts(tmp_path) -> None:
    assert deploy.connect_name("alice@node1") == "node1"
    assert deploy.connect_name("node1", 20000) == "node1:20000"
    assert deploy.connect_name("u@fe80::1", 20000) == "[fe80::1]:20000"
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\nnode1\n\n  alice@node2   # second\n")
    assert deploy.read_hostfile(hf) == ["node1", "alice@node2"]
    assert deploy.ssh_reason("alice@x: Permission denied (publickey).").startswith(
        "ssh: authentication failed"
    )
    assert deploy.ssh_reason("ssh: connect to host x port 22: No route to host").startswith(
        "ssh: unreachable"
    )
    assert deploy.ssh_reason(
        "ssh: Could not resolve hostname nope: Name or service not known"
    ).startswith("ssh: unknown host")
    argv = deploy.ssh_argv("h", "python3 -", ssh_config="cfg", ssh_opts=["BatchMode=no"])
    assert argv[:6] == ["ssh", "-T", "-F", "cfg", "-o", "BatchMode=no"] and argv[-2:] == [
        "h",
        "python3 -",
    ]
    with pytest.raises(ValueError):
        deploy.run("up", [])


def test_cli_bad_input(tmp_path) -> None:
    def cli(*args: str):
        return subprocess.run(
            [PY, "-m", "parnet", *args], capture_output=True, text=True, timeout=60
        )

    r = cli("up")
    assert r.returncode == 2 and "no hosts" in r.stderr
    r = cli("status", "--hostfile", str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing" in r.stderr
    # ssh itself runs, but its connection fails at once (no network traffic): one line, exit 1
    hf = tmp_path / "hosts"
    hf.write_text("nohost-a\nnohost-b\n")
    r = cli("status", "--hostfile", str(hf), "--ssh-opt", "ProxyCommand=false")
    lines = r.stdout.splitlines()
    assert r.returncode == 1 and len(lines) == 2, r
    assert all("failed" in ln and "ssh:" in ln for ln in lines), lines
    r = cli("up", "x", "--copy-keys", "--ssh-opt", "ProxyCommand=false")
    assert r.returncode == 1 and "ssh:" in r.stdout, r
