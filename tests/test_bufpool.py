"""The pool of large receive buffers: reuse only after the value is gone, limits, idle trim."""

from __future__ import annotations

import gc
import pickle
import threading
from collections.abc import Callable

import numpy as np
import pytest

from parnet.transport import bufpool
from parnet.transport.bufpool import BufferPool
from parnet.wire.framing import FrameDecoder, encode_frame

MB = 1 << 20


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_memory_is_reused_only_after_the_value_is_gone() -> None:
    p = BufferPool()
    a = p.take(8 * MB)
    first = _addr(a)
    b = p.take(8 * MB)
    assert _addr(b) != first  # a is alive: its memory is not handed out again
    del a
    c = p.take(8 * MB)
    assert _addr(c) == first
    assert c.nbytes == 8 * MB and c.dtype == np.uint8 and c.flags.writeable


@pytest.mark.parametrize(
    "derive",
    [
        lambda a: np.frombuffer(a, dtype=np.float64).reshape(-1, 2),  # what unpickling builds on it
        lambda a: memoryview(a)[100:],
        lambda a: a[10:20],
    ],
    ids=["frombuffer", "memoryview", "slice"],
)
def test_a_value_built_on_the_buffer_keeps_the_memory(
    derive: Callable[[np.ndarray], object],
) -> None:
    p = BufferPool()
    a = p.take(8 * MB)
    first = _addr(a)
    value = derive(a)
    del a
    other = p.take(8 * MB)
    assert _addr(other) != first  # the value is alive: its memory is not handed out again
    del value
    assert _addr(p.take(8 * MB)) == first


def test_sizes_match_within_the_slack() -> None:
    p = BufferPool()
    a = p.take(16 * MB)
    first = _addr(a)
    del a
    small = p.take(4 * MB)
    assert _addr(small) != first  # far smaller: a fresh block, the big one stays
    d = p.take(15 * MB)  # a little smaller: reuses the block
    assert _addr(d) == first and d.nbytes == 15 * MB
    del d
    big = p.take(17 * MB)
    assert _addr(big) != first  # larger never fits


def test_idle_blocks_are_released() -> None:
    p = BufferPool()
    a = p.take(8 * MB)
    del a
    assert p.held() == 8 * MB
    import time

    p.trim(time.monotonic() + bufpool.IDLE_S + 1)
    assert p.held() == 0


def test_limits_on_blocks_kept() -> None:
    p = BufferPool()
    blocks = [p.take(4 * MB + k * 4096) for k in range(bufpool.MAX_BLOCKS + 3)]
    assert len(p._blocks) == bufpool.MAX_BLOCKS  # the rest are left to their users
    del blocks
    gc.collect()
    assert p.held() <= bufpool.MAX_BLOCKS * 5 * MB


def test_return_from_another_thread() -> None:
    p = BufferPool()
    box = [p.take(8 * MB)]
    first = _addr(box[0])
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    assert _addr(p.take(8 * MB)) == first


def test_decoder_receives_large_buffers_into_pooled_memory() -> None:
    a = np.arange(bufpool.POOL_MIN // 8 + 5, dtype=np.float64)
    bufs: list[pickle.PickleBuffer] = []
    body = pickle.dumps(a, protocol=5, buffer_callback=bufs.append)
    dec = FrameDecoder(1 << 30, alloc=bufpool.alloc)
    for piece in encode_frame(40, body, [b.raw() for b in bufs]):
        dec.feed(piece)
    f = dec.next_frame()
    assert f is not None
    out = pickle.loads(f.body, buffers=f.buffers)
    np.testing.assert_array_equal(out, a)
    # pooled memory: once the value is gone, the next large receive lands in the same block
    first = _addr(f.buffers[0])
    del out, f
    for piece in encode_frame(40, body, [b.raw() for b in bufs]):
        dec.feed(piece)
    g = dec.next_frame()
    assert g is not None
    assert _addr(g.buffers[0]) == first
