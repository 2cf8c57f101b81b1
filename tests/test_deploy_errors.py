"""deploy.py's failure reports: how each kind of host failure is told (ssh, Python, a script that
died, a host that never answers), the lines printed, and the errors `up/down/status` raise.

The successful paths run real servers in test_deploy.py; here nothing is started."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from parnet import deploy
from parnet.errors import ParnetError

FAILING_SSH = ["ProxyCommand=false"]  # ssh itself runs, its connection fails at once


def parse(rc: int, stdout: str = "", stderr: str = "") -> deploy.HostStatus:
    return deploy._parse("alice@node1", "node1", "python3", rc, stdout, stderr)


def test_script_answer_is_read_from_its_marked_line() -> None:
    out = 'noise\nPARNET-DEPLOY {"state": "running", "pid": 42, "version": "9.9"}\n'
    s = parse(0, out)
    assert (s.host, s.name, s.state, s.pid, s.version, s.ok) == (
        "alice@node1",
        "node1",
        "running",
        42,
        "9.9",
        True,
    )


def test_each_failure_gets_its_kind_and_reason() -> None:
    s = parse(255, stderr="alice@node1: Permission denied (publickey).")
    assert (s.state, s.kind) == ("failed", "ssh") and "authentication failed" in s.reason
    s = parse(127, stderr="sh: 1: python3: not found")
    assert s.kind == "python" and "Python not found there: python3" in s.reason
    s = parse(1, stderr="Traceback (most recent call last):\nMemoryError: boom")
    assert s.kind == "other" and s.reason == "python3 failed: MemoryError: boom"
    # a garbled answer is no answer: the exit status speaks
    s = parse(3, stdout="PARNET-DEPLOY {not json")
    assert s.kind == "other" and s.reason == "python3 failed: exit status 3"


@pytest.mark.parametrize(
    ("stderr", "start"),
    [
        ("Host key verification failed.", "ssh: host key not trusted"),
        (
            "Warning: Permanently added 'x' (ED25519) to the list of known hosts.\n"
            "Connection closed by 10.0.0.1 port 22",
            "ssh: unreachable (Connection closed by 10.0.0.1 port 22)",
        ),
        ("kex_exchange_identification: read: weird", "ssh: kex_exchange_identification"),
        ("", "ssh: ssh failed"),
    ],
)
def test_ssh_reason(stderr: str, start: str) -> None:
    assert deploy.ssh_reason(stderr).startswith(start)


def test_host_lines() -> None:
    up = deploy.HostStatus("h1", "h1", "started", 123, "1.0", note="keys copied")
    assert up.line() == "h1  started      pid 123     parnet 1.0 (keys copied)"
    quiet = deploy.HostStatus("h2", "h2", "not running", note="no server was running")
    assert quiet.line(4) == "h2    not running  -           no server was running"
    bad = deploy.HostStatus("h3", "h3", "failed", kind="ssh", reason="ssh: unreachable (x)")
    assert not bad.ok and bad.line().endswith("-           ssh: unreachable (x)")
    err = deploy.DeployError([up, bad, quiet])
    assert err.statuses == [up, bad, quiet]
    assert str(err) == "1 of 3 hosts failed:\n" + bad.line()


def test_remote_python_keeps_the_home_tilde_unquoted() -> None:
    assert deploy._remote_python("~/my env/bin/python") == "~/'my env/bin/python'"
    assert deploy._remote_python("/opt/py 3/python") == "'/opt/py 3/python'"


def test_host_that_never_answers_times_out() -> None:
    [s] = deploy.run("status", ["slow"], timeout=0.5, _runner=["sh", "-c", "exec sleep 60"])
    assert (s.state, s.kind, s.reason) == ("failed", "timeout", "no answer within 0.5 s")


def test_ssh_that_cannot_run(tmp_path: Path) -> None:
    [s] = deploy.run("down", ["h"], _runner=[str(tmp_path / "no-ssh")])
    assert s.kind == "ssh" and s.reason.startswith("cannot run ssh:") and "no-ssh" in s.reason


def test_unknown_operation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown operation 'restart'"):
        deploy.run("restart", ["h"])


@pytest.mark.parametrize("op", ["up", "down", "status"])
def test_calls_raise_deploy_error_with_every_status(op: str) -> None:
    with pytest.raises(deploy.DeployError) as info:
        getattr(deploy, op)(["nohost-a", "nohost-b"], ssh_opts=FAILING_SSH, timeout=30)
    statuses = info.value.statuses
    assert [s.host for s in statuses] == ["nohost-a", "nohost-b"]
    assert all(s.kind == "ssh" for s in statuses), statuses
    assert str(info.value).startswith("2 of 2 hosts failed:")


def test_copy_keys_without_local_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("PARNET_HOME", str(home))
    with pytest.raises(ParnetError, match="no server key files in .*parnet keygen"):
        deploy.up(["h"], copy_keys=True, ssh_opts=FAILING_SSH)
    server = home / "srp" / "server"
    server.mkdir(parents=True)
    (server / "conf").write_text("x")
    with pytest.raises(ParnetError, match=f"{server}/passwd is missing"):
        deploy.up(["h"], copy_keys=True, ssh_opts=FAILING_SSH)
    # the command says so in one line, exit status 2, before contacting any host
    assert deploy.main("up", ["h", "--copy-keys", "--ssh-opt", FAILING_SSH[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parnet up: --copy-keys:") and "passwd is missing" in err
    assert os.listdir(server) == ["conf"]
