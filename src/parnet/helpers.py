"""fsave / fload / select: moving values over local streams, and waiting on them.

Theory of operation
-------------------
``fsave`` writes one self-delimiting frame per value, so several values can follow each
other on one stream or pipe and ``fload`` reads back exactly one::

    magic b"PNF5" | nbuf: u32 | pickle length: u64 | nbuf x buffer length: u64
    | pickle bytes | buffer 0 | buffer 1 | ...                       (big-endian)

The body is pickle protocol 5 made by cloudpickle (lambdas and closures work); large
contiguous buffers (NumPy arrays) go out-of-band, written straight from the array's memory
and read straight into fresh buffers, so a big array is not copied into the pickle. Every
length is checked against ``constants.MAX_FRAME`` / ``MAX_BUFFERS`` before anything is
allocated. ``fload`` raises ``EOFError`` when the stream ends cleanly before a frame, and
``ProtocolError`` on a bad magic, a frame cut short, or a body that does not unpickle.

``fload`` unpickles, which runs code chosen by whoever wrote the stream: use it on streams
you trust (your own pipes and files), as with ``pickle``.

``select`` is Octave's interface over ``poll(2)`` (no ``FD_SETSIZE`` limit): it returns
0-based indices into the lists given, not descriptors.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import select as _select
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import cloudpickle

from parnet.constants import MAX_BUFFERS, MAX_FRAME
from parnet.errors import ProtocolError

__all__ = ["fload", "fsave", "select"]

_MAGIC = b"PNF5"
_HEAD = struct.Struct("!4sIQ")  # magic, number of buffers, pickle length
_LEN = struct.Struct("!Q")


class _Writable(Protocol):
    def write(self, data: Any, /) -> Any: ...


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> Any: ...


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _writer(file: Any) -> Callable[[memoryview], int | None]:
    if isinstance(file, int):
        return lambda mv: os.write(file, mv)
    write = getattr(file, "write", None)
    if write is None:
        raise TypeError(
            f"fsave needs a binary stream with write() or an int fd, got {type(file).__name__}"
        )
    if isinstance(file, io.TextIOBase):
        raise TypeError("fsave needs a binary stream, got a text stream")
    return write


def _write_all(write: Callable[[memoryview], int | None], data: Any) -> None:
    mv = memoryview(data).cast("B")
    while len(mv):
        n = write(mv)
        if n is None:  # a non-blocking raw stream that took nothing
            raise BlockingIOError("fsave: the stream is non-blocking and full")
        mv = mv[n:]


def fsave(file: _Writable | int, value: Any) -> None:
    """Saves one value to a binary stream, to be read back with ``fload``.

    Values saved one after another on the same stream are read back one by one. The stream
    is flushed (if it has ``flush``) so that a reader on a pipe sees the value.

    Args:
        file: a binary file object (anything with ``write``) or an int file descriptor.
        value: any value cloudpickle can pickle (functions and lambdas included).

    Raises:
        TypeError: ``file`` is not a binary stream or fd.
        pickle.PicklingError, TypeError: ``value`` cannot be pickled (nothing is written).
        ValueError: the value is larger than ``constants.MAX_FRAME``.
        OSError: the write failed.
    """
    write = _writer(file)
    buffers: list[pickle.PickleBuffer] = []
    body = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raws: list[memoryview] = []
    for b in buffers:
        try:
            raws.append(b.raw())
        except BufferError:  # not contiguous: send a contiguous copy
            raws.append(memoryview(bytes(memoryview(b))))
    total = len(body) + sum(r.nbytes for r in raws)
    if total > MAX_FRAME or len(raws) > MAX_BUFFERS:
        raise ValueError(
            f"fsave: value of {total} bytes in {len(raws)} buffers exceeds the "
            f"limits ({MAX_FRAME} bytes, {MAX_BUFFERS} buffers)"
        )
    head = bytearray(_HEAD.pack(_MAGIC, len(raws), len(body)))
    for r in raws:
        head += _LEN.pack(r.nbytes)
    if len(body) < 65536:
        head += body
        _write_all(write, head)
    else:
        _write_all(write, head)
        _write_all(write, body)
    for r in raws:
        _write_all(write, r)
    flush = getattr(file, "flush", None)
    if flush is not None:
        flush()


def _reader(file: Any) -> tuple[Callable[[memoryview], int | None], Callable[[], None]]:
    """Returns ``(readinto, close)`` for an fd or a binary file object."""
    if isinstance(file, int):
        raw = io.FileIO(file, "rb", closefd=False)
        return raw.readinto, raw.close
    readinto = getattr(file, "readinto", None)
    if readinto is not None and not isinstance(file, io.TextIOBase):
        return readinto, lambda: None
    read = getattr(file, "read", None)
    if read is None or isinstance(file, io.TextIOBase):
        raise TypeError(f"fload needs a binary stream or an int fd, got {type(file).__name__}")

    def readinto_via_read(mv: memoryview) -> int:
        data = read(len(mv))
        if data is None:
            return None  # type: ignore[return-value]
        mv[: len(data)] = data
        return len(data)

    return readinto_via_read, lambda: None


def _read_exactly(
    readinto: Callable[[memoryview], int | None], n: int, at_start: bool = False
) -> bytearray:
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = readinto(mv[got:])
        if k is None:
            raise BlockingIOError("fload: the stream is non-blocking and has no data yet")
        if k == 0:
            if at_start and got == 0:
                raise EOFError("fload: end of stream")
            raise ProtocolError(f"fload: truncated frame (stream ended after {got} of {n} bytes)")
        got += k
    return buf


def fload(file: _Readable | int) -> Any:
    """Loads one value saved with ``fsave``, reading exactly its frame from the stream.

    Only for trusted streams: unpickling runs code chosen by the writer.

    Args:
        file: a binary file object (``readinto`` or ``read``) or an int file descriptor.

    Returns:
        The value.

    Raises:
        EOFError: the stream ended cleanly before a frame (no more values).
        ProtocolError: not an fsave frame, a frame cut short, a length over the limits, or a
            body that does not unpickle. The stream's position is then undefined.
        ImportError, AttributeError: the value needs a module or name this process lacks.
    """
    readinto, close = _reader(file)
    try:
        head = _read_exactly(readinto, _HEAD.size, at_start=True)
        magic, nbuf, plen = _HEAD.unpack(head)
        if magic != _MAGIC:
            raise ProtocolError(f"fload: not an fsave frame (magic {bytes(magic)!r})")
        if nbuf > MAX_BUFFERS or plen > MAX_FRAME:
            raise ProtocolError(
                f"fload: frame header over the limits ({nbuf} buffers, pickle of {plen} bytes)"
            )
        lens = struct.unpack(f"!{nbuf}Q", _read_exactly(readinto, 8 * nbuf)) if nbuf else ()
        if plen + sum(lens) > MAX_FRAME:
            raise ProtocolError(
                f"fload: frame of {plen + sum(lens)} bytes over the limit {MAX_FRAME}"
            )
        body = _read_exactly(readinto, plen)
        buffers = [_read_exactly(readinto, ln) for ln in lens]
    finally:
        close()
    try:
        return pickle.loads(body, buffers=buffers)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        struct.error,
        MemoryError,
    ) as e:
        raise ProtocolError(f"fload: garbled frame: {type(e).__name__}: {e}") from e


def _fd(x: int | _HasFileno) -> int:
    fd = x if isinstance(x, int) else x.fileno()
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise ValueError(f"select: not a file descriptor: {x!r}")
    return fd


def select(
    read_fds: Sequence[int | _HasFileno],
    write_fds: Sequence[int | _HasFileno],
    except_fds: Sequence[int | _HasFileno],
    timeout: float | None,
    nfds: int | None = None,
) -> tuple[int, list[int], list[int], list[int]]:
    """Waits until some of the given descriptors are ready (Octave's ``select``).

    Readiness is that of the descriptor: data buffered inside a Python file object is not
    seen. End of file and errors count as readable, errors as writable, as in select(2);
    "exceptional" means urgent (priority) data.

    Args:
        read_fds: descriptors to watch for reading (ints or objects with ``fileno()``).
        write_fds: descriptors to watch for writing.
        except_fds: descriptors to watch for exceptional conditions.
        timeout: seconds; negative or ``None`` waits without limit, 0 polls.
        nfds: accepted for compatibility; if given, every descriptor must be below it.

    Returns:
        ``(n, ridx, widx, eidx)``: the number of ready entries, and the 0-based positions in
        ``read_fds``, ``write_fds`` and ``except_fds`` of the ready ones.

    Raises:
        ValueError: a descriptor is negative, not an fd, or not below ``nfds``.
        OSError: a descriptor is not open (``EBADF``).
    """
    lists = [[_fd(x) for x in read_fds], [_fd(x) for x in write_fds], [_fd(x) for x in except_fds]]
    if nfds is not None:
        for fds in lists:
            for fd in fds:
                if fd >= nfds:
                    raise ValueError(f"select: descriptor {fd} is not below nfds={nfds}")
    wanted = (_select.POLLIN | _select.POLLPRI, _select.POLLOUT, _select.POLLPRI)
    ready = (
        _select.POLLIN | _select.POLLHUP | _select.POLLERR,
        _select.POLLOUT | _select.POLLERR | _select.POLLHUP,
        _select.POLLPRI,
    )
    masks: dict[int, int] = {}
    for fds, w in zip(lists, wanted, strict=True):
        for fd in fds:
            masks[fd] = masks.get(fd, 0) | w
    poller = _select.poll()
    for fd, m in masks.items():
        poller.register(fd, m)
    if timeout is None or timeout < 0:
        ms = None
    else:
        ms = math.ceil(timeout * 1000)
    events = dict(poller.poll(ms))
    for fd, ev in events.items():
        if ev & _select.POLLNVAL:
            raise OSError(9, f"select: descriptor {fd} is not open")
    out = [
        [i for i, fd in enumerate(fds) if events.get(fd, 0) & r]
        for fds, r in zip(lists, ready, strict=True)
    ]
    return sum(len(x) for x in out), out[0], out[1], out[2]
