"""One framed, bidirectional connection to one peer.

Theory of operation (DESIGN.md, "The central tension"):

* **Receive in the caller's thread.** ``recv_frame``/``poll`` read the socket themselves,
  through the sans-IO ``FrameDecoder``; there is no reader thread and so no thread hand-off
  on the hot path. Partial frames survive timeouts: the decoder keeps its state. A plain
  socket stays in blocking mode and every call that must not wait passes ``MSG_DONTWAIT``,
  so a receive with nothing else to wait for (no deadline) waits in ``recv`` itself: one
  system call, not ``poll`` + ``recv``. Closing or ``declare_dead`` shuts the socket down,
  which wakes such a wait.
* **Small frames** (``send_encoded``): a frame already encoded as one ``bytes`` goes out
  with one ``send`` under the send lock, no list of pieces, no gathering write.
* **Large receive buffers** come from ``bufpool``: memory of earlier large values that are
  gone, already touched, so a large receive costs no page faults.
* **Never block the sender on the receiver.** ``send_frame`` writes directly (non-blocking)
  while the socket takes data. When a write stalls because the peer is not reading, the
  unsent rest is *copied* (so the caller may reuse its buffers) and handed to a per-link
  writer thread, and ``send_frame`` returns. Later frames queue behind it, keeping order.
  The copy happens only on that stalled path; a peer that reads keeps the path zero-copy.
* **TLS** uses the stdlib ``SSLSocket`` in non-blocking mode. An OpenSSL object must never
  be used by two threads at once, so every ``SSL_read``/``SSL_write`` runs under ``_io_lock``;
  the lock is never held while waiting for the socket (waits are ``poll`` calls outside it).
  A read is tried only once ``poll`` (or ``SSL_pending``) says data is there, and reading
  stops as soon as the frames received are whole: OpenSSL returns one record (16 KiB at
  most) per read, so a small frame costs ``poll`` + one ``SSL_read`` and no read that
  finds nothing (a failed non-blocking ``SSL_read`` also costs a Python exception).
  A TLS write that stalls (``SSLWantWriteError``) must be retried with the same bytes: the
  writer thread resumes at the same chunk boundary, from a copy (OpenSSL accepts a moved
  buffer, ``SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER``).
* Before authentication the decoder accepts only small raw frames (``MAX_PREAUTH_FRAME``,
  no buffers, codes below ``FIRST_PICKLED``); ``mark_authenticated`` lifts the limits.

Errors: a peer that closes or breaks the connection surfaces as ``ConnectionClosed``
(naming the link); malformed input as ``RemoteProtocolError`` (and the link is closed).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal, overload

from ..constants import MAX_FRAME, MAX_PREAUTH_FRAME
from ..errors import ConnectionClosed, RemoteProtocolError
from ..wire import messages as msg
from ..wire.framing import Frame, FrameDecoder, encode_frame
from . import bufpool
from .heartbeat import PeerState, peer_state, set_keepalive, silence_reason

log = logging.getLogger(__name__)

_TLS_CHUNK = 256 * 1024
_SMALL = 64 * 1024
#: A stalled write waits this long (ms) for the peer to make room before the rest is copied
#: to the writer thread; a peer that reads never causes a copy.
STALL_GRACE_MS = 10
_IOV_MAX = 512
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_DEBUG = bool(os.environ.get("PARNET_DEBUG"))
_DROPPED = frozenset((msg.PING, msg.NOTICE))  # handled on arrival, never returned


def _copy(piece: bytes | bytearray | memoryview) -> Any:
    """A copy of ``piece`` for the writer thread. A large one goes into the buffer pool's
    memory, already touched by an earlier value that is gone (``bufpool``): fresh memory
    for tens of MB would cost a page fault per 4 KiB, more than the copy itself."""
    mv = memoryview(piece)
    if mv.nbytes < bufpool.POOL_MIN:
        return bytes(mv)
    out = bufpool.alloc(mv.nbytes)
    out[:] = mv.cast("B")
    return out


def poll_ms(deadline: float | None) -> int:
    """Milliseconds left until ``deadline`` (a ``time.monotonic()`` value), rounded up, for
    ``poll()``: -1 for no deadline."""
    if deadline is None:
        return -1
    return max(0, int((deadline - time.monotonic()) * 1000 + 0.999))


class Link:
    """A framed connection. Not shared for *receiving* between threads; sending is thread-safe.

    Args:
        sock: a connected socket (plain or ``SSLSocket`` after its handshake).
        name: how the link is named in errors and logs, e.g. ``"node 2 (h2:12502)"``.
        authenticated: whether pickled frames may be received from the start.
    """

    def __init__(self, sock: socket.socket, *, name: str, authenticated: bool = False) -> None:
        self.tls = isinstance(sock, ssl.SSLSocket)
        # A plain socket stays in blocking mode and every call that must not wait passes
        # MSG_DONTWAIT: a receive with nothing else to wait for blocks in ``recv`` itself,
        # one system call instead of poll + recv. TLS sockets are non-blocking.
        sock.setblocking(not self.tls)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        # The OpenSSL connection behind an SSLSocket (``SSLSocket._sslobj``, set by its
        # handshake): the hot paths call its read/write/pending directly, without the
        # wrapper's Python layers. After ``close`` it fails with an OSError, where the
        # wrapper would fall back to the plain socket.
        self._ssl: Any = getattr(sock, "_sslobj", None) if self.tls else None
        if self.tls and self._ssl is None:
            raise ValueError(f"{name}: TLS socket without a completed handshake")
        self._fd = sock.fileno()
        self.name = name
        self._io_lock = threading.Lock() if self.tls else contextlib.nullcontext()
        self._send_lock = threading.Lock()
        self._cv = threading.Condition(self._send_lock)
        self._backlog: deque[list[Any]] = deque()  # bytes, or pooled arrays (_copy)
        self._writer: threading.Thread | None = None
        self._poller = select.poll()
        self._poller.register(self._fd, _POLLIN)
        self._wpoller: select.poll | None = None
        self.authenticated = authenticated
        limits = (MAX_FRAME, 0xFFFF) if authenticated else (MAX_PREAUTH_FRAME, 0)
        self._dec = FrameDecoder(*limits, alloc=bufpool.alloc)  # large buffers: reused memory
        if authenticated:
            self._dec.skip = _DROPPED
        self._dec.note_code = msg.NOTICE
        self.error: BaseException | None = None  # why the link broke, if it did
        self.closed = False
        self.eof = False
        self.sends = 0  # frames sent so far (the heartbeat pings links that send nothing)
        self.heartbeat: float | None = None  # set by the heartbeat monitor that watches it

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("broken" if self.error else "open")
        return f"<Link {self.name} {state}{' tls' if self.tls else ''}>"

    def fileno(self) -> int:
        """The socket's file descriptor (for waiting on several links)."""
        return self._fd

    def mark_authenticated(self) -> None:
        """Authentication succeeded: accept pickled frames up to the configured size."""
        self.authenticated = True
        self._dec.set_limits(MAX_FRAME, 0xFFFF)
        self._dec.skip = _DROPPED
        # A heartbeat may have come in the same read as the peer's last handshake message,
        # before these codes were dropped on arrival: drop it now.
        frames = self._dec.frames
        for _ in range(len(frames)):
            f = frames.popleft()
            if f.code not in _DROPPED:
                frames.append(f)

    # -- sending ---------------------------------------------------------------------
    def send_frame(
        self,
        code: int,
        body: bytes | bytearray | memoryview = b"",
        buffers: Sequence[Any] = (),
        flags: int = 0,
    ) -> None:
        """Sends one frame without waiting for the peer to read it.

        Raises:
            ConnectionClosed: the link is closed or broken (earlier writes failed).
        """
        pieces = encode_frame(code, body, buffers, flags)
        if _DEBUG:
            log.debug(
                "pid %d send %s on %s: %d bytes",
                os.getpid(),
                msg.NAMES.get(code, code),
                self.name,
                sum(memoryview(p).nbytes for p in pieces),
            )
        with self._send_lock:
            self._send_locked(pieces)

    def send_frames(
        self, frames: Sequence[tuple[int, bytes | bytearray | memoryview, Sequence[Any], int]]
    ) -> None:
        """``send_frame`` for several ``(code, body, buffers, flags)`` frames at once: one
        write (small frames joined; on TLS one record) when the socket takes them, so the
        peer wakes up once, not once per frame.

        Raises:
            ConnectionClosed: the link is closed or broken (earlier writes failed).
        """
        pieces = [p for f in frames for p in encode_frame(*f)]
        if len(pieces) > 1 and sum(memoryview(p).nbytes for p in pieces) <= _SMALL:
            pieces = [b"".join(pieces)]
        with self._send_lock:
            self._send_locked(pieces)

    def send_encoded(self, frame: bytes) -> None:
        """``send_frame`` for one whole small frame already encoded (``encode_frame``'s single
        piece): the hot path of ``reval`` and of small ``psend`` values, one ``send`` call
        (on TLS one ``SSL_write``: the header and body go out in one record)."""
        with self._send_lock:
            if self._backlog or self.error is not None or self.closed:
                self._send_locked([frame])
                return
            if self.tls:
                if len(frame) > _TLS_CHUNK:
                    self._send_locked([frame])
                    return
                try:
                    with self._io_lock:
                        self._ssl.write(frame)  # all of it: OpenSSL writes no partial records
                    self.sends += 1
                    return
                except _WOULD_BLOCK:
                    pass  # the retry (the writer's too) presents the same bytes
                except OSError as e:
                    raise self._broken(e) from e
                self._send_locked([frame])
                return
            try:
                n = self._sock.send(frame, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                raise self._broken(e) from e
            if n == len(frame):
                self.sends += 1
                return
            self._send_locked([memoryview(frame)[n:]])

    def _send_locked(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """Writes or queues ``pieces`` (``_send_lock`` held)."""
        self._check_open()
        self.sends += 1
        if not self._backlog:
            try:
                rest = self._send_now(pieces)
            except OSError as e:
                raise self._broken(e) from e
            if not rest:
                return
        else:
            rest = [_copy(p) for p in pieces]
        self._backlog.append(rest)
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name=f"parnet-writer {self.name}", daemon=True
            )
            self._writer.start()
        self._cv.notify_all()

    def _send_now(self, pieces: Sequence[bytes | bytearray | memoryview]) -> list[Any]:  # noqa: C901
        """Writes while the peer drains the socket; returns a copy of the unsent rest.

        A full socket is waited on for up to ``STALL_GRACE`` seconds at a time: a peer that
        is reading frees space within that, and the whole frame goes out from the caller's
        own memory. Only when the peer makes no progress for that long (it is not reading)
        is the rest copied, for the writer thread (empty list: all written).
        """
        if self.tls:
            for k, p in enumerate(pieces):
                mv = memoryview(p)
                off = 0
                while off < mv.nbytes:
                    chunk = mv[off : off + _TLS_CHUNK]  # a retry must present the same chunk
                    try:
                        with self._io_lock:
                            n = self._ssl.write(chunk)
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                        if self._wait_writable():
                            continue
                        return [_copy(mv[off:])] + [_copy(q) for q in pieces[k + 1 :]]
                    off += n
            return []
        if len(pieces) == 1 and len(pieces[0]) < _SMALL:  # the common small frame: one send()
            p0 = pieces[0]
            try:
                n = self._sock.send(p0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n == len(p0):
                return []
            pieces = [memoryview(p0)[n:]]
        views = [memoryview(p) for p in pieces]
        while views:
            try:
                n = self._sock.sendmsg(views[:_IOV_MAX], (), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if self._wait_writable():
                    continue
                return [_copy(v) for v in views]
            while n and views:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0
        return []

    def _wait_writable(self) -> bool:
        """Waits up to STALL_GRACE for room in the socket; False if the peer made none."""
        if self._wpoller is None:
            self._wpoller = select.poll()
            self._wpoller.register(self._fd, select.POLLOUT)
        return bool(self._wpoller.poll(STALL_GRACE_MS))

    def _write_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._backlog and not self.closed:
                        self._cv.wait()
                    if self.closed:
                        return
                    item = self._backlog[0]
                for piece in item:
                    self._write_blocking(memoryview(piece))
                with self._cv:
                    if self._backlog:
                        self._backlog.popleft()
                    self._cv.notify_all()
        except Exception as e:  # noqa: BLE001 - a broken link is reported to the next caller
            with self._cv:
                self._broken(e)
                self._backlog.clear()
                self._cv.notify_all()
        finally:
            with self._cv:
                self._writer = None
                self._cv.notify_all()

    def _write_blocking(self, mv: memoryview) -> None:
        wpoll = select.poll()
        wpoll.register(self._fd, select.POLLOUT)
        off = 0
        while off < mv.nbytes:
            if self.closed:
                raise ConnectionClosed(f"in {self.name}: closed while sending")
            try:
                if self.tls:
                    with self._io_lock:
                        n = self._ssl.write(mv[off : off + _TLS_CHUNK])
                else:
                    n = self._sock.send(mv[off:], socket.MSG_DONTWAIT)
                off += n
            except _WOULD_BLOCK:
                wpoll.poll(1000)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued frame is written; returns False on timeout or error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._backlog and self.error is None and not self.closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return not self._backlog and self.error is None and not self.closed

    # -- receiving -------------------------------------------------------------------
    def has_frame(self) -> bool:
        """Whether a whole frame is already received (``recv_frame`` will not wait)."""
        return self._dec.has_frame()

    @property
    def notice(self) -> int:
        """The count in the latest NOTICE received (worker -> client data link): how many
        ERROR/OUTPUT/SHUTDOWN frames the worker has sent on its command link."""
        return self._dec.note

    def take_frame(self) -> Frame | None:
        """The next whole frame already received, or None; never touches the socket."""
        frames = self._dec.frames
        if not frames:
            return None
        f = frames.popleft()
        if _DEBUG or not self.authenticated:
            return self._check(f)
        return f

    def pull_frame(self, block: bool = False) -> Frame | None:
        """One read, then ``take_frame``: for a caller that knows the socket is readable (or,
        with ``block``, that waits until some bytes come, a NOTICE included: in ``recv`` on a
        plain link, in ``poll`` outside the TLS lock on a TLS link); the next whole frame, or
        None if none is complete yet.

        Raises:
            ConnectionClosed: the peer closed the link and no whole frame is left.
        """
        try:
            if not self.tls:
                self._read_some(block)
            elif not block or self.closed or self.eof or self.tls_pending() or self._poller.poll():
                self._read_some()
        except ConnectionClosed:
            if not self._dec.has_frame():
                raise
        return self.take_frame()

    def tls_pending(self) -> bool:
        """Whether TLS data already read from the socket waits inside OpenSSL (a read will
        find it though the socket shows nothing)."""
        return self.tls and self._ssl.pending() > 0

    def keepalive(self, timeout: float) -> None:
        """Turns on the kernel's keepalive for a heartbeat of ``timeout`` s: it ends the
        connection when the peer's machine stops answering (``heartbeat.set_keepalive``)."""
        self.heartbeat = timeout
        set_keepalive(self._sock, timeout)

    def peer_state(self) -> PeerState | None:
        """What the kernel knows of the peer (``heartbeat.peer_state``), or None."""
        return peer_state(self._sock)

    def readable_now(self) -> bool:
        """Whether a read would find data (or EOF) now; one ``poll`` call, no exception."""
        if self.closed or self.eof:
            return True
        if self.tls_pending():
            return True
        return bool(self._poller.poll(0))

    def ready(self) -> bool:
        """Reads whatever has arrived without waiting; True if a whole frame is ready (for
        ``take_frame``/``recv_frame``).

        Raises:
            ConnectionClosed: the peer closed the link (and no whole frame is left).
            RemoteProtocolError: the peer sent a malformed frame.
        """
        for _ in range(64):
            if self._dec.has_frame():
                return True
            if not self.readable_now() or not self._read_some():
                return False
        return self._dec.has_frame()

    @overload
    def recv_frame(self, deadline: float | None = None) -> Frame: ...

    @overload
    def recv_frame(
        self, deadline: float | None = None, *, block: Literal[False]
    ) -> Frame | None: ...

    def recv_frame(self, deadline: float | None = None, *, block: bool = True) -> Frame | None:
        """The receive: the next frame, waiting until ``deadline`` (a ``time.monotonic()``
        value; None: no limit). With ``block=False`` it reads what has arrived without
        waiting and returns None if no whole frame is there.

        The other receive-side calls are for the hot paths and for waiting on several links:
        ``take_frame`` (a frame already decoded, no I/O), ``pull_frame`` (one read),
        ``ready``/``has_frame``/``readable_now`` (is there something to take or read).

        Raises:
            TimeoutError: the deadline passed first (a partial frame is kept for later).
            ConnectionClosed: the peer closed or reset the link.
            RemoteProtocolError: malformed data; the link is closed.
        """
        if not block:
            return self.take_frame() if self.ready() else None
        while True:
            f = self._dec.next_frame()
            if f is not None:
                return self._check(f)
            if self.closed or self.eof:
                self._read_some()  # raises ConnectionClosed
            if deadline is None and not self.tls:
                self._read_some(block=True)  # no deadline: wait in recv itself
            elif self.tls_pending() or self._poller.poll(poll_ms(deadline)):
                self._read_some()
            elif deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no message from {self.name} in time")

    def _check(self, f: Frame) -> Frame:
        if not self.authenticated and f.code >= msg.FIRST_PICKLED:
            err = RemoteProtocolError(f"in {self.name}: message {f.code} before authentication")
            self.close()
            raise err
        if _DEBUG:
            log.debug(
                "pid %d recv %s on %s (%r)",
                os.getpid(),
                msg.NAMES.get(f.code, f.code),
                self.name,
                f,
            )
        return f

    def _read_some(self, block: bool = False) -> bool:
        """One read, non-blocking unless ``block`` (plain links only); on a TLS link, reads
        until the frame being decoded is whole or nothing more has come. True if bytes
        arrived, False if none are available now."""
        if self.closed:
            raise ConnectionClosed(f"in {self.name}: link is closed")
        if self.eof:
            raise self._eof_error()
        if self.tls:
            return self._read_tls()
        try:
            n = self._sock.recv_into(self._dec.buffer(), 0, 0 if block else socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise self._read_failed(e) from e
        if n == 0:
            raise self._at_eof()
        self._commit(n)
        return True

    def _read_tls(self) -> bool:
        """``_read_some`` on a TLS link. OpenSSL hands out one record (16 KiB at most) per
        read: the next record is read only while the frame being decoded still needs bytes,
        so a small frame costs one read and no read that finds nothing."""
        got = False
        while True:
            buf = self._dec.buffer()
            drained = False
            try:
                with self._io_lock:
                    n = self._ssl.read(buf.nbytes, buf)
                    if n and n < buf.nbytes and self._dec.direct:
                        n += self._tls_more(buf, n)  # a large buffer: drain what is there
                        drained = n < buf.nbytes  # nothing more has come
            except _WOULD_BLOCK:
                return got
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                n = 0
            except OSError as e:
                raise self._read_failed(e) from e
            if n == 0:
                if got:
                    self.eof = True  # the next read reports it, after these frames
                    return True
                raise self._at_eof()
            self._commit(n)
            got = True
            if drained or not self._dec.mid_frame():
                return True

    def _read_failed(self, e: OSError) -> ConnectionClosed:
        """The error to raise for a failed read (the link is broken)."""
        self.eof = True
        how = " in the middle of a message" if self._dec.mid_frame() else ""
        return self._broken(
            self._timed_out(e) or ConnectionClosed(f"in {self.name}: {e.strerror or e}{how}")
        )

    def _at_eof(self) -> ConnectionClosed:
        """The error to raise for a read that found the end of the stream."""
        self.eof = True
        if self.closed:  # closed here while a blocking read waited (shutdown woke it)
            return ConnectionClosed(f"in {self.name}: link is closed")
        return self._eof_error()

    def _commit(self, n: int) -> None:
        try:
            self._dec.commit(n)
        except RemoteProtocolError as e:
            log.warning("closing %s: %s", self.name, e)
            self.close()
            raise RemoteProtocolError(f"in {self.name}: {e}") from None

    def declare_dead(self, reason: str) -> None:
        """Marks the peer dead (no heartbeat): the next receive raises ``ConnectionClosed``
        with ``reason``, and a receive already waiting wakes up."""
        if self.error is None:
            self.error = ConnectionClosed(reason)
        self.eof = True
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the TLS object
        # first, and a send racing in another thread would then go out in plaintext.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def _tls_more(self, buf: memoryview, have: int) -> int:
        """TLS hands out one record (16 KiB) per read: for a large buffer, keep reading the
        records already received, under the same lock hold (caller holds ``_io_lock``)."""
        got = 0
        try:
            while have + got < buf.nbytes:
                k = self._ssl.read(buf.nbytes - have - got, buf[have + got :])
                if not k:
                    break
                got += k
        except (
            ssl.SSLWantReadError,
            ssl.SSLWantWriteError,
            BlockingIOError,
            ssl.SSLEOFError,
            ssl.SSLZeroReturnError,
        ):
            pass  # none left for now (or EOF: the next read reports it)
        return got

    def _eof_error(self) -> ConnectionClosed:
        if isinstance(self.error, ConnectionClosed):
            return self.error
        how = " in the middle of a message" if self._dec.mid_frame() else ""
        err = ConnectionClosed(f"in {self.name}: connection closed by the peer{how}")
        if self.error is None:
            self.error = err
        return err

    # -- state -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionClosed(f"in {self.name}: link is closed")
        if self.error is not None:
            raise ConnectionClosed(f"in {self.name}: {self.error}") from self.error

    def _timed_out(self, e: BaseException) -> ConnectionClosed | None:
        """For the kernel's ETIMEDOUT on a watched link (its keepalive gave up: the peer's
        machine stopped answering), the heartbeat's message; else None."""
        if isinstance(e, OSError) and e.errno == errno.ETIMEDOUT and self.heartbeat is not None:
            return ConnectionClosed(silence_reason(self.name, self.heartbeat))
        return None

    def _broken(self, e: BaseException) -> ConnectionClosed:
        e = self._timed_out(e) or e
        if self.error is None:
            self.error = e
        if isinstance(e, ConnectionClosed):
            return e
        return ConnectionClosed(f"in {self.name}: {e}")

    @property
    def queued(self) -> bool:
        """Whether frames wait for the writer thread (the peer is not reading)."""
        return bool(self._backlog)

    @property
    def usable(self) -> bool:
        """Open and not known to be broken."""
        return not self.closed and self.error is None and not self.eof

    def close(self) -> None:
        """Closes the connection at once (queued, unsent frames are dropped). Idempotent."""
        with self._cv:
            if self.closed:
                return
            self.closed = True
            self._cv.notify_all()
        self._shutdown_socket()
        with contextlib.suppress(OSError, ValueError):
            self._poller.unregister(self._fd)
        with self._io_lock, contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_links(
    links: list[Link], deadline: float | None, extra_fds: tuple[int, ...] = ()
) -> list[int]:
    """Waits until one of ``links`` has something to read; returns the positions that may.

    A link that already holds a whole frame, or TLS data inside OpenSSL, counts as ready
    without touching the socket.
    """
    ready = [k for k, lk in enumerate(links) if lk.has_frame() or lk.tls_pending()]
    if ready:
        return ready
    if len(links) == 1 and not extra_fds:
        lk = links[0]
        return [0] if lk.closed or lk.eof or lk._poller.poll(poll_ms(deadline)) else []
    p = select.poll()
    fds = {}
    for k, lk in enumerate(links):
        if lk.closed or lk.eof:
            ready.append(k)
            continue
        fds[lk.fileno()] = k
        p.register(lk.fileno(), _POLLIN)
    if ready:
        return ready
    for fd in extra_fds:
        p.register(fd, _POLLIN)
    events = p.poll(poll_ms(deadline))
    return sorted({fds[fd] for fd, _ in events if fd in fds})
