"""The pure map machinery: columns, chunks, run_chunk, Assembler, Shared."""

from __future__ import annotations

import pickle
import random
import threading

import cloudpickle
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parnet.errors import ParnetError
from parnet.maps.common import (
    Assembler,
    ChunkResult,
    ChunkTask,
    GuidedChunker,
    MapElementError,
    MapErr,
    Shared,
    array_columns,
    cell_columns,
    chunk_ranges,
    dumps_result,
    error_result,
    guided_ranges,
    raise_chunk_error,
    run_chunk,
)

# ----------------------------------------------------------------------------- chunks


def test_chunk_ranges_edges() -> None:
    assert chunk_ranges(0, 3) == []
    assert chunk_ranges(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert chunk_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert chunk_ranges(3, 10) == [range(0, 3)]
    assert chunk_ranges(3, 1) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError):
        chunk_ranges(3, 0)
    with pytest.raises(ValueError):
        chunk_ranges(-1, 2)


@given(st.integers(0, 5000), st.integers(1, 64))
def test_guided_ranges_cover_in_order(n: int, nproc: int) -> None:
    rs = guided_ranges(n, nproc)
    assert [i for r in rs for i in r] == list(range(n))
    assert all(len(r) >= 1 for r in rs)
    min_size = max(1, -(-n // (100 * nproc)))
    assert all(len(r) >= min_size for r in rs[:-1])
    assert len(rs) <= 100 * nproc + 1


def test_guided_ranges_shrink() -> None:
    sizes = [len(r) for r in guided_ranges(2000, 2)]
    assert sizes[0] == 500  # remaining / (2 * nproc)
    assert sizes == sorted(sizes, reverse=True)
    assert sum(sizes) == 2000
    assert guided_ranges(0, 4) == []
    assert [len(r) for r in guided_ranges(3, 8)] == [1, 1, 1]
    with pytest.raises(ValueError):
        guided_ranges(10, 0)


def test_guided_chunker_learns_cost() -> None:
    cheap = GuidedChunker(2000, 2, target=0.005)
    first = [cheap.next() for _ in range(2)]
    assert [len(r) for r in first] == [500, 375]
    cheap.observe(500, 500 * 1e-7)  # 0.1 us per element: the rest is one chunk
    last = cheap.next()
    assert last == range(875, 2000)
    assert cheap.next() is None

    costly = GuidedChunker(1000, 4, target=0.005)
    r0 = costly.next()
    costly.observe(len(r0), len(r0) * 0.1)  # 0.1 s per element: guided sizes stay
    sizes = [len(r) for r in iter(costly.next, None)]
    assert sum(sizes) + len(r0) == 1000
    assert max(sizes) <= -(-(1000 - len(r0)) // 4)

    medium = GuidedChunker(10000, 2, target=0.005, min_size=1)
    medium.next()
    medium.observe(100, 100 * 1e-4)  # 0.1 ms per element: chunks of >= 50 elements ...
    sizes = [len(r) for r in iter(medium.next, None)]
    assert all(s >= 50 for s in sizes[:-2])
    assert sizes[-2:] == [39, 38]  # ... but the last 77 still go to both processes


# ----------------------------------------------------------------------------- columns


def test_cell_columns() -> None:
    n, cols = cell_columns([[1, 2, 3], (x for x in "abc"), range(3)])
    assert n == 3
    assert cols[0] == [1, 2, 3] and cols[1] == ["a", "b", "c"] and cols[2] == range(3)
    n, cols = cell_columns([np.arange(6).reshape(3, 2)])
    assert n == 3 and len(cols[0][1:]) == 2
    with pytest.raises(ValueError, match="same length"):
        cell_columns([[1, 2], [1]])
    with pytest.raises(ValueError):
        cell_columns([])


def test_array_columns() -> None:
    shape, n, cols = array_columns([np.arange(6).reshape(2, 3), [[1, 2, 3], [4, 5, 6]]])
    assert shape == (2, 3) and n == 6
    assert cols[0].tolist() == [0, 1, 2, 3, 4, 5] and cols[1].ndim == 1
    shape, n, cols = array_columns([[{"a": 1}, None, "x"]])
    assert shape == (3,) and cols[0].dtype == object and cols[0][0] == {"a": 1}
    shape, n, cols = array_columns([[[1, 2], [3]]])  # ragged: one object per item
    assert shape == (2,) and cols[0][1] == [3]
    shape, n, cols = array_columns([5.0])
    assert shape == () and n == 1
    with pytest.raises(ValueError, match="same shape"):
        array_columns([np.zeros((2, 3)), np.zeros((3, 2))])
    with pytest.raises(ValueError):
        array_columns([])


# ----------------------------------------------------------------------------- run_chunk


def test_run_chunk_plain_and_multiarg() -> None:
    res = run_chunk(ChunkTask(lambda x: x * 2, [[1, 2, 3]], 10))
    assert (res.start, res.count, res.outputs, res.error) == (10, 3, [[2, 4, 6]], None)
    res = run_chunk(ChunkTask(lambda a, b: a + b, [[1, 2], [10, 20]], 0))
    assert res.outputs == [[11, 22]]
    res = run_chunk(ChunkTask(_sleeps, [[0.02, 0.03]], 0))
    assert res.elapsed >= 0.05  # both calls timed (a lower bound: never flaky)


def _sleeps(s: float) -> float:
    import time

    time.sleep(s)
    return s


def _fails_at_3(x: int) -> int:
    if x == 3:
        raise KeyError(f"bad {x}")
    return x


def test_run_chunk_first_error_with_index_and_traceback() -> None:
    calls: list[int] = []

    def f(x: int) -> int:
        calls.append(x)
        return _fails_at_3(x)

    res = run_chunk(ChunkTask(f, [[0, 1, 2, 3, 4, 3]], 100))
    assert res.outputs is None
    index, ident, message, tb = res.error  # type: ignore[misc]
    assert (index, ident, message) == (103, "KeyError", "'bad 3'")
    assert "_fails_at_3" in tb and "run_chunk" not in tb
    assert isinstance(res.exception, KeyError)
    assert calls == [0, 1, 2, 3]  # stops at the first failure


def test_run_chunk_error_handler_gets_maperr() -> None:
    seen: list[tuple[MapErr, tuple[int, ...]]] = []

    def handler(err: MapErr, *args: int) -> int:
        seen.append((err, args))
        return -1

    res = run_chunk(
        ChunkTask(lambda a, b: a / b, [[1, 2, 3, 4], [1, 0, 1, 0]], 5, error_handler=handler)
    )
    assert res.outputs == [[1.0, -1, 3.0, -1]]
    assert [(e.index, e.identifier, e.message, a) for e, a in seen] == [
        (6, "ZeroDivisionError", "division by zero", (2, 0)),
        (8, "ZeroDivisionError", "division by zero", (4, 0)),
    ]
    assert isinstance(seen[0][0].exception, ZeroDivisionError)
    # single argument column
    res = run_chunk(ChunkTask(_fails_at_3, [[1, 3, 5]], 0, error_handler=lambda e, x: x * 100))
    assert res.outputs == [[1, 300, 5]]


def test_run_chunk_error_handler_that_raises() -> None:
    def handler(err: MapErr, x: int) -> int:
        raise RuntimeError(f"handler saw {err.index}")

    res = run_chunk(ChunkTask(_fails_at_3, [[1, 2, 3]], 0, error_handler=handler))
    assert res.error is not None and res.error[:3] == (2, "RuntimeError", "handler saw 2")


def test_run_chunk_nout() -> None:
    res = run_chunk(ChunkTask(lambda x: (x, x * x), [[1, 2, 3]], 0, nout=2))
    assert res.outputs == [[1, 2, 3], [1, 4, 9]]
    res = run_chunk(ChunkTask(lambda x: [x, -x, 0], [[1]], 0, nout=3))
    assert res.outputs == [[1], [-1], [0]]
    res = run_chunk(ChunkTask(lambda x: (x,) if x == 2 else (x, x), [[1, 2]], 0, nout=2))
    assert res.error is not None and res.error[:2] == (1, "ValueError")
    assert "2 values" in res.error[2]
    res = run_chunk(
        ChunkTask(
            lambda x: x, [[1, 2]], 0, nout=2, error_handler=lambda e, x: (e.index, e.identifier)
        )
    )
    assert res.outputs == [[0, 1], ["ValueError", "ValueError"]]
    res = run_chunk(ChunkTask(lambda x: (x, x), [[]], 0, nout=2))
    assert res.outputs == [[], []]


def test_run_chunk_cum_func() -> None:
    res = run_chunk(ChunkTask(lambda x: x, [list(range(10))], 0, cum_func=lambda a, b: a + b))
    assert (res.has_cum, res.cum, res.outputs) == (True, 45, None)
    # nout=2: cum_func(acc1, acc2, x1, x2) -> 2-tuple (Octave's convention)
    res = run_chunk(
        ChunkTask(
            lambda x: (x, x),
            [[3, 1, 2]],
            0,
            nout=2,
            cum_func=lambda a1, a2, x1, x2: (a1 + x1, max(a2, x2)),
        )
    )
    assert res.cum == (6, 3)
    res = run_chunk(
        ChunkTask(lambda x: x, [[1, 2, 3]], 7, cum_func=lambda a, b: a + b if b < 3 else 1 / 0)
    )
    assert res.error is not None and res.error[:2] == (9, "ZeroDivisionError")
    res = run_chunk(
        ChunkTask(
            _fails_at_3, [[1, 3]], 0, cum_func=lambda a, b: a + b, error_handler=lambda e, x: 10
        )
    )
    assert res.cum == 11
    res = run_chunk(ChunkTask(lambda x: x, [[]], 0, cum_func=lambda a, b: a + b))
    assert res.has_cum is False


def test_run_chunk_vectorized() -> None:
    a = np.arange(6.0)
    res = run_chunk(ChunkTask(lambda x, y: x + y, [a, a], 0, vectorized=True))
    assert np.array_equal(res.outputs[0], 2 * a)  # type: ignore[index]
    res = run_chunk(ChunkTask(lambda x: (x, -x), [a], 0, vectorized=True, nout=2))
    assert np.array_equal(res.outputs[1], -a)  # type: ignore[index]
    res = run_chunk(
        ChunkTask(lambda x: x.sum(), [a], 0, vectorized=True, cum_func=lambda p, q: p + q)
    )
    assert res.has_cum and res.cum == 15.0
    res = run_chunk(ChunkTask(lambda x: x[:2], [a], 12, vectorized=True))
    assert res.error is not None and res.error[:2] == (12, "ValueError")
    seen: list[int] = []

    def handler(err: MapErr, x: np.ndarray) -> np.ndarray:
        seen.append(err.index)
        return np.zeros(len(x))

    res = run_chunk(ChunkTask(lambda x: 1 / 0, [a], 30, vectorized=True, error_handler=handler))
    assert seen == [30] and np.array_equal(res.outputs[0], np.zeros(6))  # type: ignore[index]


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = threading.Lock()


def _raise_unpicklable(x: int) -> int:
    raise _Unpicklable()


def test_run_chunk_portable_exception() -> None:
    res = run_chunk(ChunkTask(_raise_unpicklable, [[1]], 0))
    assert res.exception is None and res.error[1] == "_Unpicklable"  # type: ignore[index]
    pickle.loads(cloudpickle.dumps(res))
    res = run_chunk(ChunkTask(_raise_unpicklable, [[1]], 0, portable=False))
    assert isinstance(res.exception, _Unpicklable)
    res = run_chunk(ChunkTask(_raise_unpicklable, [[1]], 0, want_traceback=False))
    assert res.error[3] == ""  # type: ignore[index]


def test_dumps_result_names_the_unpicklable_output() -> None:
    res = run_chunk(ChunkTask(lambda x: threading.Lock() if x == 2 else x, [[0, 1, 2]], 40))
    back = pickle.loads(dumps_result(res))
    assert back.error[0] == 42 and "element 42" in back.error[2]
    ok = run_chunk(ChunkTask(lambda x: x, [[1]], 0))
    assert pickle.loads(dumps_result(ok)).outputs == [[1]]


# ----------------------------------------------------------------------------- Shared


def test_shared_pickles_once_and_caches() -> None:
    big = np.arange(1000)
    s = Shared(lambda x: big[x])
    t1 = ChunkTask(s, [[1]], 0)
    t2 = ChunkTask(s, [[2]], 1)
    b1, b2 = cloudpickle.dumps(t1), cloudpickle.dumps(t2)
    blob = s._blob
    assert blob is not None
    cloudpickle.dumps(t1)
    assert s._blob is blob  # not re-pickled
    r1, r2 = pickle.loads(b1), pickle.loads(b2)
    assert r1.fun is r2.fun  # one unpickled copy per process
    assert run_chunk(r1).outputs == [[1]] and run_chunk(r2).outputs == [[2]]
    assert pickle.loads(pickle.dumps(r1.fun)).obj(5) == 5


# ----------------------------------------------------------------------------- Assembler


def _chunks(fun, cols, sizes, **kw):
    n = len(cols[0])
    out, start = [], 0
    for size in sizes:
        stop = min(n, start + size)
        out.append(run_chunk(ChunkTask(fun, [c[start:stop] for c in cols], start, **kw)))
        start = stop
    assert start == n
    return out


@pytest.mark.parametrize("seed", range(5))
def test_assembler_any_order_cell(seed: int) -> None:
    chunks = _chunks(lambda x: x * 2, [list(range(50))], [7, 1, 13, 20, 9])
    random.Random(seed).shuffle(chunks)
    asm = Assembler(50, name="t")
    for c in chunks:
        assert not asm.done()
        assert asm.add(c)
    assert asm.done()
    out = asm.result()
    assert isinstance(out, np.ndarray) and out.tolist() == list(range(0, 100, 2))


def test_assembler_array_shape_nout_and_duplicates() -> None:
    a = np.arange(6).reshape(2, 3)
    shape, n, cols = array_columns([a])
    chunks = _chunks(lambda x: (x + 0.5, x > 2), cols, [4, 2], nout=2)
    asm = Assembler(n, shape=shape, nout=2, kind="array")
    asm.add(chunks[1])
    assert asm.add(chunks[1]) is False  # a rerun chunk is ignored
    asm.add(chunks[0])
    plus, big = asm.result()
    assert plus.shape == (2, 3) and np.array_equal(plus, a + 0.5)
    assert big.dtype == bool and np.array_equal(big, a > 2)


def test_assembler_not_uniform() -> None:
    chunks = _chunks(lambda x: [x] * x, [[1, 2, 3]], [2, 1])
    asm = Assembler(3, uniform_output=False)
    for c in reversed(chunks):
        asm.add(c)
    assert asm.result() == [[1], [2, 2], [3, 3, 3]]
    shape, n, cols = array_columns([np.arange(4).reshape(2, 2)])
    asm = Assembler(n, shape=shape, uniform_output=False, kind="array")
    for c in _chunks(lambda x: [int(x)], cols, [3, 1]):
        asm.add(c)
    out = asm.result()
    assert out.dtype == object and out.shape == (2, 2) and out[1, 0] == [2]


def test_assembler_uniform_errors_name_the_index() -> None:
    asm = Assembler(10, name="parcellfun")
    asm.add(ChunkResult(0, 5, outputs=[[1, 2.5, True, np.float32(3), np.array(4)]]))
    with pytest.raises(ValueError, match=r"parcellfun: .*index 7 .*list"):
        asm.add(ChunkResult(5, 5, outputs=[[1, 2, [3], 4, 5]]))
    asm = Assembler(6, shape=(2, 3), kind="array")
    with pytest.raises(ValueError, match=r"index 4 \(position \(1, 1\)\).*str"):
        asm.add(ChunkResult(3, 3, outputs=[[1, "x", 2]]))
    for bad in (None, np.zeros(2), "s", {"a": 1}, np.datetime64("2020-01-01")):
        with pytest.raises(ValueError, match="index 1 "):
            Assembler(2).add(ChunkResult(0, 2, outputs=[[0, bad]]))
    asm = Assembler(2)  # numbers NumPy has no dtype for are scalars too
    asm.add(ChunkResult(0, 2, outputs=[[2**70, 1]]))
    assert asm.result().tolist() == [2**70, 1]


def test_assembler_cum_func() -> None:
    chunks = _chunks(lambda x: x, [list(range(100))], [30, 30, 40], cum_func=lambda a, b: a + b)
    asm = Assembler(100, cum_func=lambda a, b: a + b)
    for c in reversed(chunks):
        asm.add(c)
    assert asm.result() == 4950
    chunks = _chunks(
        lambda x: (x, -x),
        [list(range(10))],
        [3, 7],
        nout=2,
        cum_func=lambda a1, a2, x1, x2: (max(a1, x1), min(a2, x2)),
    )
    asm = Assembler(10, nout=2, cum_func=lambda a1, a2, x1, x2: (max(a1, x1), min(a2, x2)))
    for c in chunks:
        asm.add(c)
    assert asm.result() == (9, -9)


def test_assembler_empty_and_incomplete() -> None:
    assert Assembler(0).result().shape == (0,)
    assert Assembler(0, uniform_output=False).result() == []
    assert Assembler(0, cum_func=max).result() is None
    e1, e2 = Assembler(0, shape=(0, 3), nout=2, kind="array").result()
    assert e1.shape == (0, 3) and e2.shape == (0, 3)
    asm = Assembler(4)
    asm.add(ChunkResult(0, 2, outputs=[[1, 2]]))
    with pytest.raises(RuntimeError, match="2 elements missing"):
        asm.result()
    with pytest.raises(ValueError):
        Assembler(4, shape=(2, 3))


def test_assembler_raises_the_element_error() -> None:
    res = run_chunk(ChunkTask(_fails_at_3, [[0, 1, 2, 3]], 0))
    back = pickle.loads(cloudpickle.dumps(res))  # as if from another process
    with pytest.raises(KeyError) as info:
        Assembler(4, name="parcellfun").add(back)
    notes = "\n".join(info.value.__notes__)
    assert "parcellfun: raised by element 3" in notes and "_fails_at_3" in notes
    res = run_chunk(ChunkTask(_raise_unpicklable, [[0]], 0))
    with pytest.raises(MapElementError) as info2:
        raise_chunk_error(res, "netcellfun")
    err = info2.value
    assert isinstance(err, ParnetError)
    assert (err.index, err.identifier, err.message) == (0, "_Unpicklable", "cannot travel")
    assert "netcellfun: element 0 raised _Unpicklable" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.index, copy.identifier) == (0, "_Unpicklable")


def test_error_result_fields() -> None:
    try:
        raise OSError(2, "gone")
    except OSError as e:
        res = error_result(10, 5, 12, e)
    assert res.error[:3] == (12, "FileNotFoundError", "[Errno 2] gone")  # type: ignore[index]
    assert res.outputs is None and isinstance(res.exception, FileNotFoundError)
