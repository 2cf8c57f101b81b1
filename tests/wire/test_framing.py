"""FrameDecoder / encode_frame: round trips, every split point, the direct-read path, limits.

The decoder is sans-IO, so everything here runs in memory: ``feed`` for whole chunks, and
``read_through`` to play the part of ``recv_into`` on the ``buffer()`` / ``commit()`` path.
"""

from __future__ import annotations

import random
import struct
import tracemalloc
from array import array

import pytest

from parnet.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from parnet.wire.framing import (
    DIRECT_MIN,
    HEADER,
    LENGTH,
    Frame,
    FrameDecoder,
    encode_frame,
    frame_bytes,
)

BIG_LIMIT = 16 << 30  # the default post-authentication MAX_FRAME, spelled out (env-independent)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible, non-repeating-looking bytes."""
    return random.Random(seed).randbytes(n)


def raw_header(
    code: int, flags: int, nbuf: int, body_len: int, lengths: tuple[int, ...] = ()
) -> bytes:
    """A hand-built header (and length table) that ``encode_frame`` would refuse to make."""
    return HEADER.pack(code, flags, nbuf, body_len) + b"".join(LENGTH.pack(n) for n in lengths)


def decode_all(dec: FrameDecoder) -> list[Frame]:
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


def read_through(dec: FrameDecoder, data: bytes, sizes: list[int] | None = None) -> list:
    """Reads ``data`` into ``dec.buffer()`` at most ``sizes[k]`` bytes a time, like recv_into.

    Returns the memoryviews ``buffer()`` handed out (to check where the bytes went).
    """
    views = []
    pos = 0
    k = 0
    while pos < len(data):
        buf = dec.buffer()
        assert buf.nbytes > 0, "buffer() must never be empty"
        views.append(buf)
        want = sizes[k % len(sizes)] if sizes else len(data)
        k += 1
        n = min(buf.nbytes, want, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        dec.commit(n)
    return views


def assert_frame(f: Frame, code: int, body: bytes, buffers: list[bytes], flags: int = 0) -> None:
    assert (f.code, f.flags) == (code, flags)
    assert bytes(f.body) == body
    assert [bytes(b) for b in f.buffers] == [bytes(b) for b in buffers]
    assert all(not memoryview(b).readonly for b in f.buffers)  # writable, for zero-copy loads


# -- round trips ------------------------------------------------------------------------

ROUND_TRIP_CASES = {
    "empty": (b"", []),
    "body only": (b"hello", []),
    "one buffer": (b"hdr", [b"x" * 100]),
    "several with empties": (b"abc", [b"", b"a", b"", b"bcdefg", b""]),
    "only empty buffers": (b"", [b"", b""]),
    "big body": (pattern(100_000, 1), []),
    "big buffer": (b"h", [pattern(200_000, 2)]),
    "mixed": (pattern(70_000, 3), [pattern(DIRECT_MIN + 1, 4), b"", b"tiny", pattern(300_000, 5)]),
}


@pytest.mark.parametrize("body,buffers", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
@pytest.mark.parametrize("how", ["feed", "read_through"])
def test_round_trip(body: bytes, buffers: list[bytes], how: str) -> None:
    data = frame_bytes(42, body, [memoryview(b) for b in buffers], flags=7)
    dec = FrameDecoder(max_frame=BIG_LIMIT)
    if how == "feed":
        dec.feed(data)
    else:
        read_through(dec, data)
    assert dec.has_frame()
    [f] = decode_all(dec)
    assert_frame(f, 42, body, buffers, flags=7)
    assert not dec.has_frame() and not dec.mid_frame()


def test_encode_frame_pieces_refer_to_the_original_buffers() -> None:
    big = bytearray(pattern(DIRECT_MIN * 2))
    pieces = encode_frame(30, b"body", [memoryview(big), memoryview(b"")])
    # small header and body joined into one piece; the empty buffer adds no piece
    assert len(pieces) == 2
    assert isinstance(pieces[1], memoryview) and pieces[1].obj is big  # zero-copy send side


def test_encode_frame_casts_typed_buffers_to_bytes() -> None:
    ints = array("i", range(1000))
    data = frame_bytes(30, b"", [memoryview(ints)])
    dec = FrameDecoder(max_frame=1 << 20)
    dec.feed(data)
    [f] = decode_all(dec)
    assert f.buffers == [bytearray(ints.tobytes())]


@pytest.mark.parametrize(
    "body",
    [
        memoryview(array("i", [1, 2, 3])),  # 3 items, 12 bytes
        memoryview(array("d", range(10_000))),  # over the 64 KiB join limit
        memoryview(bytes(range(24))).cast("B", (4, 6)),  # 2-D
        memoryview(bytes(range(100)))[::3],  # not contiguous
    ],
    ids=["int", "big double", "2-D", "strided"],
)
def test_encode_frame_typed_memoryview_body(body: memoryview) -> None:
    """Regression: the length field once took len(body), the item count, not the byte size."""
    dec = FrameDecoder(max_frame=1 << 20)
    dec.feed(frame_bytes(5, body) + frame_bytes(6, b"next"))  # type: ignore[arg-type]
    frames = decode_all(dec)
    assert [bytes(f.body) for f in frames] == [body.tobytes(), b"next"]


@pytest.mark.parametrize(
    "buf",
    [
        memoryview(bytes(range(100)))[::2],
        memoryview(array("i", range(100)))[::2],
    ],
    ids=["strided bytes", "strided ints"],
)
def test_encode_frame_non_contiguous_buffer(buf: memoryview) -> None:
    """A buffer that cannot go to sendmsg as is is either copied or refused cleanly."""
    try:
        pieces = encode_frame(30, b"", [buf])
    except LocalProtocolError:
        return
    assert all(memoryview(p).c_contiguous for p in pieces)
    dec = FrameDecoder(max_frame=1 << 20)
    dec.feed(b"".join(bytes(p) for p in pieces))
    [f] = decode_all(dec)
    assert f.buffers == [bytearray(buf.tobytes())]


def test_direct_read_path_reads_into_the_buffer_itself() -> None:
    """A buffer >= DIRECT_MIN is read by the caller straight into its final bytearray."""
    big = pattern(DIRECT_MIN * 3, 9)
    data = frame_bytes(30, b"body", [memoryview(big)])
    head_len = len(data) - len(big)
    dec = FrameDecoder(max_frame=1 << 20)
    dec.feed(data[:head_len])
    assert dec.mid_frame() and not dec.has_frame()
    views = read_through(dec, data[head_len:], sizes=[10_000])
    [f] = decode_all(dec)
    assert bytes(f.buffers[0]) == big
    # reads went into the frame's own buffer (no copy after "recv_into") until less than
    # DIRECT_MIN was left; only that tail may pass through the scratch buffer
    is_direct = [v.obj is f.buffers[0] for v in views]
    n_direct = sum(is_direct)
    assert is_direct == [True] * n_direct + [False] * (len(views) - n_direct)
    assert n_direct * 10_000 >= len(big) - DIRECT_MIN


# -- every split point ------------------------------------------------------------------

SMALL_BUFFERS = [b"", b"abc", b"", b"defgh"]
SMALL = frame_bytes(17, b"small body!", [memoryview(b) for b in SMALL_BUFFERS], flags=3)


@pytest.mark.parametrize("offset", range(len(SMALL) + 1))
def test_split_at_every_offset(offset: int) -> None:
    dec = FrameDecoder(max_frame=4096)
    dec.feed(SMALL[:offset])
    if offset < len(SMALL):
        assert not dec.has_frame() and dec.next_frame() is None
        assert dec.mid_frame() == (offset > 0)
    dec.feed(SMALL[offset:])
    [f] = decode_all(dec)
    assert_frame(f, 17, b"small body!", SMALL_BUFFERS, flags=3)
    assert not dec.mid_frame()


def test_split_two_frames_at_every_offset() -> None:
    data = SMALL + frame_bytes(18, b"second")
    for offset in range(len(data) + 1):
        dec = FrameDecoder(max_frame=4096)
        dec.feed(data[:offset])
        dec.feed(data[offset:])
        first, second = decode_all(dec)
        assert_frame(first, 17, b"small body!", SMALL_BUFFERS, flags=3)
        assert_frame(second, 18, b"second", [])


def test_dropped_codes_and_the_note_at_every_offset() -> None:
    """Dropped frames (heartbeats, notices) never reach the queue; the latest notice's u64
    count is kept in ``note``, however the bytes are split."""
    data = (
        frame_bytes(23)
        + frame_bytes(27, (5).to_bytes(8, "big"))
        + frame_bytes(30, b"value")
        + frame_bytes(27, (7).to_bytes(8, "big"))
        + frame_bytes(23)
    )
    for offset in range(len(data) + 1):
        dec = FrameDecoder(max_frame=4096)
        dec.skip = frozenset((23, 27))
        dec.note_code = 27
        dec.feed(data[:offset])
        dec.feed(data[offset:])
        [f] = decode_all(dec)
        assert (f.code, bytes(f.body)) == (30, b"value")
        assert dec.note == 7


def test_one_byte_at_a_time() -> None:
    dec = FrameDecoder(max_frame=4096)
    for k in range(len(SMALL)):
        assert not dec.has_frame()
        dec.feed(SMALL[k : k + 1])
    [f] = decode_all(dec)
    assert_frame(f, 17, b"small body!", SMALL_BUFFERS, flags=3)


def test_one_byte_at_a_time_through_buffer_commit() -> None:
    dec = FrameDecoder(max_frame=1 << 20)
    data = SMALL + frame_bytes(3, b"", [memoryview(pattern(DIRECT_MIN + 10))])
    read_through(dec, data, sizes=[1])
    first, second = decode_all(dec)
    assert_frame(first, 17, b"small body!", SMALL_BUFFERS, flags=3)
    assert bytes(second.buffers[0]) == pattern(DIRECT_MIN + 10)


def test_frames_back_to_back_in_one_feed() -> None:
    specs = [(k % 256, pattern(k * 37, k), [pattern(k, 100 + k)] * (k % 4)) for k in range(50)]
    data = b"".join(frame_bytes(c, b, [memoryview(x) for x in bufs]) for c, b, bufs in specs)
    dec = FrameDecoder(max_frame=1 << 20)
    dec.feed(data)
    frames = decode_all(dec)
    assert len(frames) == len(specs)
    for f, (c, b, bufs) in zip(frames, specs, strict=True):
        assert_frame(f, c, b, bufs)


@pytest.mark.parametrize("seed", range(20))
def test_buffer_commit_in_random_pieces(seed: int) -> None:
    rng = random.Random(seed)
    specs = []
    for k in range(rng.randint(1, 8)):
        nbuf = rng.randint(0, 4)
        sizes = [
            rng.choice([0, 1, 100, 5000, DIRECT_MIN - 1, DIRECT_MIN, 150_000]) for _ in range(nbuf)
        ]
        body = pattern(rng.choice([0, 5, 4000, 70_000]), seed * 100 + k)
        specs.append((k, body, [pattern(n, seed * 1000 + k * 10 + j) for j, n in enumerate(sizes)]))
    data = b"".join(frame_bytes(c, b, [memoryview(x) for x in bufs]) for c, b, bufs in specs)
    pieces = [rng.choice([1, 7, 100, 4096, 65_536, 300_000]) for _ in range(50)]
    dec = FrameDecoder(max_frame=1 << 22)
    read_through(dec, data, sizes=pieces)
    frames = decode_all(dec)
    assert len(frames) == len(specs)
    for f, (c, b, bufs) in zip(frames, specs, strict=True):
        assert_frame(f, c, b, bufs)
    assert not dec.mid_frame()


def test_many_buffers_length_table_larger_than_scratch() -> None:
    """A length table bigger than the 256 KiB scratch buffer (40 000 buffers) still decodes."""
    bufs = [b"%d" % (k % 10) for k in range(40_000)]
    data = frame_bytes(30, b"b", [memoryview(b) for b in bufs])
    dec = FrameDecoder(max_frame=1 << 20)
    read_through(dec, data, sizes=[50_000])
    [f] = decode_all(dec)
    assert [bytes(b) for b in f.buffers] == bufs


# -- limits -----------------------------------------------------------------------------


def test_body_at_the_limit_is_accepted() -> None:
    dec = FrameDecoder(max_frame=4096, max_buffers=0)
    dec.feed(frame_bytes(1, b"x" * (4096 - HEADER.size)))
    [f] = decode_all(dec)
    assert len(f.body) == 4096 - HEADER.size


def test_buffers_at_the_limit_are_accepted() -> None:
    dec = FrameDecoder(max_frame=1000, max_buffers=2)
    room = 1000 - HEADER.size - 2 * LENGTH.size - 4
    dec.feed(frame_bytes(30, b"body", [memoryview(b"a" * (room - 1)), memoryview(b"b")]))
    [f] = decode_all(dec)
    assert [len(b) for b in f.buffers] == [room - 1, 1]


BAD_HEADERS = {
    "body one over": (4096, 0, raw_header(1, 0, 0, 4096 - HEADER.size + 1)),
    "body 2**32-1": (1 << 20, 0xFFFF, raw_header(1, 0, 0, 2**32 - 1)),
    "body 2**32-1 pre-auth": (4096, 0, raw_header(1, 0, 0, 2**32 - 1)),
    "buffer pre-auth": (4096, 0, raw_header(1, 0, 1, 0, (1,))),
    "nbuf 65535 pre-auth": (4096, 0, raw_header(1, 0, 0xFFFF, 0)),
    "nbuf over max_buffers": (1 << 20, 3, raw_header(30, 0, 4, 0, (1, 1, 1, 1))),
    "buffer sum over": (1 << 20, 0xFFFF, raw_header(30, 0, 2, 10, (1 << 19, 1 << 19))),
    "buffer 2**32-1": (1 << 20, 0xFFFF, raw_header(30, 0, 1, 0, (2**32 - 1,))),
    "buffer 2**40": (BIG_LIMIT, 0xFFFF, raw_header(30, 0, 1, 0, (2**40,))),
    "buffer 2**64-1": (BIG_LIMIT, 0xFFFF, raw_header(30, 0, 1, 0, (2**64 - 1,))),
    "second buffer 2**64-1": (BIG_LIMIT, 0xFFFF, raw_header(30, 0, 2, 0, (10, 2**64 - 1))),
    "sum of two 2**63": (BIG_LIMIT, 0xFFFF, raw_header(30, 0, 2, 0, (2**63, 2**63))),
}


@pytest.mark.parametrize("max_frame,max_buffers,data", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_limit_rejected_without_allocating(max_frame: int, max_buffers: int, data: bytes) -> None:
    dec = FrameDecoder(max_frame=max_frame, max_buffers=max_buffers)  # scratch allocated here
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            dec.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoder allocated {peak} bytes for a rejected frame"
    assert dec.broken is not None
    assert not dec.has_frame()


def test_limit_rejected_through_buffer_commit() -> None:
    dec = FrameDecoder(max_frame=4096, max_buffers=0)
    with pytest.raises(RemoteProtocolError):
        read_through(dec, raw_header(1, 0, 0, 10_000) + b"x" * 100, sizes=[3])


def test_frames_before_the_bad_one_are_kept() -> None:
    dec = FrameDecoder(max_frame=4096, max_buffers=0)
    with pytest.raises(RemoteProtocolError):
        dec.feed(frame_bytes(1, b"ok") + raw_header(1, 0, 0, 5000))
    [f] = decode_all(dec)
    assert_frame(f, 1, b"ok", [])


def test_broken_decoder_stays_broken() -> None:
    dec = FrameDecoder(max_frame=4096, max_buffers=0)
    with pytest.raises(RemoteProtocolError) as first:
        dec.feed(raw_header(1, 0, 1, 0, (5,)))
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            dec.feed(frame_bytes(1, b"a perfectly good frame"))
        assert again.value is first.value
        with pytest.raises(RemoteProtocolError):
            dec.commit(0)
    assert dec.next_frame() is None
    assert isinstance(first.value, ProtocolError)


def test_set_limits_applies_to_the_next_header() -> None:
    dec = FrameDecoder(max_frame=4096, max_buffers=0)
    dec.feed(frame_bytes(1, b"pre-auth"))
    dec.set_limits(1 << 20, 0xFFFF)
    dec.feed(frame_bytes(30, b"x" * 10_000, [memoryview(b"buf")]))
    first, second = decode_all(dec)
    assert_frame(first, 1, b"pre-auth", [])
    assert_frame(second, 30, b"x" * 10_000, [b"buf"])
    dec.set_limits(4096, 0)
    with pytest.raises(RemoteProtocolError):
        dec.feed(frame_bytes(30, b"", [memoryview(b"buf")]))


# -- encode_frame and Frame -------------------------------------------------------------


@pytest.mark.parametrize("code,flags", [(-1, 0), (256, 0), (0, -1), (0, 256), (1000, 1000)])
def test_encode_frame_rejects_bad_code_or_flags(code: int, flags: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(code, b"", flags=flags)


def test_encode_frame_accepts_the_extremes() -> None:
    dec = FrameDecoder(max_frame=4096)
    dec.feed(frame_bytes(0, b"", flags=0) + frame_bytes(255, b"z", flags=255))
    first, second = decode_all(dec)
    assert (first.code, first.flags, second.code, second.flags) == (0, 0, 255, 255)


def test_encode_frame_rejects_too_many_buffers() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(30, b"", [memoryview(b"")] * 0x10000)


def test_encode_frame_rejects_a_body_over_4_gib() -> None:
    class Huge:  # only its length is looked at before the check fires
        def __len__(self) -> int:
            return 2**32

    with pytest.raises(LocalProtocolError):
        encode_frame(30, Huge())  # type: ignore[arg-type]


def test_frame_repr_shows_sizes_not_payload() -> None:
    f = Frame(30, 1, b"secret-password", [bytearray(b"top-secret-data"), bytearray()])
    text = repr(f)
    assert "secret" not in text
    assert "code=30" in text and "15B" in text and "[15, 0]" in text


def test_header_layout() -> None:
    """The documented wire layout: "!BBHI" header, "!Q" lengths, body, buffers."""
    data = frame_bytes(9, b"BODY", [memoryview(b"xy"), memoryview(b"")], flags=2)
    assert data == struct.pack("!BBHI", 9, 2, 2, 4) + struct.pack("!QQ", 2, 0) + b"BODY" + b"xy"
