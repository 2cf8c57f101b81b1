"""Shared fixtures for the authentication tests: a private PARNET_HOME and login helpers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from parnet.auth import keyfile, keygen, srp

CB = b"\x11" * 32
OPTIONS = b"parnet/1 test"


@pytest.fixture
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, private PARNET_HOME (never the real ~/.config/parnet)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("PARNET_HOME", str(home))
    return home


@pytest.fixture
def srp_dir(tmp_path: Path) -> Path:
    """A 0700 directory for SRP data (keygen writes server/ and client/ under it)."""
    d = tmp_path / "srp"
    d.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o700)
    return d


@pytest.fixture
def alice_auth(srp_dir: Path) -> keyfile.ServerAuth:
    """Server data with users alice (password 'correct horse battery') and bob."""
    keygen.parallel_generate_srp_data("alice", password="correct horse battery", directory=srp_dir)
    keygen.parallel_generate_srp_data("bob", password="bob's long password", directory=srp_dir)
    return keyfile.load_server_auth(srp_dir / "server" / "passwd")


def _pair(
    auth: keyfile.ServerAuth,
    username: str,
    password: str,
    *,
    client_cb: bytes = CB,
    server_cb: bytes = CB,
    client_role: str = "cmd",
    server_role: str = "cmd",
    client_options: bytes = OPTIONS,
    server_options: bytes = OPTIONS,
) -> tuple[srp.SrpClient, srp.SrpServer]:
    client = srp.SrpClient(
        username, password, cb=client_cb, role=client_role, options=client_options
    )
    server = srp.SrpServer(
        auth.lookup,
        fake_secret=auth.fake_secret,
        cb=server_cb,
        role=server_role,
        options=server_options,
    )
    return client, server


@pytest.fixture
def make_pair() -> Callable[..., tuple[srp.SrpClient, srp.SrpServer]]:
    """``make_pair(auth, user, password, **overrides) -> (SrpClient, SrpServer)``."""
    return _pair


def _login(client: srp.SrpClient, server: srp.SrpServer) -> tuple[bytes, bytes]:
    """Run the four messages in memory; return (client Ksess, server Ksess)."""
    challenge = server.challenge(client.hello())
    proof = client.respond(challenge)
    server_proof = server.verify(proof)
    return client.verify(server_proof), server.session_key


@pytest.fixture
def login() -> Callable[[srp.SrpClient, srp.SrpServer], tuple[bytes, bytes]]:
    """``login(client, server) -> (client_key, server_key)``; raises on failure."""
    return _login
