"""Connection set-up: plaintext preamble, TLS, and the authentication exchanges.

Every connection to a daemon starts with a fixed 32-byte plaintext preamble::

    magic "PARNET" | version u16 | kind u8 (1 cmd, 2 data) | flags u8 (bit 0: TLS)
    | network id (16 bytes) | from node u16 | to node u16 | 2 bytes padding

and the daemon answers with a reply (``REPLY`` + a short reason) before anything else, so a
version or TLS mismatch is a clear ``ConnectError`` at once, never a hang. The preamble has a
fixed size so the daemon can read exactly it and hand the socket on untouched.

Then, with TLS: a TLS 1.3 handshake (the worker is the TLS server) and, on the command link,
the SRP-6a exchange of SECURITY.md bound to the server certificate; on a data link, the
pairwise-key tag exchange. Without TLS nothing more is exchanged. All of it runs in
``MAX_PREAUTH_FRAME``-sized raw frames (``messages.AUTH``): nothing is unpickled before it ends.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import socket
import ssl
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..constants import MAGIC, PROTOCOL_VERSION
from ..errors import AuthenticationError, ConnectError, ConnectionClosed, ProtocolError
from ..wire import messages as msg
from .link import Link

if TYPE_CHECKING:
    from ..auth.srp import VerifierEntry

PREAMBLE = struct.Struct("!6sHBB16sHH2x")
REPLY = struct.Struct("!6sHBHH")  # magic, version, status, data port, reason length
KIND_CMD = 1
KIND_DATA = 2
FLAG_TLS = 1
STATUS_OK = 0
STATUS_ERROR = 1
MAX_REASON = 512
GENERIC_REFUSAL = "refused"
#: The daemon's answer when it sheds load before authentication; clients retry it.
BUSY = "server busy, try again later"


def options_bytes(use_tls: bool) -> bytes:
    """The protocol version and options that enter the SRP transcript."""
    return f"parnet/{PROTOCOL_VERSION};tls={int(use_tls)}".encode()


@dataclass(frozen=True, slots=True)
class Preamble:
    """A parsed preamble."""

    version: int
    kind: int
    use_tls: bool
    netid: bytes
    src: int
    dst: int

    def pack(self) -> bytes:
        """The 32 bytes on the wire."""
        flags = FLAG_TLS if self.use_tls else 0
        return PREAMBLE.pack(MAGIC, self.version, self.kind, flags, self.netid, self.src, self.dst)


def parse_preamble(data: bytes) -> Preamble:
    """Parses 32 preamble bytes.

    Raises:
        ProtocolError: not a parnet preamble (wrong magic or kind).
    """
    magic, version, kind, flags, netid, src, dst = PREAMBLE.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("not a parnet connection (bad magic)")
    if kind not in (KIND_CMD, KIND_DATA):
        raise ProtocolError(f"bad connection kind {kind}")
    return Preamble(version, kind, bool(flags & FLAG_TLS), netid, src, dst)


def pack_reply(ok: bool, data_port: int = 0, reason: str = "") -> bytes:
    """The daemon's answer to a preamble."""
    r = reason.encode()[:MAX_REASON]
    return (
        REPLY.pack(MAGIC, PROTOCOL_VERSION, STATUS_OK if ok else STATUS_ERROR, data_port, len(r))
        + r
    )


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out waiting for {what}")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed(f"connection closed while waiting for {what}")
        buf += chunk
    return bytes(buf)


def open_channel(
    host: str,
    port: int,
    pre: Preamble,
    *,
    deadline: float,
    ctx: ssl.SSLContext | None,
    source: str | None = None,
) -> tuple[socket.socket, int]:
    """Connects to a daemon, sends the preamble, checks the reply, and does TLS if asked.

    ``source``: the local address to connect from (a server bound to one address uses it).
    A "server busy" answer is retried after a short random pause until ``deadline``; a note
    in an OK answer (a login delayed after failed attempts) becomes a warning.

    Returns:
        The connected socket (an ``SSLSocket`` with TLS) and the daemon's data port.

    Raises:
        ConnectError: refused, unreachable, wrong version, TLS mismatch, or timed out; the
            message names ``host:port``.
    """
    while True:
        try:
            return _open_once(host, port, pre, deadline=deadline, ctx=ctx, source=source)
        except ConnectError as e:
            if not str(e).endswith(BUSY) or deadline - time.monotonic() < 0.3:
                raise
        time.sleep(random.uniform(0.05, 0.2))


def _text(raw: bytes) -> str:
    """A peer's text, safe to show: printable ASCII, anything else escaped."""
    return "".join(c if " " <= c <= "~" else repr(c)[1:-1] for c in raw.decode(errors="replace"))


def _open_once(
    host: str,
    port: int,
    pre: Preamble,
    *,
    deadline: float,
    ctx: ssl.SSLContext | None,
    source: str | None = None,
) -> tuple[socket.socket, int]:
    where = f"{host}:{port}"
    sock = None
    try:
        left = max(0.001, deadline - time.monotonic())
        sock = socket.create_connection(
            (host, port), timeout=left, source_address=(source, 0) if source else None
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(pre.pack())
        head = _recv_exact(sock, REPLY.size, deadline, "the server's reply")
        magic, version, status, data_port, rlen = REPLY.unpack(head)
        if magic != MAGIC:
            raise ConnectError(f"{where}: not a parnet server (bad reply)")
        reason = _text(_recv_exact(sock, min(rlen, MAX_REASON), deadline, "the server's reply"))
        if status != STATUS_OK:
            raise ConnectError(f"{where}: {reason}")
        if reason:
            warnings.warn(f"parnet: {where}: {reason}", stacklevel=4)
        if version != PROTOCOL_VERSION:
            raise ConnectError(
                f"{where}: protocol version mismatch (server {version}, client {PROTOCOL_VERSION})"
            )
        if ctx is not None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock = ctx.wrap_socket(sock, server_side=False, do_handshake_on_connect=True)
        return sock, data_port
    except ConnectError:
        if sock is not None:
            sock.close()
        raise
    except (OSError, TimeoutError, ssl.SSLError) as e:
        if sock is not None:
            sock.close()
        reason = (
            "timed out" if isinstance(e, TimeoutError | socket.timeout) else (e.strerror or str(e))
        )
        raise ConnectError(f"{where}: {reason}") from e


def _fail_frame(link: Link, reason: str) -> None:
    with contextlib.suppress(OSError):
        link.send_frame(msg.AUTH_FAIL, reason.encode()[:200])


def _expect_auth(link: Link, deadline: float, *, server_side: bool = False) -> bytes:
    f = link.recv_frame(deadline)
    if f.code == msg.AUTH_FAIL:
        if server_side:  # never keep a peer's text: it would reach the server log unchecked
            raise AuthenticationError("the peer abandoned authentication")
        text = bytes(f.body[:200]).decode(errors="replace")
        raise AuthenticationError(repr(text)[1:-1] if text else "authentication failed")
    if f.code != msg.AUTH:
        raise ProtocolError(f"unexpected message {f.code} during authentication")
    return bytes(f.body)


# -- command link: SRP -----------------------------------------------------------------
def srp_client(
    link: Link, username: str, password: str, cb: bytes, use_tls: bool, deadline: float
) -> bytes:
    """Runs the client side of the SRP login; returns the session key.

    Raises:
        AuthenticationError: wrong password, unknown user, or the server's proof failed
            (a man in the middle); nothing more is sent then.
    """
    from ..auth.srp import SrpClient

    c = SrpClient(username, password, cb=cb, role="cmd", options=options_bytes(use_tls))
    link.send_frame(msg.AUTH, c.hello())
    link.send_frame(msg.AUTH, c.respond(_expect_auth(link, deadline)))
    key = c.verify(_expect_auth(link, deadline))
    link.mark_authenticated()
    return key


def srp_server(
    link: Link,
    lookup: Callable[[str], VerifierEntry | None],
    fake_secret: bytes,
    cb: bytes,
    use_tls: bool,
    deadline: float,
    on_success: Callable[[], None] | None = None,
) -> str:
    """Runs the server side of the SRP login; returns the authenticated user name.

    ``on_success()`` runs after the client's proof checked out and before the server's proof
    is sent (so whatever it records is in place before the client can act on the login).

    Raises:
        AuthenticationError: the client's proof failed (after telling it, generically).
    """
    from ..auth.srp import SrpServer

    s = SrpServer(
        lookup, fake_secret=fake_secret, cb=cb, role="cmd", options=options_bytes(use_tls)
    )
    link.send_frame(msg.AUTH, s.challenge(_expect_auth(link, deadline, server_side=True)))
    try:
        m2 = s.verify(_expect_auth(link, deadline, server_side=True))
    except AuthenticationError:
        _fail_frame(link, "authentication failed")
        raise
    if on_success is not None:
        on_success()
    link.send_frame(msg.AUTH, m2)
    link.mark_authenticated()
    return s.username


# -- data links: pairwise-key tags -----------------------------------------------------
def tags_initiator(
    link: Link, key: bytes, netid: bytes, i: int, j: int, cb: bytes, deadline: float
) -> None:
    """Data link from node ``i`` (this side, the TLS client) to ``j``: prove, then check."""
    from ..auth import pairkeys

    n_resp = _expect_auth(link, deadline)
    if len(n_resp) != pairkeys.NONCE_SIZE:
        raise ProtocolError("bad nonce")
    n_init = secrets.token_bytes(pairkeys.NONCE_SIZE)
    t_init = pairkeys.init_tag(key, netid, i, j, n_init, n_resp, cb)
    link.send_frame(msg.AUTH, n_init + t_init)
    t_resp = _expect_auth(link, deadline)
    if not secrets.compare_digest(
        t_resp, pairkeys.resp_tag(key, netid, i, j, n_init, n_resp, cb, t_init)
    ):
        raise AuthenticationError("data link: the peer's proof failed")
    link.mark_authenticated()


def tags_responder(
    link: Link, key: bytes | None, netid: bytes, i: int, j: int, cb: bytes, deadline: float
) -> None:
    """Data link from node ``i`` to ``j`` (this side, the TLS server): challenge, check, answer.

    ``key`` None (no such pair in this network) fails the same way as a wrong tag.
    """
    from ..auth import pairkeys

    n_resp = secrets.token_bytes(pairkeys.NONCE_SIZE)
    link.send_frame(msg.AUTH, n_resp)
    body = _expect_auth(link, deadline, server_side=True)
    n_init, t_init = body[: pairkeys.NONCE_SIZE], body[pairkeys.NONCE_SIZE :]
    want = pairkeys.init_tag(key or bytes(32), netid, i, j, n_init, n_resp, cb)
    if (
        key is None
        or len(n_init) != pairkeys.NONCE_SIZE
        or not secrets.compare_digest(t_init, want)
    ):
        _fail_frame(link, GENERIC_REFUSAL)
        raise AuthenticationError(GENERIC_REFUSAL)
    link.send_frame(msg.AUTH, pairkeys.resp_tag(key, netid, i, j, n_init, n_resp, cb, t_init))
    link.mark_authenticated()
