"""TLS 1.3 contexts and each server's own self-signed identity.

Theory of operation (SECURITY.md decisions 2 and 3). Python's ``ssl`` has no TLS-SRP, so parnet
runs plain TLS 1.3 for encryption and authenticates with SRP inside it (``auth.srp``). The TLS
certificate is not checked against any CA: the client accepts whatever certificate the server
presents (``CERT_NONE``) and both sides put ``cert_binding(cert)`` (RFC 5929
``tls-server-end-point``: SHA-256 of the certificate's DER) into the SRP transcript. A relay that
terminates TLS with its own certificate therefore makes the SRP proofs fail. The client takes
the certificate from ``getpeercert(binary_form=True)`` (available even with ``CERT_NONE``), the
server hashes its own certificate file.

Each server makes its own EC P-256 key and a 10-year self-signed certificate on first start
(``ensure_server_identity``) under ``$PARNET_HOME/tls/<host name>`` (0700): servers sharing
one home over NFS still have one identity each, and the client pins each server's certificate
on first use (``known_servers``). The key is written to an
``O_EXCL`` temporary file and published with ``os.link``, which fails if the key already exists,
so two processes racing on first start end with the same key and a certificate that matches it.
TLS 1.2 and older are refused, session tickets are off and sessions are never resumed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from parnet.constants import parnet_home
from parnet.errors import ConfigError
from parnet.transport.files import (
    make_private_dir,
    publish_file,
    read_secret_file,
    write_secret_file,
)

__all__ = [
    "CERT_NAME",
    "KEY_NAME",
    "cert_binding",
    "client_context",
    "ensure_server_identity",
    "load_cert_der",
    "server_context",
]

CERT_NAME = "server.crt"
KEY_NAME = "server.key"
_VALID_DAYS = 3650


def _new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(key_path: Path) -> ec.EllipticCurvePrivateKey:
    data = read_secret_file(key_path, "TLS server key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{key_path}: not a readable unencrypted PEM private key ({exc}); "
            f"remove it and its certificate to make a new pair"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an EC private key; remove it to make a new one")
    return key


def _new_cert_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    host = socket.gethostname() or "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    with contextlib.suppress(ValueError):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def _cert_matches(cert_path: Path, key: ec.EllipticCurvePrivateKey) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def host_dir_name() -> str:
    """This machine's host name, safe as a directory name."""
    return (
        re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname() or "localhost").lstrip(".")
        or "localhost"
    )


def ensure_server_identity(
    directory: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """Return this server's certificate and key, creating them on first use.

    Args:
        directory: where they live; default ``<parnet_home()>/tls/<host name>`` (made 0700):
            servers that share ``$PARNET_HOME`` (an NFS home) still have one identity each.

    Returns:
        ``(cert_path, key_path)``: a self-signed EC P-256 certificate (CN = host name, valid
        10 years) and its private key (0600).

    Raises:
        ConfigError: the key file is unsafe (symlink, not ours, readable by others, ...) or
            unreadable; the message says how to fix it.
    """
    base = (
        Path(directory) if directory is not None else Path(parnet_home()) / "tls" / host_dir_name()
    )
    make_private_dir(base)
    key_path = base / KEY_NAME
    cert_path = base / CERT_NAME
    if not os.path.lexists(key_path):
        publish_file(key_path, _new_key_pem(), 0o600)  # a lost race keeps the winner's key
    key = _load_key(key_path)
    if not _cert_matches(cert_path, key):
        if os.path.lexists(cert_path) and not os.path.islink(cert_path):
            # Stale (from an older key) or corrupt: replace it.
            write_secret_file(cert_path, _new_cert_pem(key), 0o644)
        elif os.path.islink(cert_path):
            raise ConfigError(f"{cert_path}: the certificate is a symbolic link; remove it")
        elif not publish_file(cert_path, _new_cert_pem(key), 0o644) and not _cert_matches(
            cert_path, key
        ):
            raise ConfigError(f"{cert_path}: does not match {key_path}; remove both")
    return cert_path, key_path


def server_context(
    cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A TLS 1.3-only server context: no tickets, no client certificates.

    Args:
        cert_path: the PEM certificate (``ensure_server_identity``).
        key_path: its PEM private key.

    Returns:
        The context; wrap accepted sockets with ``server_side=True``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
    return ctx


def client_context() -> ssl.SSLContext:
    """A TLS 1.3-only client context that accepts any server certificate.

    The server is authenticated by SRP bound to the certificate (``cert_binding``), not by a
    CA; never reuse sessions (pass no ``session=``).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def cert_binding(cert_der: bytes) -> bytes:
    """RFC 5929 ``tls-server-end-point`` channel binding: SHA-256 of the certificate DER."""
    return hashlib.sha256(bytes(cert_der)).digest()


def peer_binding(sock: socket.socket) -> bytes:
    """``cert_binding`` of the certificate the peer of the TLS socket ``sock`` presented.

    Raises:
        ConfigError: ``sock`` is not a TLS socket, or its peer presented no certificate.
    """
    der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    if der is None:
        raise ConfigError("the peer presented no TLS certificate")
    return cert_binding(der)


def load_cert_der(cert_path: str | os.PathLike[str]) -> bytes:
    """The DER bytes of a PEM (or DER) certificate file.

    Raises:
        ConfigError: missing or not a certificate.
    """
    path = Path(cert_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the TLS certificate: {exc}") from None
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a certificate ({exc})") from None
    return cert.public_bytes(serialization.Encoding.DER)
