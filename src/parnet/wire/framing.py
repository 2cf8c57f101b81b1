"""Frame encoding and an incremental, allocation-checked frame decoder.

A frame is::

    header  = struct "!BBHI": code, flags, nbuf, body_len          (8 bytes)
    lengths = nbuf x "!Q": the size of each out-of-band buffer
    body    = body_len bytes (a small pickle, or raw bytes before authentication)
    buffers = nbuf raw buffers (pickle protocol 5 out-of-band data, e.g. NumPy arrays)

The decoder is sans-IO, in the manner of h11: the caller asks it where the next bytes
should go (``buffer()``), reads into that memory itself (``recv_into``), and reports how
many bytes arrived (``commit(n)``). Small frames are read ahead into one scratch buffer,
so a small message costs one ``recv``; a large buffer is read straight into its own
preallocated ``bytearray``, so bulk data is never copied after the kernel hands it over.

Every length is checked against the limits *before* anything is allocated: a hostile
length prefix costs nothing but a ``RemoteProtocolError``.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct("!BBHI")
LENGTH = struct.Struct("!Q")
#: Parts smaller than this are gathered through the scratch buffer, larger ones go direct.
DIRECT_MIN = 64 * 1024
_SCRATCH = 256 * 1024
#: Body up to this size is joined with the header into one write.
_JOIN_MAX = 64 * 1024


@dataclass(slots=True)
class Frame:
    """One decoded frame: message code, flags, body and out-of-band buffers."""

    code: int
    flags: int
    body: bytes | bytearray | memoryview
    buffers: list[bytearray | np.ndarray] = field(default_factory=list)  # writable buffers

    def __repr__(self) -> str:  # never show the payload
        sizes = [len(b) for b in self.buffers]
        return (
            f"Frame(code={self.code}, flags={self.flags}, body={len(self.body)}B, buffers={sizes})"
        )


def encode_frame(
    code: int, body: bytes | bytearray | memoryview, buffers: Sequence[Any] = (), flags: int = 0
) -> list[bytes | bytearray | memoryview]:
    """Returns the pieces of one frame, ready for a gathering write.

    Raises:
        LocalProtocolError: a field does not fit the frame format.
    """
    if (
        not buffers
        and type(body) is bytes
        and len(body) <= _JOIN_MAX
        and 0 <= code <= 255
        and 0 <= flags <= 255
    ):
        return [HEADER.pack(code, flags, 0, len(body)) + body]  # the common small frame
    if isinstance(body, memoryview) and (body.format != "B" or body.ndim != 1):
        body = body.cast("B") if body.c_contiguous else body.tobytes()
    if not 0 <= code <= 255 or not 0 <= flags <= 255:
        raise LocalProtocolError(f"bad code/flags {code}/{flags}")
    nbuf = len(buffers)
    if nbuf > 0xFFFF or len(body) > 0xFFFFFFFF:
        raise LocalProtocolError(
            f"frame too large to encode: {nbuf} buffers, body {len(body)} bytes"
        )
    head = HEADER.pack(code, flags, nbuf, len(body))
    if nbuf:
        head += b"".join(LENGTH.pack(memoryview(b).nbytes) for b in buffers)
    if len(body) <= _JOIN_MAX:
        pieces: list[bytes | bytearray | memoryview] = [head + bytes(body)]
    else:
        pieces = [head, body]
    for b in buffers:
        mv = memoryview(b)
        if mv.nbytes:
            if not mv.c_contiguous:
                mv = memoryview(mv.tobytes())  # rare: pickle's buffers are contiguous
            pieces.append(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv)
    return pieces


def encode_small(code: int, body: bytes) -> bytes:
    """The whole frame for a body without buffers or flags, as one ``bytes`` (the hot path
    of small messages; ``encode_frame`` checks the general case)."""
    return HEADER.pack(code, 0, 0, len(body)) + body


def alloc_buffer(size: int) -> bytearray | np.ndarray:
    """A receive buffer. Large ones are uninitialised NumPy memory: ``bytearray(n)`` zero-fills
    every page first, which costs about as much as receiving the data."""
    if size >= DIRECT_MIN:
        return np.empty(size, dtype=np.uint8)
    return bytearray(size)


def frame_bytes(code: int, body: bytes = b"", buffers: Sequence[Any] = (), flags: int = 0) -> bytes:
    """The whole frame as one ``bytes`` (tests and small control messages)."""
    return b"".join(bytes(p) for p in encode_frame(code, body, buffers, flags))


class FrameDecoder:
    """Incremental decoder: ``buffer()`` / ``commit(n)`` (or ``feed``), then ``next_frame()``.

    Args:
        max_frame: largest total frame size accepted (header, lengths, body and buffers).
        max_buffers: most out-of-band buffers in one frame (0 before authentication).
        alloc: makes the writable buffer for an out-of-band part of the given size
            (default ``alloc_buffer``; the link layer passes one that reuses large buffers).
    """

    def __init__(
        self,
        max_frame: int,
        max_buffers: int = 0xFFFF,
        alloc: Callable[[int], bytearray | np.ndarray] | None = None,
    ) -> None:
        self.max_frame = max_frame
        self._alloc = alloc or alloc_buffer
        self.max_buffers = max_buffers
        self._scratch = bytearray(_SCRATCH)
        self._mv = memoryview(self._scratch)
        self._start = 0  # first unread byte in scratch
        self._end = 0  # end of data in scratch
        self.frames: deque[Frame] = deque()  # whole frames not yet taken (``next_frame``)
        # state of the frame being decoded
        self._hdr: tuple[int, int, int, int] | None = None
        self._sizes: list[int] | None = None
        self._parts: list[bytearray | bytes | np.ndarray] = []
        self._target: bytearray | np.ndarray | None = None
        self._filled = 0
        self._direct = False
        self.broken: RemoteProtocolError | None = None
        self.skip: frozenset[int] = frozenset()  # codes dropped on arrival (heartbeats)
        #: A dropped code whose body is a u64 count kept in ``note`` (the latest one).
        self.note_code = -1
        self.note = 0

    def set_limits(self, max_frame: int, max_buffers: int) -> None:
        """Changes the limits (after authentication); applies from the next frame header."""
        self.max_frame = max_frame
        self.max_buffers = max_buffers

    # -- the reading side ------------------------------------------------------------
    def buffer(self) -> memoryview:
        """Writable memory into which the caller should read the next bytes (never empty)."""
        if self._target is not None and self._start == self._end:
            rest = len(self._target) - self._filled
            if rest >= DIRECT_MIN:
                self._direct = True
                return memoryview(self._target)[self._filled :]  # type: ignore[arg-type]  # ndarray: a buffer
        self._direct = False
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._scratch) - self._end < 4096:
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start : self._end]
            self._start, self._end = 0, n
        return self._mv[self._end :]

    def commit(self, n: int) -> None:
        """``n`` bytes were written into the memory last returned by ``buffer()``.

        Raises:
            RemoteProtocolError: the bytes so far do not form a valid frame. The decoder is
                then broken for good; the link must be closed.
        """
        if self._direct:
            self._filled += n
            self._process()
            return
        end = self._end = self._end + n
        start = self._start
        if self._hdr is None and end - start >= HEADER.size and self.broken is None:
            # fast path: exactly one whole small frame without buffers
            code, flags, nbuf, body_len = HEADER.unpack_from(self._scratch, start)
            if (
                not nbuf
                and start + HEADER.size + body_len == end
                and HEADER.size + body_len <= self.max_frame
            ):
                if code not in self.skip:
                    self.frames.append(
                        Frame(code, flags, bytes(self._mv[start + HEADER.size : end]))
                    )
                elif code == self.note_code and body_len == 8:
                    self.note = int.from_bytes(self._mv[start + HEADER.size : end], "big")
                self._start = end
                return
        self._process()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copies ``data`` in (a convenience over ``buffer``/``commit``)."""
        mv = memoryview(data).cast("B")
        while mv.nbytes:
            buf = self.buffer()
            k = min(buf.nbytes, mv.nbytes)
            buf[:k] = mv[:k]
            mv = mv[k:]
            self.commit(k)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or ``None`` when more bytes are needed."""
        return self.frames.popleft() if self.frames else None

    @property
    def direct(self) -> bool:
        """Whether the memory last returned by ``buffer()`` is a large part's own buffer
        (not the scratch buffer of small frames)."""
        return self._direct

    def has_frame(self) -> bool:
        """Whether ``next_frame()`` would return a frame."""
        return bool(self.frames)

    def mid_frame(self) -> bool:
        """Whether part of a frame has been received (EOF now would cut it)."""
        return self._hdr is not None or self._start != self._end

    # -- parsing ---------------------------------------------------------------------
    def _fail(self, why: str) -> None:
        self.broken = RemoteProtocolError(why)
        raise self.broken

    def _process(self) -> None:  # noqa: C901
        if self.broken is not None:
            raise self.broken
        sc = self._scratch
        # fast path: whole small frames without buffers sitting in scratch
        while self._hdr is None and self._end - self._start >= HEADER.size:
            code, flags, nbuf, body_len = HEADER.unpack_from(sc, self._start)
            end = self._start + HEADER.size + body_len
            if nbuf or end > self._end or HEADER.size + body_len > self.max_frame:
                break
            if code not in self.skip:
                self.frames.append(Frame(code, flags, bytes(sc[self._start + HEADER.size : end])))
            elif code == self.note_code and body_len == 8:
                self.note = int.from_bytes(sc[self._start + HEADER.size : end], "big")
            self._start = end
        while True:
            avail = self._end - self._start
            if self._hdr is None:
                if avail < HEADER.size:
                    return
                code, flags, nbuf, body_len = HEADER.unpack_from(sc, self._start)
                self._start += HEADER.size
                if nbuf > self.max_buffers:
                    self._fail(f"frame has {nbuf} buffers, limit {self.max_buffers}")
                if HEADER.size + 8 * nbuf + body_len > self.max_frame:
                    self._fail(
                        f"frame body of {body_len} bytes exceeds the limit of {self.max_frame}"
                    )
                self._hdr = (code, flags, nbuf, body_len)
                self._sizes = None
                continue
            if self._sizes is None:
                nbuf, body_len = self._hdr[2], self._hdr[3]
                need = 8 * nbuf
                if avail < need:
                    if len(sc) < need:  # at most 512 KiB, already bounded by max_buffers
                        self._grow(need)
                        sc = self._scratch
                    return
                sizes = [body_len]
                total = HEADER.size + need + body_len
                for k in range(nbuf):
                    (size,) = LENGTH.unpack_from(sc, self._start + 8 * k)
                    total += size
                    if total > self.max_frame:
                        self._fail(f"frame of more than {self.max_frame} bytes exceeds the limit")
                    sizes.append(size)
                self._start += need
                self._sizes = sizes
                self._parts = []
                continue
            # payload parts: body, then each buffer
            k = len(self._parts)
            if k == len(self._sizes):
                code, flags, _, _ = self._hdr
                body = self._parts[0]
                if code not in self.skip:
                    self.frames.append(Frame(code, flags, body, self._parts[1:]))  # type: ignore[arg-type]
                elif code == self.note_code and len(body) == 8 and not self._parts[1:]:
                    self.note = int.from_bytes(body, "big")
                self._hdr = self._sizes = None
                self._parts = []
                continue
            size = self._sizes[k]
            if self._target is None:
                if avail >= size:  # whole part is here: slice it out of scratch
                    part = sc[self._start : self._start + size]
                    self._start += size
                    self._parts.append(part if k else bytes(part))
                    continue
                self._target = self._alloc(size)
                self._filled = 0
            take = min(avail, size - self._filled)
            if take:
                view = memoryview(self._target)  # type: ignore[arg-type]
                view[self._filled : self._filled + take] = sc[self._start : self._start + take]
                self._start += take
                self._filled += take
            if self._filled < size:
                return
            self._parts.append(self._target)
            self._target = None

    def _grow(self, need: int) -> None:
        n = self._end - self._start
        new = bytearray(max(need, len(self._scratch)))
        new[:n] = self._scratch[self._start : self._end]
        self._scratch, self._start, self._end = new, 0, n
        self._mv = memoryview(new)
