"""A hostile client's toolbox for ``test_attacks.py``.

Raw connections from a chosen loopback source address, hand-made preambles, frames and SRP
messages, a canary pickle that leaves a mark if anything ever unpickles it, and a relay that
terminates TLS with its own certificate (a man in the middle). Nothing here goes through
``pconnect``: every byte is the test's choice.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from parnet.auth import srp
from parnet.auth.tls import cert_binding, client_context, server_context
from parnet.constants import MAGIC, PROTOCOL_VERSION
from parnet.transport import handshake
from parnet.wire import messages as msg
from parnet.wire.framing import HEADER, Frame, FrameDecoder, frame_bytes

#: SRP message kinds (``auth.srp`` wire encoding: version byte, kind byte, length-prefixed fields).
SRP_HELLO, SRP_CHALLENGE, SRP_PROOF, SRP_SERVER_PROOF = 1, 2, 3, 4


# -- raw connections -------------------------------------------------------------------
def connect(host: str, port: int, src: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``host:port``, from the loopback address ``src`` if given."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if src is not None:
            s.bind((src, 0))
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def preamble(
    kind: int = handshake.KIND_CMD,
    tls: bool = True,
    netid: bytes | None = None,
    src: int = 0,
    dst: int = 1,
    version: int = PROTOCOL_VERSION,
    magic: bytes = MAGIC,
) -> bytes:
    """32 preamble bytes, any field forged at will."""
    flags = handshake.FLAG_TLS if tls else 0
    return handshake.PREAMBLE.pack(
        magic, version, kind, flags, netid or uuid.uuid4().bytes, src, dst
    )


def recv_exact(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """Exactly ``n`` bytes. Raises ``ConnectionError`` on EOF, ``TimeoutError`` on timeout."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"got {len(buf)} of {n} bytes")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@dataclass(frozen=True)
class Reply:
    """The daemon's answer to a preamble."""

    ok: bool
    version: int
    data_port: int
    reason: str
    raw: bytes


def read_reply(sock: socket.socket, timeout: float = 5.0) -> Reply:
    """Reads the daemon's preamble reply (``ConnectionError`` if it just closes)."""
    head = recv_exact(sock, handshake.REPLY.size, timeout)
    magic, version, status, dport, rlen = handshake.REPLY.unpack(head)
    assert magic == MAGIC, head
    reason = recv_exact(sock, rlen, timeout) if rlen else b""
    return Reply(status == handshake.STATUS_OK, version, dport, reason.decode(), head + reason)


def wait_closed(sock: socket.socket, timeout: float) -> tuple[float | None, bytes]:
    """Reads (and keeps) whatever arrives until the peer closes or resets the connection.

    Returns:
        ``(seconds until closed, or None if still open after timeout, the bytes received)``.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    got = bytearray()
    while True:
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
        left = deadline - time.monotonic()
        if not pending:
            if left <= 0:
                return None, bytes(got)
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                return None, bytes(got)
        try:
            sock.settimeout(max(0.05, left))
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:
            return time.monotonic() - t0, bytes(got)
        if not chunk:
            return time.monotonic() - t0, bytes(got)
        got += chunk


def reset(sock: socket.socket) -> None:
    """Closes with a TCP RST (SO_LINGER 0), no TLS close_notify."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (a ClientHello), as raw bytes."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context().wrap_bio(inc, out, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def tls12_only_context() -> ssl.SSLContext:
    """A client context that refuses TLS 1.3 (TLS 1.2 at most)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# -- frames ------------------------------------------------------------------------------
def header(code: int, body_len: int, nbuf: int = 0, flags: int = 0) -> bytes:
    """A frame header announcing whatever lengths the attacker likes."""
    return HEADER.pack(code, flags, nbuf, body_len)


class Frames:
    """Frames over a connected (TLS or plain) socket, read with a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = FrameDecoder(1 << 30)

    def send(self, code: int, body: bytes = b"") -> None:
        self.sock.sendall(frame_bytes(code, body))

    def recv(self, timeout: float = 5.0) -> Frame | None:
        """The next frame; None on EOF or reset. Raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.dec.next_frame()
            if f is not None:
                return f
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError:
                return None
            if not chunk:
                return None
            self.dec.feed(chunk)


def tls_channel(
    host: str,
    port: int,
    pre: bytes,
    src: str | None = None,
    ctx: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[ssl.SSLSocket, Reply]:
    """Preamble, reply (must be OK), then a TLS 1.3 handshake as a client."""
    s = connect(host, port, src, timeout)
    try:
        s.sendall(pre)
        rep = read_reply(s, timeout)
        assert rep.ok, rep
        s.settimeout(timeout)
        return (ctx or client_context()).wrap_socket(s, server_side=False), rep
    except BaseException:
        s.close()
        raise


@dataclass
class Login:
    """A command connection that completed (or stopped partway through) SRP by hand."""

    sock: ssl.SSLSocket
    frames: Frames
    netid: bytes
    data_port: int
    cb: bytes
    challenge: bytes = b""
    proof: bytes = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def options() -> bytes:
    return handshake.options_bytes(True)


def start_login(
    host: str, port: int, user: str, src: str | None = None, netid: bytes | None = None
) -> Login:
    """TLS, then the SRP hello; stops after reading the challenge."""
    netid = netid or uuid.uuid4().bytes
    sock, rep = tls_channel(host, port, preamble(netid=netid), src)
    cb = cert_binding(sock.getpeercert(binary_form=True))
    lg = Login(sock, Frames(sock), netid, rep.data_port, cb)
    hello = srp._pack(SRP_HELLO, user.encode())
    lg.frames.send(msg.AUTH, hello)
    f = lg.frames.recv()
    assert f is not None and f.code == msg.AUTH, f
    lg.challenge = bytes(f.body)
    return lg


def login(
    host: str,
    port: int,
    user: str,
    password: str,
    src: str | None = None,
    netid: bytes | None = None,
    cb: bytes | None = None,
) -> tuple[Login, Frame | None]:
    """A whole SRP login by hand (``SrpClient``); returns the login and the server's last frame.

    ``cb`` forges the channel binding the client puts into its proof.
    """
    netid = netid or uuid.uuid4().bytes
    sock, rep = tls_channel(host, port, preamble(netid=netid), src)
    real_cb = cert_binding(sock.getpeercert(binary_form=True))
    lg = Login(sock, Frames(sock), netid, rep.data_port, real_cb)
    c = srp.SrpClient(
        user, password, cb=real_cb if cb is None else cb, role="cmd", options=options()
    )
    lg.frames.send(msg.AUTH, c.hello())
    f = lg.frames.recv()
    assert f is not None and f.code == msg.AUTH, f
    lg.challenge = bytes(f.body)
    lg.proof = c.respond(lg.challenge)
    lg.frames.send(msg.AUTH, lg.proof)
    last = lg.frames.recv()
    if last is not None and last.code == msg.AUTH:
        c.verify(bytes(last.body))  # raises unless the server proved itself
    return lg, last


def challenge_fields(challenge: bytes) -> tuple[int, bytes, bytes]:
    """(group index, salt, B bytes) of an SRP challenge message."""
    raw_index, salt, raw_b = srp._unpack(challenge, SRP_CHALLENGE, 3)
    return raw_index[0], salt, raw_b


def proof_message(raw_a: bytes, m1: bytes) -> bytes:
    """An SRP proof message (kind 3) with any A and M1."""
    return srp._pack(SRP_PROOF, raw_a, m1)


# -- canary ------------------------------------------------------------------------------
class Canary:
    """A pickle whose unpickling creates a directory: if the path ever exists, something
    unpickled attacker data."""

    def __init__(self) -> None:
        self.path = f"/tmp/parnet-canary-{uuid.uuid4().hex}"

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))

    def payload(self) -> bytes:
        return pickle.dumps(self, protocol=5)

    def fired(self) -> bool:
        return os.path.lexists(self.path)

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


# -- a man in the middle -----------------------------------------------------------------
class TlsRelay:
    """Listens on ``listen_ip``; for each client, forwards its plaintext preamble and the
    reply, then ends the client's TLS with its own certificate, opens its own TLS to the real
    server, and relays the decrypted bytes both ways, noting the code of every frame the
    client sends (``codes``)."""

    def __init__(
        self, upstream: tuple[str, int], cert: str, key: str, listen_ip: str, src: str | None = None
    ) -> None:
        self.upstream = upstream
        self.src = src
        self.ctx = server_context(cert, key)
        self.codes: list[int] = []
        self.errors: list[BaseException] = []
        self.sessions = 0
        self._ls = socket.socket()
        self._ls.bind((listen_ip, 0))
        self._ls.listen(8)
        self._ls.settimeout(0.2)
        self.host = f"{listen_ip}:{self._ls.getsockname()[1]}"
        self._stop = False
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                c, _ = self._ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._session, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)

    def _session(self, c: socket.socket) -> None:
        up = None
        try:
            self.sessions += 1
            pre = recv_exact(c, handshake.PREAMBLE.size)
            up = connect(*self.upstream, src=self.src)
            up.sendall(pre)
            c.sendall(read_reply(up).raw)
            c.settimeout(5)
            tc = self.ctx.wrap_socket(c, server_side=True)
            tu = client_context().wrap_socket(up, server_side=False)
            dec = FrameDecoder(1 << 30)
            self._relay(tc, tu, dec)
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            self.errors.append(e)
        finally:
            c.close()
            if up is not None:
                up.close()

    def _relay(self, tc: ssl.SSLSocket, tu: ssl.SSLSocket, dec: FrameDecoder) -> None:
        peers = {tc: tu, tu: tc}
        while not self._stop:
            ready = [s for s in peers if s.pending()]
            if not ready:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
            for s in ready:
                try:
                    s.settimeout(5)
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    return
                if s is tc:
                    dec.feed(data)
                    while (f := dec.next_frame()) is not None:
                        self.codes.append(f.code)
                peers[s].sendall(data)

    def close(self) -> None:
        self._stop = True
        self._ls.close()
        for t in self._threads:
            t.join(5)


class FakeSrpServer:
    """A hostile server for one client: answers the preamble, does TLS with its own
    certificate, answers the SRP hello with ``challenge`` (and the proof with ``m2`` if
    given), and records the code of every frame the client sends (``codes``) until it hangs
    up."""

    def __init__(
        self, challenge: bytes, cert: str, key: str, listen_ip: str, m2: bytes | None = None
    ) -> None:
        self.challenge = challenge
        self.m2 = m2
        self.ctx = server_context(cert, key)
        self.codes: list[int] = []
        self.errors: list[BaseException] = []
        self._ls = socket.socket()
        self._ls.bind((listen_ip, 0))
        self._ls.listen(1)
        self._ls.settimeout(10)
        self.host = f"{listen_ip}:{self._ls.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            c, _ = self._ls.accept()
            with c:
                recv_exact(c, handshake.PREAMBLE.size)
                c.sendall(handshake.pack_reply(True, 1))
                c.settimeout(5)
                with self.ctx.wrap_socket(c, server_side=True) as t:
                    fr = Frames(t)
                    while (f := fr.recv(5)) is not None:
                        self.codes.append(f.code)
                        if len(self.codes) == 1:
                            fr.send(msg.AUTH, self.challenge)
                        elif len(self.codes) == 2 and self.m2 is not None:
                            fr.send(msg.AUTH, self.m2)
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            self.errors.append(e)
        finally:
            self._ls.close()

    def join(self) -> None:
        self._thread.join(10)


# -- floods ------------------------------------------------------------------------------
class Flood:
    """Hostile connections from a background thread until ``stop()``.

    ``keep``: hold ``per`` connections open to each ``(host, port)`` target from each source
    address, reopening whatever the server closes (every 50 ms). ``rate``: instead open
    ``rate`` new connections per second (round-robin over targets and sources) and leave them
    to the server. Each new connection sends ``payload()`` (nothing by default) and then stays
    silent. ``opened`` counts the connections made.
    """

    def __init__(
        self,
        targets: list[tuple[str, int]],
        srcs: list[str],
        *,
        per: int = 0,
        rate: float = 0,
        payload: Callable[[], bytes] | None = None,
    ) -> None:
        self.targets, self.srcs, self.per, self.rate = targets, srcs, per, rate
        self.payload = payload
        self.opened = 0
        self.errors: list[BaseException] = []
        self.socks: dict[tuple[int, int], list[socket.socket]] = {}
        self._all: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self, target: tuple[str, int], src: str) -> socket.socket | None:
        try:
            s = connect(*target, src=src, timeout=2)
            if self.payload is not None:
                s.sendall(self.payload())
        except OSError:
            return None
        self.opened += 1
        self._all.append(s)
        return s

    def _run(self) -> None:
        try:
            combos = [(t, ip) for t in self.targets for ip in self.srcs]
            k = 0
            t0 = time.monotonic()
            while not self._stop.is_set():
                if self.rate:
                    due = int((time.monotonic() - t0) * self.rate)
                    while k < due and not self._stop.is_set():
                        self._open(*combos[k % len(combos)])
                        k += 1
                    self._stop.wait(0.01)
                    continue
                for key, (t, ip) in enumerate(combos):
                    live = [s for s in self.socks.get((key, 0), []) if not _closed(s)]
                    while len(live) < self.per and not self._stop.is_set():
                        s = self._open(t, ip)
                        if s is None:
                            break
                        live.append(s)
                    self.socks[(key, 0)] = live
                self._stop.wait(0.05)
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            self.errors.append(e)

    def live(self) -> int:
        """Connections of ``keep`` mode that the server has not closed yet."""
        return sum(1 for lst in list(self.socks.values()) for s in lst if not _closed(s))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self._all:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> Flood:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closed or reset ``sock`` (without waiting); data is discarded."""
    if sock.fileno() < 0:
        return True
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return not sock.recv(4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
