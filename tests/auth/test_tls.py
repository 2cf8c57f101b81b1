"""TLS 1.3 contexts, the server identity on disk, and the channel binding over a real handshake."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from parnet.auth import keyfile, srp, tls
from parnet.errors import AuthenticationError, ConfigError

Login = Callable[[srp.SrpClient, srp.SrpServer], tuple[bytes, bytes]]


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, Path]:
    return tls.ensure_server_identity(tmp_path / "tls")


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[ssl.SSLSocket | BaseException, ssl.SSLSocket | BaseException]:
    """Handshake over a socketpair; the server side runs in a thread. Returns both ends."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result: dict[str, ssl.SSLSocket | BaseException] = {}

    def serve() -> None:
        try:
            result["server"] = server_ctx.wrap_socket(a, server_side=True)
        except BaseException as exc:  # reported to the test thread
            result["server"] = exc
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client: ssl.SSLSocket | BaseException = client_ctx.wrap_socket(b, server_side=False)
    except (ssl.SSLError, OSError) as exc:
        client = exc
        b.close()
    thread.join(10)
    assert not thread.is_alive()
    return result["server"], client


def test_identity_files_and_modes(identity: tuple[Path, Path]) -> None:
    cert_path, key_path = identity
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key_path.parent).st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == (socket.gethostname() or "localhost")[:64]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3650
    assert cert.issuer == cert.subject


def test_identity_is_reused(identity: tuple[Path, Path]) -> None:
    cert_path, key_path = identity
    before = cert_path.read_bytes(), key_path.read_bytes()
    again = tls.ensure_server_identity(cert_path.parent)
    assert again == identity
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_default_directory(private_home: Path) -> None:
    cert_path, key_path = tls.ensure_server_identity()
    assert cert_path.parent == private_home / "tls" / tls.host_dir_name()
    assert key_path.name == tls.KEY_NAME


def test_identity_per_host_name(private_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SECURITY.md row 30: servers sharing one PARNET_HOME (an NFS home) on machines of
    different names get one identity each."""
    monkeypatch.setattr("socket.gethostname", lambda: "node-a.example")
    a, _ = tls.ensure_server_identity()
    monkeypatch.setattr("socket.gethostname", lambda: "node-b/../x")
    b, _ = tls.ensure_server_identity()
    assert a.parent == private_home / "tls" / "node-a.example"
    assert b.parent == private_home / "tls" / "node-b_.._x"
    assert a.read_bytes() != b.read_bytes()


def test_racing_first_start_ends_with_one_pair(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    barrier = threading.Barrier(6)
    results: list[tuple[Path, Path]] = []

    def start() -> None:
        barrier.wait()
        results.append(tls.ensure_server_identity(directory))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6 and len(set(results)) == 1
    cert_path, key_path = results[0]
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    assert sorted(p.name for p in directory.iterdir()) == sorted([tls.CERT_NAME, tls.KEY_NAME])


def test_stale_certificate_is_replaced(identity: tuple[Path, Path], tmp_path: Path) -> None:
    cert_path, key_path = identity
    other_cert, _ = tls.ensure_server_identity(tmp_path / "other")
    cert_path.write_bytes(other_cert.read_bytes())
    tls.ensure_server_identity(cert_path.parent)
    assert cert_path.read_bytes() != other_cert.read_bytes()
    tls.server_context(cert_path, key_path)  # loads: the pair matches again


@pytest.mark.parametrize("bad_mode", [0o644, 0o640])
def test_unsafe_key_refused(identity: tuple[Path, Path], bad_mode: int) -> None:
    _, key_path = identity
    os.chmod(key_path, bad_mode)
    with pytest.raises(ConfigError, match=f"chmod 600 {key_path}"):
        tls.ensure_server_identity(key_path.parent)


def test_symlinked_key_refused(identity: tuple[Path, Path]) -> None:
    _, key_path = identity
    real = key_path.with_name("elsewhere.key")
    key_path.rename(real)
    key_path.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        tls.ensure_server_identity(key_path.parent)


def test_context_settings(identity: tuple[Path, Path]) -> None:
    server = tls.server_context(*identity)
    client = tls.client_context()
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.options & ssl.OP_NO_TICKET
        assert ctx.verify_mode == ssl.CERT_NONE
    assert server.num_tickets == 0
    assert client.check_hostname is False


def test_handshake_and_binding(identity: tuple[Path, Path]) -> None:
    cert_path, key_path = identity
    server, client = _handshake(tls.server_context(cert_path, key_path), tls.client_context())
    assert isinstance(server, ssl.SSLSocket) and isinstance(client, ssl.SSLSocket)
    try:
        assert client.version() == "TLSv1.3" and server.version() == "TLSv1.3"
        peer = client.getpeercert(binary_form=True)
        assert peer is not None
        own = tls.load_cert_der(cert_path)
        assert tls.cert_binding(peer) == tls.cert_binding(own)
        assert len(tls.cert_binding(own)) == 32
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        assert client.session is None or not client.session_reused
    finally:
        server.close()
        client.close()


def test_tls12_client_refused(identity: tuple[Path, Path]) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = _handshake(tls.server_context(*identity), old)
    assert isinstance(server, ssl.SSLError)
    assert isinstance(client, ssl.SSLError | OSError)


def test_srp_over_the_binding_and_a_relay(
    identity: tuple[Path, Path], tmp_path: Path, alice_auth: keyfile.ServerAuth, login: Login
) -> None:
    """Each side uses its own view of cb: honest peers agree, a relay's certificate does not."""
    cert_path, key_path = identity
    server_sock, client_sock = _handshake(
        tls.server_context(cert_path, key_path), tls.client_context()
    )
    assert isinstance(server_sock, ssl.SSLSocket) and isinstance(client_sock, ssl.SSLSocket)
    try:
        client_cb = tls.cert_binding(client_sock.getpeercert(binary_form=True) or b"")
    finally:
        server_sock.close()
        client_sock.close()
    server_cb = tls.cert_binding(tls.load_cert_der(cert_path))
    relay_cert, _ = tls.ensure_server_identity(tmp_path / "relay")
    relay_cb = tls.cert_binding(tls.load_cert_der(relay_cert))

    def attempt(cb_seen_by_client: bytes) -> tuple[bytes, bytes]:
        client = srp.SrpClient(
            "alice", "correct horse battery", cb=cb_seen_by_client, role="cmd", options=b""
        )
        server = srp.SrpServer(
            alice_auth.lookup,
            fake_secret=alice_auth.fake_secret,
            cb=server_cb,
            role="cmd",
            options=b"",
        )
        return login(client, server)

    keys = attempt(client_cb)
    assert keys[0] == keys[1]
    with pytest.raises(AuthenticationError):
        attempt(relay_cb)


def test_load_cert_der_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        tls.load_cert_der(tmp_path / "missing.crt")
    bad = tmp_path / "bad.crt"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError):
        tls.load_cert_der(bad)
