"""Hypothesis on FrameDecoder: it yields frames or raises RemoteProtocolError, nothing else.

Two decoders: the pre-authentication one (4 KiB, no buffers) and a 1 MiB one. Input is fed
in random pieces, through ``feed`` and through ``buffer()``/``commit()``. Valid frames have an
exact oracle (every frame up to the first one over a limit comes out unchanged); random and
corrupted bytes only have the invariant.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parnet.errors import RemoteProtocolError
from parnet.wire.framing import DIRECT_MIN, HEADER, LENGTH, Frame, FrameDecoder, frame_bytes

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

DECODERS = {"pre-auth": (4096, 0), "1MiB": (1 << 20, 0xFFFF)}
decoder_params = pytest.mark.parametrize("limits", DECODERS.values(), ids=DECODERS.keys())


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


buffers_st = st.one_of(
    st.binary(max_size=200),
    st.builds(
        pattern, st.sampled_from([DIRECT_MIN - 1, DIRECT_MIN + 7, 100_000]), st.integers(0, 99)
    ),
)
frame_st = st.tuples(
    st.integers(0, 255),
    st.integers(0, 255),
    st.one_of(
        st.binary(max_size=300), st.builds(pattern, st.sampled_from([4089, 70_000]), st.just(1))
    ),
    st.lists(buffers_st, max_size=4),
)
pieces_st = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 70_000)), max_size=30)
how_st = st.sampled_from(["feed", "buffer"])


def run(dec: FrameDecoder, data: bytes, pieces: list[int], how: str) -> tuple[list[Frame], bool]:
    """Feeds ``data`` in pieces; returns (frames, whether RemoteProtocolError was raised).

    The piece sizes are used once each (fine splits near the start, where the headers are);
    the rest goes in 256 KiB pieces.

    Any other exception propagates and fails the test.
    """
    frames: list[Frame] = []
    pos = 0
    k = 0
    try:
        while pos < len(data):
            n = min(pieces[k] if k < len(pieces) else 1 << 18, len(data) - pos)
            k += 1
            if how == "feed":
                dec.feed(data[pos : pos + n])
            else:
                buf = dec.buffer()
                assert buf.nbytes > 0
                n = min(n, buf.nbytes)
                buf[:n] = data[pos : pos + n]
                dec.commit(n)
            pos += n
            while (f := dec.next_frame()) is not None:
                frames.append(f)
    except RemoteProtocolError:
        frames.extend(iter(dec.next_frame, None))
        # and it stays broken
        with pytest.raises(RemoteProtocolError):
            dec.feed(frame_bytes(1, b"x"))
        return frames, True
    return frames, False


def frame_size(body: bytes, bufs: list[bytes]) -> int:
    return HEADER.size + LENGTH.size * len(bufs) + len(body) + sum(map(len, bufs))


def assert_within(frames: list[Frame], max_frame: int, max_buffers: int) -> None:
    for f in frames:
        assert 0 <= f.code <= 255 and 0 <= f.flags <= 255
        assert len(f.buffers) <= max_buffers
        assert frame_size(bytes(f.body), [bytes(b) for b in f.buffers]) <= max_frame


@decoder_params
@FUZZ
@given(frames=st.lists(frame_st, min_size=1, max_size=5), pieces=pieces_st, how=how_st)
def test_valid_frames_decode_exactly(
    limits: tuple[int, int], frames: list, pieces: list[int], how: str
) -> None:
    max_frame, max_buffers = limits
    data = b"".join(
        frame_bytes(c, b, [memoryview(x) for x in bufs], fl) for c, fl, b, bufs in frames
    )
    expected = []
    for c, fl, b, bufs in frames:
        if len(bufs) > max_buffers or frame_size(b, bufs) > max_frame:
            break
        expected.append((c, fl, b, bufs))
    got, failed = run(FrameDecoder(max_frame, max_buffers), data, pieces, how)
    assert failed == (len(expected) < len(frames))
    assert [
        (f.code, f.flags, bytes(f.body), [bytes(x) for x in f.buffers]) for f in got
    ] == expected


@decoder_params
@FUZZ
@given(data=st.binary(max_size=3000), pieces=pieces_st, how=how_st)
def test_random_bytes(limits: tuple[int, int], data: bytes, pieces: list[int], how: str) -> None:
    frames, _ = run(FrameDecoder(*limits), data, pieces, how)
    assert_within(frames, *limits)


@decoder_params
@FUZZ
@given(
    frames=st.lists(frame_st, min_size=1, max_size=4),
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6
    ),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    insert=st.binary(max_size=20),
    pieces=pieces_st,
    how=how_st,
)
def test_corrupted_frames(
    limits: tuple[int, int],
    frames: list,
    edits: list[tuple[float, int]],
    cut: float | None,
    insert: bytes,
    pieces: list[int],
    how: str,
) -> None:
    data = bytearray(
        b"".join(frame_bytes(c, b, [memoryview(x) for x in bufs], fl) for c, fl, b, bufs in frames)
    )
    # corruption aimed mostly at the headers: positions are taken within the first 64 bytes
    # of the stream half the time, anywhere otherwise
    for k, (where, value) in enumerate(edits):
        span = min(len(data), 64) if k % 2 == 0 else len(data)
        data[int(where * span)] = value
    pos = int(len(data) * (cut if cut is not None else 0.5))
    data[pos:pos] = insert
    if cut is not None:
        del data[int(len(data) * cut) :]
    got, _ = run(FrameDecoder(*limits), bytes(data), pieces, how)
    assert_within(got, *limits)


@FUZZ
@given(
    code=st.integers(0, 255),
    nbuf=st.integers(0, 0xFFFF),
    body_len=st.integers(0, 2**32 - 1),
    lengths=st.lists(st.integers(0, 2**64 - 1), max_size=4),
)
def test_random_headers_pre_auth(code: int, nbuf: int, body_len: int, lengths: list[int]) -> None:
    """Any header the pre-auth decoder accepts announces a frame within its 4 KiB."""
    dec = FrameDecoder(4096, 0)
    head = HEADER.pack(code, 0, nbuf, body_len) + b"".join(LENGTH.pack(n) for n in lengths)
    try:
        dec.feed(head)
    except RemoteProtocolError:
        assert nbuf > 0 or HEADER.size + body_len > 4096
        return
    assert nbuf == 0 and HEADER.size + body_len <= 4096
