"""Link over real sockets: order, never blocking the sender, partial frames, EOF, pre-auth limits.

Most tests join two Links over ``socket.socketpair()``; the order and large-buffer checks
also run over a TCP loopback pair and over TLS 1.3 on it. A test that needs to send malformed or partial bytes
keeps one side a raw socket. Nothing sleeps: every wait is on a condition with a deadline.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers import wait_until
from parnet.auth import tls
from parnet.errors import ConnectionClosed, RemoteProtocolError
from parnet.transport.link import Link, wait_links
from parnet.wire import messages as msg
from parnet.wire.framing import HEADER, LENGTH, Frame, encode_small, frame_bytes

WAIT = 30.0  # generous upper bound for anything that should take milliseconds
BIG = 64 << 20  # 64 MiB: far more than any socket buffer, so the sender's write stalls


def deadline(seconds: float = WAIT) -> float:
    return time.monotonic() + seconds


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(WAIT)
        client = socket.create_connection(srv.getsockname(), timeout=WAIT)
        server, _ = srv.accept()
    client.settimeout(None)
    server.settimeout(None)
    return client, server


def unix_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


_IDENTITY = tempfile.TemporaryDirectory(prefix="parnet-test-link-")


def tls_pair() -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A TCP loopback pair after a TLS 1.3 handshake with parnet's own contexts."""
    client, server = tcp_pair()
    identity = tls.ensure_server_identity(Path(_IDENTITY.name))
    out: dict[str, ssl.SSLSocket] = {}
    t = threading.Thread(
        target=lambda: out.setdefault(
            "server", tls.server_context(*identity).wrap_socket(server, server_side=True)
        ),
        daemon=True,
    )
    t.start()
    out["client"] = tls.client_context().wrap_socket(client)
    t.join(WAIT)
    assert "server" in out, "TLS handshake failed"
    return out["client"], out["server"]


PAIRS = {"unix": unix_pair, "tcp": tcp_pair, "tls": tls_pair}


@pytest.fixture
def make_links() -> Iterator[Callable[..., tuple[Link, Link]]]:
    made: list[Link] = []

    def make(kind: str = "unix", authenticated: bool = True) -> tuple[Link, Link]:
        sa, sb = PAIRS[kind]()
        a = Link(sa, name="test-a", authenticated=authenticated)
        b = Link(sb, name="test-b", authenticated=authenticated)
        made.extend((a, b))
        return a, b

    yield make
    for lk in made:
        lk.close()


@pytest.fixture
def raw_pair() -> Iterator[Callable[..., tuple[Link, socket.socket]]]:
    """A Link on one end, the bare socket on the other (to send arbitrary bytes); with
    ``tls``, a TLS pair (the bare end a blocking ``SSLSocket``)."""
    made: list[Link | socket.socket] = []

    def make(authenticated: bool = True, tls: bool = False) -> tuple[Link, socket.socket]:
        sa, sb = tls_pair() if tls else socket.socketpair()
        sb.settimeout(WAIT)
        lk = Link(sa, name="test-tls" if tls else "test-link", authenticated=authenticated)
        made.extend((lk, sb))
        return lk, sb

    yield make
    for x in made:
        x.close()


def returns_within(fn: Callable[[], None], seconds: float) -> bool:
    """Runs ``fn`` in a thread; whether it finished in time (its exception is re-raised)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if errors:
        raise errors[0]
    return not t.is_alive()


def wait_ready(lk: Link, until: float) -> None:
    """Waits (on the socket, with a deadline) until ``lk.ready()`` says a frame is ready."""
    while not lk.ready():
        left = until - time.monotonic()
        assert left > 0, "no frame arrived in time"
        select.select([lk], [], [], left)


def small_frames(n: int) -> list[tuple[int, bytes, list[bytes]]]:
    """Frames of assorted shapes, each carrying its index."""
    out = []
    for k in range(n):
        bufs = [bytes([k % 251]) * size for size in [(0,), (10,), (3000, 0), (70_000,)][k % 4]]
        out.append((msg.VALUE, struct.pack("!I", k) + b"b" * (k % 97), bufs))
    return out


def assert_frame(f: Frame, code: int, body: bytes, buffers: list[bytes]) -> None:
    assert f.code == code
    assert bytes(f.body) == body
    assert [bytes(b) for b in f.buffers] == buffers


def big_array() -> np.ndarray:
    return np.arange(BIG // 4, dtype=np.uint32)


# -- order and the never-blocking sender (over unix and TCP) ----------------------------


@pytest.mark.parametrize("kind", PAIRS)
def test_order_of_many_frames(make_links, kind: str) -> None:
    a, b = make_links(kind)
    frames = small_frames(400)
    for code, body, bufs in frames:  # nobody reads yet: later frames queue behind stalls
        a.send_frame(code, body, bufs)
    until = deadline()
    for code, body, bufs in frames:
        assert_frame(b.recv_frame(until), code, body, bufs)
    assert a.flush(WAIT)
    assert not b.ready()


@pytest.mark.parametrize("kind", PAIRS)
def test_order_with_a_concurrent_reader(make_links, kind: str) -> None:
    """The writer thread drains while new frames arrive: direct and queued writes interleave."""
    a, b = make_links(kind)
    frames = small_frames(1000)
    received: list[Frame] = []

    def reader() -> None:
        until = deadline()
        received.extend(b.recv_frame(until) for _ in frames)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for code, body, bufs in frames:
        a.send_frame(code, body, bufs)
    t.join(WAIT)
    assert not t.is_alive()
    assert len(received) == len(frames)
    for f, (code, body, bufs) in zip(received, frames, strict=True):
        assert_frame(f, code, body, bufs)


@pytest.mark.parametrize("kind", PAIRS)
def test_large_buffer_does_not_block_the_sender(make_links, kind: str) -> None:
    a, b = make_links(kind)
    arr = big_array()
    after = small_frames(20)

    def send_all() -> None:
        a.send_frame(msg.VALUE, b"big", [memoryview(arr)])
        for code, body, bufs in after:
            a.send_frame(code, body, bufs)

    # b has not read anything: a socket buffer holds a few MiB at most
    assert returns_within(send_all, WAIT), "send_frame blocked on a peer that does not read"
    assert not a.flush(timeout=0)  # the rest is still queued: the stalled path was taken

    until = deadline()
    f = b.recv_frame(until)
    assert f.code == msg.VALUE and bytes(f.body) == b"big" and len(f.buffers) == 1
    assert np.array_equal(np.frombuffer(f.buffers[0], dtype=np.uint32), arr)
    for code, body, bufs in after:
        assert_frame(b.recv_frame(until), code, body, bufs)
    assert a.flush(WAIT)


def test_sender_may_reuse_its_buffer_after_a_stalled_send(make_links) -> None:
    a, b = make_links()
    arr = big_array()
    a.send_frame(msg.VALUE, b"", [memoryview(arr)])
    assert not a.flush(timeout=0)  # stalled: the unsent rest lives in the writer's copy
    arr[:] = 0xDEADBEEF  # the caller reuses its buffer at once
    f = b.recv_frame(deadline())
    assert np.array_equal(np.frombuffer(f.buffers[0], dtype=np.uint32), big_array())


def test_senders_in_several_threads(make_links) -> None:
    """Sending is thread-safe: frames never interleave, and each thread's order is kept."""
    a, b = make_links()
    nthreads, per_thread = 4, 150
    received: list[Frame] = []

    def reader() -> None:
        until = deadline()
        received.extend(b.recv_frame(until) for _ in range(nthreads * per_thread))

    def sender(t: int) -> None:
        for k in range(per_thread):
            payload = bytes([t]) * (100 if k % 3 else 100_000)
            a.send_frame(msg.VALUE, struct.pack("!II", t, k), [payload])

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    senders = [threading.Thread(target=sender, args=(t,), daemon=True) for t in range(nthreads)]
    for s in senders:
        s.start()
    for s in senders:
        s.join(WAIT)
    rt.join(WAIT)
    assert not rt.is_alive() and not any(s.is_alive() for s in senders)
    seen: dict[int, list[int]] = {t: [] for t in range(nthreads)}
    for f in received:
        t, k = struct.unpack("!II", f.body)
        assert bytes(f.buffers[0]) == bytes([t]) * (100 if k % 3 else 100_000)
        seen[t].append(k)
    assert all(ks == list(range(per_thread)) for ks in seen.values())


# -- receiving: deadlines, partial frames, poll ------------------------------------------


def test_recv_deadline_raises_timeout(make_links) -> None:
    a, b = make_links()
    with pytest.raises(TimeoutError):
        b.recv_frame(time.monotonic() + 0.05)
    with pytest.raises(TimeoutError):
        b.recv_frame(time.monotonic())
    a.send_frame(msg.VALUE, b"still works")
    assert bytes(b.recv_frame(deadline()).body) == b"still works"


@pytest.mark.parametrize("split", [3, 8, 20, 500, 60_000], ids=lambda n: f"at{n}")
def test_partial_frame_survives_a_timeout(raw_pair, split: int) -> None:
    lk, raw = raw_pair()
    data = frame_bytes(msg.VALUE, b"body" * 50, [memoryview(bytes(range(256)) * 400)])
    raw.sendall(data[:split])
    with pytest.raises(TimeoutError):
        lk.recv_frame(time.monotonic() + 0.05)
    assert not lk.ready() and not lk.has_frame()
    raw.sendall(data[split:])
    f = lk.recv_frame(deadline())
    assert_frame(f, msg.VALUE, b"body" * 50, [bytes(range(256)) * 400])


def test_poll_false_then_true(make_links) -> None:
    a, b = make_links()
    assert not b.ready() and not b.has_frame()
    a.send_frame(msg.VALUE, b"ping")
    wait_ready(b, deadline())
    assert b.has_frame()
    assert bytes(b.recv_frame(time.monotonic()).body) == b"ping"  # no waiting needed
    assert not b.ready()


def test_wait_links(make_links) -> None:
    a1, b1 = make_links()
    a2, b2 = make_links()
    assert wait_links([b1], time.monotonic() + 0.02) == []  # single-link path
    assert wait_links([b1, b2], time.monotonic() + 0.02) == []
    a2.send_frame(msg.VALUE, b"to b2")
    assert wait_links([b1, b2], deadline()) == [1]
    assert b2.ready()  # the socket is readable: one read gets the whole small frame, kept
    assert wait_links([b1, b2], deadline()) == [1]  # a held frame counts as ready
    assert bytes(b2.recv_frame(deadline()).body) == b"to b2"
    a1.close()
    assert wait_links([b1], deadline()) == [0]  # EOF is readable too
    with pytest.raises(ConnectionClosed):
        b1.pull_frame()


def test_flush(make_links) -> None:
    a, b = make_links()
    assert a.flush(0)  # nothing queued
    a.send_frame(msg.VALUE, b"", [memoryview(big_array())])
    assert not a.flush(timeout=0.01)  # peer is not reading
    got: list[Frame] = []
    t = threading.Thread(target=lambda: got.append(b.recv_frame(deadline())), daemon=True)
    t.start()
    assert a.flush(WAIT)
    t.join(WAIT)
    assert len(got) == 1 and len(got[0].buffers[0]) == BIG


# -- closing ----------------------------------------------------------------------------


def test_peer_closed_is_connection_closed(make_links) -> None:
    a, b = make_links()
    a.send_frame(msg.VALUE, b"last words")
    a.close()
    until = deadline()
    assert bytes(b.recv_frame(until).body) == b"last words"  # delivered before the EOF
    with pytest.raises(ConnectionClosed, match="test-b") as exc:
        b.recv_frame(until)
    assert "middle" not in str(exc.value)
    assert isinstance(exc.value, OSError)
    assert not b.usable
    with pytest.raises(ConnectionClosed):  # and again: it stays closed
        b.ready()


def test_peer_closed_mid_frame(raw_pair) -> None:
    lk, raw = raw_pair()
    data = frame_bytes(msg.VALUE, b"x" * 100, [memoryview(b"y" * 100)])
    raw.sendall(data[: len(data) // 2])
    raw.close()
    with pytest.raises(ConnectionClosed, match="middle of a message"):
        lk.recv_frame(deadline())


def test_closed_link(make_links) -> None:
    a, _ = make_links()
    a.close()
    a.close()  # idempotent
    assert a.closed and not a.usable and "closed" in repr(a)
    with pytest.raises(ConnectionClosed):
        a.send_frame(msg.VALUE, b"x")
    with pytest.raises(ConnectionClosed):
        a.ready()


@pytest.mark.parametrize("how", ["closed here", "closed after a protocol error"])
def test_recv_on_closed_link_raises_connection_closed(raw_pair, how: str) -> None:
    lk, raw = raw_pair()
    if how == "closed here":
        lk.close()
    else:
        raw.sendall(HEADER.pack(msg.VALUE, 0, 1, 0) + LENGTH.pack(2**64 - 1))
        with pytest.raises(RemoteProtocolError):
            lk.recv_frame(deadline())
    # regression: recv_frame once polled the (unregistered) fd first and waited out the
    # deadline, then raised TimeoutError; with deadline=None it hung
    with pytest.raises(ConnectionClosed):
        lk.recv_frame(time.monotonic() + 0.5)

    def recv_without_deadline() -> None:
        with pytest.raises(ConnectionClosed):
            lk.recv_frame(None)

    assert returns_within(recv_without_deadline, 5.0)


def test_writer_error_breaks_the_link(make_links) -> None:
    a, b = make_links()
    a.send_frame(msg.VALUE, b"", [memoryview(big_array())])
    b.close()  # the peer goes away while the writer thread is still sending
    a.flush(WAIT)  # returns once the writer has failed
    assert a.error is not None and not a.usable
    with pytest.raises(ConnectionClosed, match="test-a"):
        a.send_frame(msg.VALUE, b"more")


def test_flush_reports_a_failed_write(make_links) -> None:
    a, b = make_links()
    a.send_frame(msg.VALUE, b"", [memoryview(big_array())])
    b.close()
    # regression: the writer clears its backlog when it fails, and flush once returned
    # `not backlog`, reporting the undelivered frame as written
    assert a.flush(WAIT) is False


# -- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_garbage_after_auth_is_remote_protocol_error(raw_pair, tls: bool) -> None:
    lk, raw = raw_pair(authenticated=True, tls=tls)
    raw.sendall(HEADER.pack(msg.VALUE, 0, 1, 0) + LENGTH.pack(2**64 - 1))
    with pytest.raises(RemoteProtocolError, match=lk.name):
        lk.recv_frame(deadline())
    assert lk.closed


def test_pre_auth_accepts_raw_frames_only(raw_pair) -> None:
    lk, raw = raw_pair(authenticated=False)
    raw.sendall(frame_bytes(msg.AUTH, b"srp hello"))
    assert_frame(lk.recv_frame(deadline()), msg.AUTH, b"srp hello", [])
    raw.sendall(frame_bytes(msg.FIRST_PICKLED, b"\x80\x05N."))  # a pickle of None
    with pytest.raises(RemoteProtocolError, match="before authentication"):
        lk.recv_frame(deadline())
    assert lk.closed


@pytest.mark.parametrize(
    "data",
    [
        HEADER.pack(msg.AUTH, 0, 0, 5000),  # over MAX_PREAUTH_FRAME; only the header is sent
        HEADER.pack(msg.AUTH, 0, 0, 2**32 - 1),
        HEADER.pack(msg.AUTH, 0, 1, 0) + LENGTH.pack(10),  # any buffer before auth
    ],
    ids=["5000", "4GiB", "buffer"],
)
def test_pre_auth_rejects_oversized_frames(raw_pair, data: bytes) -> None:
    lk, raw = raw_pair(authenticated=False)
    raw.sendall(data)
    with pytest.raises(RemoteProtocolError):
        lk.recv_frame(deadline())
    assert lk.closed


def test_close_wakes_a_blocking_receive(raw_pair) -> None:
    """A plain link waits in ``recv`` itself when there is no deadline; closing the link
    from another thread ends that wait with ConnectionClosed naming the local close."""
    lk, _raw = raw_pair()
    got: list[BaseException] = []

    def wait() -> None:
        try:
            lk.recv_frame()
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            got.append(e)

    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: _blocked_in_recv(t), 5, "the receiver to block")
    lk.close()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(got[0], ConnectionClosed) and "link is closed" in str(got[0])


def _blocked_in_recv(t: threading.Thread) -> bool:
    """Whether thread ``t`` waits in a system call (its kernel state is sleeping)."""
    try:
        with open(f"/proc/self/task/{t.native_id}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "S"
    except (OSError, TypeError):
        return False


def test_heartbeat_read_with_the_last_handshake_message_is_dropped(raw_pair) -> None:
    """A PING (or NOTICE) that arrives in the same read as the peer's last handshake frame
    is decoded before authentication; it must not surface as a message afterwards."""
    lk, raw = raw_pair(authenticated=False)
    raw.sendall(
        frame_bytes(msg.AUTH, b"tag")
        + frame_bytes(msg.PING)
        + frame_bytes(msg.NOTICE, (3).to_bytes(8, "big"))
        + frame_bytes(msg.PING)
    )
    assert bytes(lk.recv_frame(deadline()).body) == b"tag"
    wait_until(lambda: lk.ready() and len(lk._dec.frames) == 3, 5, "the frames after the tag")
    lk.mark_authenticated()
    raw.sendall(frame_bytes(msg.VALUE, b"v"))
    assert_frame(lk.recv_frame(deadline()), msg.VALUE, b"v", [])


def test_mark_authenticated_lifts_the_limits(raw_pair) -> None:
    lk, raw = raw_pair(authenticated=False)
    raw.sendall(frame_bytes(msg.AUTH, b"proof"))
    assert bytes(lk.recv_frame(deadline()).body) == b"proof"
    lk.mark_authenticated()
    raw.sendall(frame_bytes(msg.VALUE, b"p" * 10_000, [memoryview(b"q" * 100_000)]))
    assert_frame(lk.recv_frame(deadline()), msg.VALUE, b"p" * 10_000, [b"q" * 100_000])


# -- TLS: reads stop at whole frames; blocking pulls wait outside the TLS lock ------------


def pull_until(lk: Link, until: float) -> Frame:
    """``pull_frame(block=True)`` until a whole frame comes."""
    while (f := lk.pull_frame(block=True)) is None:
        assert time.monotonic() < until, "no frame arrived in time"
    return f


def test_tls_small_frames_ping_pong(make_links) -> None:
    a, b = make_links("tls")
    until = deadline()
    for k in range(300):
        a.send_encoded(encode_small(msg.VALUE, b"%d" % k))
        assert_frame(pull_until(b, until), msg.VALUE, b"%d" % k, [])
        b.send_encoded(encode_small(msg.VALUE, b"r%d" % k))
        assert_frame(pull_until(a, until), msg.VALUE, b"r%d" % k, [])
    assert not a.tls_pending() and not b.readable_now()


@pytest.mark.parametrize("split", [3, 5000, 20_000, 70_000])
def test_tls_partial_frame_over_records_survives_a_timeout(raw_pair, split: int) -> None:
    """A frame of several TLS records (body through the scratch buffer, one large buffer
    read directly) arriving in two writes: the first part is kept, the rest completes it."""
    lk, raw = raw_pair(tls=True)
    body, buf = b"b" * 40_000, bytes(range(256)) * 400
    data = frame_bytes(msg.VALUE, body, [memoryview(buf)])
    raw.sendall(data[:split])
    with pytest.raises(TimeoutError):
        lk.recv_frame(time.monotonic() + 0.05)
    assert not lk.has_frame()
    raw.sendall(data[split:] + frame_bytes(msg.VALUE, b"next"))
    until = deadline()
    assert_frame(lk.recv_frame(until), msg.VALUE, body, [buf])
    assert_frame(lk.recv_frame(until), msg.VALUE, b"next", [])


def test_tls_peer_closed_after_frames_and_mid_frame(raw_pair) -> None:
    lk, raw = raw_pair(tls=True)
    data = frame_bytes(msg.VALUE, b"x" * 30_000)
    raw.sendall(frame_bytes(msg.VALUE, b"last words") + data[: len(data) // 2])
    raw.close()
    until = deadline()
    assert bytes(lk.recv_frame(until).body) == b"last words"  # delivered before the EOF
    with pytest.raises(ConnectionClosed, match="middle of a message"):
        lk.recv_frame(until)
    assert not lk.usable


def test_tls_blocking_pull_leaves_the_link_to_senders_and_wakes_on_close(make_links) -> None:
    """A pull waiting for data holds no lock: the same link sends meanwhile, and ``close``
    wakes the wait."""
    a, b = make_links("tls")
    got: list[Frame | BaseException] = []

    def pull() -> None:
        try:
            got.append(pull_until(b, deadline()))
            b.pull_frame(block=True)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            got.append(e)

    t = threading.Thread(target=pull, daemon=True)
    t.start()
    wait_until(lambda: _blocked_in_recv(t), WAIT, "the pull to wait")
    assert returns_within(lambda: b.send_encoded(encode_small(msg.VALUE, b"while waiting")), 5)
    assert_frame(pull_until(a, deadline()), msg.VALUE, b"while waiting", [])
    a.send_encoded(encode_small(msg.VALUE, b"wake"))
    wait_until(lambda: len(got) == 1, WAIT, "the first pull")
    wait_until(lambda: _blocked_in_recv(t), WAIT, "the second pull to wait")
    b.close()
    t.join(WAIT)
    assert not t.is_alive()
    assert_frame(got[0], msg.VALUE, b"wake", [])  # type: ignore[arg-type]
    assert isinstance(got[1], ConnectionClosed)


@pytest.mark.parametrize("kind", PAIRS)
def test_send_frames_keeps_order_and_shapes(make_links, kind: str) -> None:
    a, b = make_links(kind)
    frames = small_frames(12)
    a.send_frames([(code, body, [memoryview(x) for x in bufs], 0) for code, body, bufs in frames])
    until = deadline()
    for code, body, bufs in frames:
        assert_frame(b.recv_frame(until), code, body, bufs)


def test_send_frames_of_small_frames_is_one_tls_record(raw_pair) -> None:
    """Small frames sent together go out in one write: over TLS one record, which the
    peer's first read returns whole (one wake-up)."""
    lk, raw = raw_pair(tls=True)
    frames = [(msg.VALUE, b"v%d" % k * 50, (), 0) for k in range(5)]
    lk.send_frames(frames)
    assert raw.recv(1 << 16) == b"".join(frame_bytes(c, body) for c, body, _, _ in frames)
