"""Interoperability with GnuTLS ``srptool`` (Debian package gnutls-bin); skipped without it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from parnet.auth import keyfile, keygen, srp
from parnet.errors import AuthenticationError

SRPTOOL = shutil.which("srptool")
# skipped without srptool on a developer's machine; in CI (CI=true) a missing srptool fails
pytestmark = pytest.mark.skipif(
    SRPTOOL is None and not os.environ.get("CI"), reason="srptool (gnutls-bin) not installed"
)

Login = Callable[[srp.SrpClient, srp.SrpServer], tuple[bytes, bytes]]


def _srptool(*args: str, password: str | None = None) -> subprocess.CompletedProcess[bytes]:
    assert SRPTOOL is not None
    return subprocess.run(
        [SRPTOOL, *args],
        input=None if password is None else password.encode() + b"\n",
        capture_output=True,
        timeout=30,
        check=False,
    )


def _add_user(directory: Path, user: str, password: str, index: int = 3) -> None:
    conf = directory / "passwd.conf"
    if not conf.exists():
        assert _srptool("--create-conf", str(conf)).returncode == 0
    result = _srptool(
        "--passwd",
        str(directory / "passwd"),
        "--passwd-conf",
        str(conf),
        "--username",
        user,
        "--index",
        str(index),
        password=password,
    )
    assert result.returncode == 0, result.stderr


def _verify(directory: Path, user: str, password: str) -> bool:
    result = _srptool(
        "--passwd",
        str(directory / "passwd"),
        "--passwd-conf",
        str(directory / "passwd.conf"),
        "--username",
        user,
        "--verify",
        password=password,
    )
    return result.returncode == 0 and b"Password verified" in result.stdout + result.stderr


def _login(auth: keyfile.ServerAuth, user: str, password: str, login: Login) -> None:
    client = srp.SrpClient(user, password, cb=b"cb", role="cmd", options=b"o")
    server = srp.SrpServer(
        auth.lookup, fake_secret=auth.fake_secret, cb=b"cb", role="cmd", options=b"o"
    )
    login(client, server)


def test_create_conf_is_byte_identical(tmp_path: Path) -> None:
    conf = tmp_path / "tpasswd.conf"
    assert _srptool("--create-conf", str(conf)).returncode == 0
    assert conf.read_text() == keyfile.passwd_conf_text()


@pytest.mark.parametrize("index", [2, 3])
def test_srptool_files_work_with_parnet(tmp_path: Path, index: int, login: Login) -> None:
    d = tmp_path / "server"
    d.mkdir(mode=0o700)
    _add_user(d, "alice", "gnutls made this", index)
    _add_user(d, "carol", "p\u00e4ssw\u00f6rd", 3)
    auth = keyfile.load_server_auth(d / "passwd")
    assert auth.lookup("alice").index == index
    _login(auth, "alice", "gnutls made this", login)
    _login(auth, "carol", "pa\u0308sswo\u0308rd", login)  # NFD: normalized like GnuTLS does
    with pytest.raises(AuthenticationError):
        _login(auth, "alice", "wrong", login)


def test_parnet_files_pass_srptool_verify(srp_dir: Path) -> None:
    keygen.parallel_generate_srp_data("alice", password="written by parnet", directory=srp_dir)
    keygen.parallel_generate_srp_data(
        "dave", password="d\u00e9j\u00e0 vu password", directory=srp_dir
    )
    server = srp_dir / "server"
    assert _verify(server, "alice", "written by parnet")
    assert _verify(server, "dave", "d\u00e9j\u00e0 vu password")
    assert not _verify(server, "alice", "not it")


def test_mixed_file_both_tools_keep_each_others_lines(srp_dir: Path, login: Login) -> None:
    server = srp_dir / "server"
    server.mkdir(mode=0o700)
    _add_user(server, "bob", "bob via srptool")
    keygen.parallel_generate_srp_data("alice", password="alice via parnet", directory=srp_dir)
    _add_user(server, "erin", "erin via srptool")
    keygen.parallel_generate_srp_data("bob", password="bob again, parnet", directory=srp_dir)
    assert _verify(server, "alice", "alice via parnet")
    assert _verify(server, "bob", "bob again, parnet")
    assert _verify(server, "erin", "erin via srptool")
    auth = keyfile.load_server_auth(server / "passwd")
    assert auth.usernames == ["alice", "bob", "erin"]
    _login(auth, "erin", "erin via srptool", login)
    _login(auth, "bob", "bob again, parnet", login)
