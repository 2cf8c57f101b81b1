"""The command line: `parnet keygen`, `python -m parnet`, `parnet demo`; pconnect(user=...)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import parnet
from helpers import MODES, PASSWORD, USER
from parnet import AuthenticationError, rfeval, sclose

PY = sys.executable


def run(args: list[str], env: dict[str, str] | None = None, stdin: str = "", timeout: float = 120):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [PY, "-m", "parnet", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
    )


def test_help_and_unknown_command() -> None:
    r = run(["--help"])
    assert r.returncode == 0 and "server" in r.stdout and "keygen" in r.stdout
    r = run(["bogus"])
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_keygen_from_stdin(tmp_path) -> None:
    home = tmp_path / "home"
    r = run(["keygen", "alice"], env={"PARNET_HOME": str(home)}, stdin="a-long-enough-password\n")
    assert r.returncode == 0, r.stderr
    passwd = home / "srp" / "server" / "passwd"
    client = home / "srp" / "client" / "user_passwd"
    assert passwd.read_text().startswith("alice:")
    assert client.read_text().strip() == "alice:a-long-enough-password"
    assert (passwd.stat().st_mode & 0o777) == 0o600 and (client.stat().st_mode & 0o777) == 0o600
    r = run(["keygen", "bob", "--no-client-file", "--dir", str(tmp_path / "d")], stdin="\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "server" / "passwd").read_text().startswith("bob:")
    assert not (tmp_path / "d" / "client" / "user_passwd").exists()


@pytest.mark.skipif(True not in MODES, reason="TLS layer not available")
def test_pconnect_user_prompts_for_password(monkeypatch) -> None:
    from helpers import Cluster

    cl = Cluster(1, True, first_ip=50)
    try:
        asked = []

        def fake_getpass(prompt: str = "") -> str:
            asked.append(prompt)
            return PASSWORD

        monkeypatch.setattr("parnet.client.api.getpass.getpass", fake_getpass)
        c = cl.connect(user=USER, password_file="/nonexistent/file")
        try:
            assert rfeval(lambda: 5, connection=c[1]) == 5
        finally:
            sclose(c)
        assert asked and USER in asked[0]
        monkeypatch.setattr(
            "parnet.client.api.getpass.getpass", lambda prompt="": "wrong password!"
        )
        with pytest.raises(AuthenticationError):
            cl.connect(user=USER)
    finally:
        cl.stop()


def test_api_names_present() -> None:
    import inspect

    for name in parnet.__all__:
        obj = getattr(parnet, name)
        assert inspect.isclass(obj) or inspect.isfunction(obj), name
        assert obj.__name__ == name, f"parnet.{name} is {obj!r}"


def test_demo_end_to_end(tmp_path) -> None:
    """`parnet demo` starts TLS servers, runs the doc examples and a real map, stops them."""
    r = run(
        ["demo", "--calls", "4", "--port", "31502"],
        env={"XDG_RUNTIME_DIR": str(tmp_path)},
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "'some data'" in r.stdout
    assert "results in order and correct" in r.stdout
    assert "started 2 servers (TLS 1.3 + SRP)" in r.stdout
    assert "netcellfun" in r.stderr  # the progress bar
