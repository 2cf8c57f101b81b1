"""Reuse of large receive buffers.

Memory fresh from the kernel costs a page fault and a zeroed page per 4 KiB on first touch:
for an 80 MB array that is about as long as receiving it over loopback. glibc serves blocks
above 32 MB straight from ``mmap`` and unmaps them on free, so every large receive would pay
that again. This pool keeps the memory of large received values once the values are gone,
and gives it to the next receive of a similar size, already touched.

A pooled buffer is a NumPy view of a block the pool owns. Every array built on it (NumPy
collapses the ``base`` chain of views to the block) and every memoryview of it holds a
reference to the block, so a block whose only reference is the pool's is free: its old
value is gone. Free blocks unused for ``IDLE_S`` seconds are released (``trim``); the pool
tracks at most ``MAX_BLOCKS`` blocks and ``MAX_BYTES`` bytes (beyond that, blocks are left
to their users and freed as usual).
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from ..wire.framing import alloc_buffer

#: Receives of at least this size take their memory from the pool.
POOL_MIN = 4 << 20
#: A free block is reused for a request if it is at most this much larger (fraction).
SLACK = 0.125
MAX_BLOCKS = 4
MAX_BYTES = 1 << 30
IDLE_S = 5.0
_OWN_REFS = 2  # the pool's reference and getrefcount's argument


class _Block:
    __slots__ = ("arr", "free_since")

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.free_since: float | None = None  # when the pool first saw it unused


class BufferPool:
    """Large, already-touched receive buffers, reused once the values built on them die."""

    def __init__(self) -> None:
        self._blocks: list[_Block] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        """A writable uint8 array of ``size`` bytes (uninitialised content)."""
        with self._lock:
            self._scan(time.monotonic())
            best: _Block | None = None
            for b in self._blocks:
                n = b.arr.nbytes
                if (
                    b.free_since is not None
                    and size <= n <= size * (1 + SLACK) + 65536
                    and (best is None or n < best.arr.nbytes)
                ):
                    best = b
            if best is None:
                best = _Block(np.empty(size, dtype=np.uint8))
                self._blocks.append(best)
                self._limit()
            best.free_since = None
            return best.arr[:size]

    def trim(self, now: float | None = None) -> None:
        """Releases blocks unused for ``IDLE_S`` seconds."""
        with self._lock:
            self._scan(time.monotonic() if now is None else now)

    def held(self) -> int:
        """Bytes in free blocks (for tests and diagnostics)."""
        with self._lock:
            self._scan(time.monotonic())
            return sum(b.arr.nbytes for b in self._blocks if b.free_since is not None)

    def _scan(self, now: float) -> None:
        """Marks blocks no value uses any more as free; drops those idle too long (lock held)."""
        keep = []
        for b in self._blocks:
            if sys.getrefcount(b.arr) > _OWN_REFS:
                b.free_since = None
            elif b.free_since is None:
                b.free_since = now
            elif now - b.free_since >= IDLE_S:
                continue
            keep.append(b)
        self._blocks = keep

    def _limit(self) -> None:
        """Stops tracking blocks beyond the limits: free ones first, then the oldest."""
        while len(self._blocks) > 1 and (
            len(self._blocks) > MAX_BLOCKS or sum(b.arr.nbytes for b in self._blocks) > MAX_BYTES
        ):
            free = [b for b in self._blocks[:-1] if b.free_since is not None]
            self._blocks.remove(free[0] if free else self._blocks[0])


_pool = BufferPool()


def alloc(size: int) -> bytearray | np.ndarray:
    """A receive buffer of ``size`` bytes: from this process's pool when it is large."""
    if size >= POOL_MIN:
        return _pool.take(size)
    return alloc_buffer(size)


def trim() -> None:
    """Releases this process's idle pooled memory (called periodically)."""
    _pool.trim()
