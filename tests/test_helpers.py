"""fsave / fload framing over pipes and files, and Octave-style select."""

from __future__ import annotations

import io
import os
import socket
import struct
import threading

import numpy as np
import pytest

from parnet.errors import ParnetError, ProtocolError
from parnet.helpers import fload, fsave, select


def _values() -> list[object]:
    k = 7
    return [
        42,
        "text",
        {"a": [1, 2.5, None], "b": (True, b"bytes")},
        np.arange(12, dtype=np.int16).reshape(3, 4),
        np.linspace(0, 1, 100_000),  # 800 kB: out-of-band, bigger than a pipe's buffer
        np.arange(20.0)[::3],  # not contiguous
        lambda x: x * k,
    ]


def _check(back: list[object]) -> None:
    want = _values()
    assert back[:3] == want[:3]
    for got, exp in zip(back[3:6], want[3:6], strict=True):
        assert isinstance(got, np.ndarray)
        assert got.dtype == exp.dtype and np.array_equal(got, exp)  # type: ignore[union-attr]
    assert back[6](6) == 42  # type: ignore[operator]
    back[4][0] = 5.0  # type: ignore[index]  # loaded arrays are writable


def test_bytesio_several_values_then_eof() -> None:
    buf = io.BytesIO()
    for v in _values():
        fsave(buf, v)
    buf.seek(0)
    _check([fload(buf) for _ in range(7)])
    with pytest.raises(EOFError):
        fload(buf)


def test_pipe_fds_with_a_writer_thread() -> None:
    r, w = os.pipe()
    try:

        def writer() -> None:
            for v in _values():
                fsave(w, v)
            os.close(w)

        t = threading.Thread(target=writer)
        t.start()
        back = [fload(r) for _ in range(7)]
        t.join(30)
        _check(back)
        with pytest.raises(EOFError):
            fload(r)
    finally:
        os.close(r)


def test_buffered_file_objects(tmp_path) -> None:
    path = tmp_path / "values.bin"
    with open(path, "wb") as f:
        fsave(f, [1, 2])
        fsave(f, np.eye(2))
    with open(path, "rb") as f:
        assert fload(f) == [1, 2]
        assert np.array_equal(fload(f), np.eye(2))
        with pytest.raises(EOFError):
            fload(f)
    r, w = os.pipe()
    with os.fdopen(w, "wb") as wf, os.fdopen(r, "rb") as rf:
        fsave(wf, "flushed")  # fsave flushes, so the reader sees it now
        assert fload(rf) == "flushed"


class _ReadOnly:
    """A stream with read() only."""

    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._b.read(min(n, 3))  # short reads


def test_stream_with_only_read() -> None:
    buf = io.BytesIO()
    fsave(buf, {"x": np.arange(3)})
    fsave(buf, "second")
    s = _ReadOnly(buf.getvalue())
    assert np.array_equal(fload(s)["x"], np.arange(3))
    assert fload(s) == "second"


def test_truncated_and_garbled_frames() -> None:
    buf = io.BytesIO()
    fsave(buf, np.arange(1000))
    data = buf.getvalue()
    for cut in (1, 10, 16, len(data) // 2, len(data) - 1):
        with pytest.raises(ProtocolError, match="truncated"):
            fload(io.BytesIO(data[:cut]))
    with pytest.raises(ProtocolError, match="not an fsave frame"):
        fload(io.BytesIO(b"XXXX" + data[4:]))
    small = io.BytesIO()
    fsave(small, "hello")
    raw = bytearray(small.getvalue())
    raw[-3:] = b"\xff\xfe\xfd"
    with pytest.raises(ProtocolError, match="garbled"):
        fload(io.BytesIO(bytes(raw)))
    huge = struct.pack("!4sIQ", b"PNF5", 0, 1 << 62)
    with pytest.raises(ProtocolError, match="limits"):
        fload(io.BytesIO(huge))
    assert issubclass(ProtocolError, ParnetError)


def test_wrong_stream_types() -> None:
    with pytest.raises(TypeError):
        fsave(io.StringIO(), 1)
    with pytest.raises(TypeError):
        fsave(object(), 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fload(io.StringIO("x"))
    with pytest.raises(TypeError):
        fsave(io.BytesIO(), threading.Lock())


def test_select_on_a_pipe() -> None:
    r, w = os.pipe()
    try:
        assert select([r], [], [], 0) == (0, [], [], [])
        assert select([r], [w], [], 0) == (1, [], [0], [])
        assert select([r], [], [], 0.01) == (0, [], [], [])  # times out
        os.write(w, b"x")
        assert select([w, r], [w], [], 0) == (2, [1], [0], [])
        assert select([r, r], [], [], -1) == (2, [0, 1], [], [])  # negative: no limit
        assert select([r], [], [], None) == (1, [0], [], [])
        os.read(r, 1)
        assert select([r], [], [r], 0) == (0, [], [], [])
        os.close(w)
        w = -1
        assert select([r], [], [], 0) == (1, [0], [], [])  # end of file is readable
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_select_objects_and_nfds() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert select([a, b], [], [], 0) == (0, [], [], [])
        b.sendall(b"hi")
        n, ridx, widx, eidx = select([b, a], [a], [], 5)
        assert (n, ridx, widx, eidx) == (2, [1], [0], [])
        fd = max(a.fileno(), b.fileno())
        with pytest.raises(ValueError, match="nfds"):
            select([a, b], [], [], 0, nfds=fd)
        assert select([a], [], [], 0, nfds=fd + 1)[1] == [0]
    with pytest.raises(ValueError):
        select([-1], [], [], 0)
