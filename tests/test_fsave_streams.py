"""fsave / fload at the edges of their streams: Fortran-ordered arrays and large in-band pickles
round-trip, non-blocking streams that are full or empty raise BlockingIOError, values over
the buffer limit are refused before anything is written, a header announcing too much is
refused before reading it, and select reports a closed descriptor."""

from __future__ import annotations

import fcntl
import io
import os
import struct

import numpy as np
import pytest

from parnet.constants import MAX_BUFFERS, MAX_FRAME
from parnet.errors import ProtocolError
from parnet.helpers import fload, fsave, select


def nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    for fd in (r, w):
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return r, w


class ReadOnly:
    """A stream with only ``read``, which may have nothing yet (None), like a raw socket."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data

    def read(self, n: int) -> bytes | None:
        if self.data is None:
            return None
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_fortran_ordered_array_round_trips() -> None:
    a = np.asfortranarray(np.arange(24.0).reshape(4, 6))
    buf = io.BytesIO()
    fsave(buf, a)
    back = fload(io.BytesIO(buf.getvalue()))
    assert np.array_equal(back, a) and back.flags.f_contiguous


def test_large_in_band_pickle_round_trips() -> None:
    value = {"text": "x" * 200_000, "ints": list(range(10_000))}  # no out-of-band buffer
    buf = io.BytesIO()
    fsave(buf, value)
    fsave(buf, "next")
    s = io.BytesIO(buf.getvalue())
    assert fload(s) == value and fload(s) == "next"


def test_full_nonblocking_stream() -> None:
    r, w = nonblocking_pipe()
    raw = io.FileIO(w, "wb", closefd=False)
    try:
        with pytest.raises(BlockingIOError, match="fsave: the stream is non-blocking and full"):
            fsave(raw, np.zeros(1 << 20))  # 8 MB: more than a pipe holds
    finally:
        raw.close()
        os.close(r)
        os.close(w)


def test_empty_nonblocking_stream() -> None:
    r, w = nonblocking_pipe()
    raw = io.FileIO(r, "rb", closefd=False)
    try:
        with pytest.raises(BlockingIOError, match="fload: the stream is non-blocking and has no"):
            fload(raw)
        with pytest.raises(BlockingIOError, match="has no data yet"):
            fload(ReadOnly(None))
        fsave(w, [1, "two"])  # an int fd
        assert fload(raw) == [1, "two"]
    finally:
        raw.close()
        os.close(r)
        os.close(w)


def test_too_many_buffers_is_refused_before_writing() -> None:
    buf = io.BytesIO()
    parts = [np.zeros(1) for _ in range(MAX_BUFFERS + 1)]  # one out-of-band buffer each
    with pytest.raises(ValueError, match=rf"in {MAX_BUFFERS + 1} buffers exceeds the limits"):
        fsave(buf, parts)
    assert buf.getvalue() == b""


def test_header_announcing_too_much_is_refused_unread() -> None:
    head = struct.pack("!4sIQ", b"PNF5", 2, 10) + struct.pack("!2Q", MAX_FRAME, 1)
    s = io.BytesIO(head + b"never read")
    with pytest.raises(ProtocolError, match=rf"frame of {MAX_FRAME + 11} bytes over the limit"):
        fload(s)
    assert s.read() == b"never read"


def test_select_reports_a_closed_descriptor() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(OSError, match=f"select: descriptor {r} is not open") as info:
        select([r], [], [], 0)
    assert info.value.errno == 9
