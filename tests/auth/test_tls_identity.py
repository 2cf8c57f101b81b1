"""The server's TLS identity refuses what it cannot trust or use, naming the file and the fix:
an unreadable or non-EC key, a certificate that is a symbolic link; certificates load from PEM
or DER; a peer without a certificate has no channel binding."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from parnet.auth import tls
from parnet.errors import ConfigError
from parnet.transport import files


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, Path]:
    return tls.ensure_server_identity(tmp_path / "tls")


def test_unreadable_key_is_refused_with_the_fix(identity: tuple[Path, Path]) -> None:
    cert_path, key_path = identity
    files.write_secret_file(key_path, b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(
        ConfigError, match=f"{key_path}: not a readable unencrypted PEM private key"
    ):
        tls.ensure_server_identity(key_path.parent)
    assert cert_path.exists()  # nothing replaced behind the operator's back


def test_key_of_another_kind_is_refused(identity: tuple[Path, Path]) -> None:
    _, key_path = identity
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files.write_secret_file(key_path, pem)
    with pytest.raises(ConfigError, match=f"{key_path}: not an EC private key; remove it"):
        tls.ensure_server_identity(key_path.parent)


def test_symlinked_certificate_is_refused(identity: tuple[Path, Path], tmp_path: Path) -> None:
    cert_path, key_path = identity
    other_cert, _ = tls.ensure_server_identity(tmp_path / "other")
    cert_path.unlink()
    cert_path.symlink_to(other_cert)  # someone else's certificate, through a link
    with pytest.raises(ConfigError, match=f"{cert_path}: the certificate is a symbolic link"):
        tls.ensure_server_identity(key_path.parent)
    assert cert_path.is_symlink()  # left for the operator to remove


def test_certificate_loads_from_pem_or_der(identity: tuple[Path, Path], tmp_path: Path) -> None:
    cert_path, _ = identity
    der = tls.load_cert_der(cert_path)
    assert der == x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    der_file = tmp_path / "server.der"
    der_file.write_bytes(der)
    assert tls.load_cert_der(der_file) == der
    der_file.write_bytes(der[:40])  # not PEM, and truncated DER
    with pytest.raises(ConfigError, match=f"{der_file}: not a certificate"):
        tls.load_cert_der(der_file)


def test_plain_socket_has_no_binding() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(ConfigError, match="the peer presented no TLS certificate"):
            tls.peer_binding(a)
    finally:
        a.close()
        b.close()
