"""parcellfun / pararrayfun over the local process pool (and in-process when nproc is 1)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from parnet.maps import pararrayfun, parcellfun
from parnet.maps.common import MapElementError, MapErr
from parnet.maps.localmap import available_cores
from parnet.maps.pool import WorkerDiedError

multicore = pytest.mark.skipif(
    available_cores() < 2, reason="needs 2 cores (nproc is cut to the cores)"
)


@multicore
def test_lambda_runs_in_other_processes() -> None:
    pids = parcellfun(2, lambda x: os.getpid(), range(50))
    assert os.getpid() not in set(pids.tolist())
    assert parcellfun(2, lambda x: x * 2, range(2000)).tolist() == list(range(0, 4000, 2))


def test_closure_over_locals_and_several_iterables() -> None:
    offset = 10
    table = {"a": 1, "b": 2}
    out = parcellfun(2, lambda k, x: table[k] * x + offset, ["a", "b", "a"], iter([1, 2, 3]))
    assert isinstance(out, np.ndarray) and out.tolist() == [11, 14, 13]


def test_nout_and_not_uniform() -> None:
    q, r = parcellfun(2, lambda x: divmod(x, 3), range(10), nout=2)
    assert q.tolist() == [x // 3 for x in range(10)] and r.tolist() == [x % 3 for x in range(10)]
    out = parcellfun(2, lambda x: "ab"[: x % 3], range(7), uniform_output=False)
    assert out == ["", "a", "ab", "", "a", "ab", ""]
    words, lens = parcellfun(
        2, lambda w: (w.upper(), len(w)), ["x", "yy"], nout=2, uniform_output=False
    )
    assert words == ["X", "YY"] and lens == [1, 2]


def test_error_handler() -> None:
    def handler(err: MapErr, a: float, b: float) -> tuple[str, int, str]:
        return (err.identifier, err.index, err.message)

    out = parcellfun(
        2,
        lambda a, b: a / b,
        [1, 2, 3, 4],
        [1, 0, 1, 0],
        error_handler=handler,
        uniform_output=False,
    )
    assert out == [
        1.0,
        ("ZeroDivisionError", 1, "division by zero"),
        3.0,
        ("ZeroDivisionError", 3, "division by zero"),
    ]


def test_cum_func() -> None:
    assert parcellfun(2, lambda x: x, range(1000), cum_func=lambda a, b: a + b) == 499500
    lo, hi = parcellfun(
        2,
        lambda x: (x, x),
        range(1, 101),
        nout=2,
        cum_func=lambda a1, a2, x1, x2: (min(a1, x1), max(a2, x2)),
    )
    assert (lo, hi) == (1, 100)
    assert parcellfun(2, lambda x: x, [], cum_func=lambda a, b: a + b) is None


def test_pararrayfun_keeps_shape() -> None:
    a = np.arange(6).reshape(2, 3)
    out = pararrayfun(2, lambda x, y: x * 10 + y, a, np.ones((2, 3)))
    assert out.shape == (2, 3) and np.array_equal(out, a * 10 + 1)
    s, p = pararrayfun(2, lambda x: (x + x, x * x), a, nout=2)
    assert s.shape == p.shape == (2, 3) and np.array_equal(p, a * a)
    objs = pararrayfun(2, lambda x: [x] * int(x), a, uniform_output=False)
    assert objs.dtype == object and objs.shape == (2, 3) and objs[1, 2] == [5] * 5
    assert pararrayfun(2, lambda x: x + 1, 4.0).shape == ()


def test_pararrayfun_vectorized() -> None:
    a = np.arange(12.0).reshape(3, 4)
    calls = pararrayfun(2, lambda x: np.full(len(x), len(x)), a, vectorized=True)
    assert calls.shape == (3, 4) and set(calls.ravel().tolist()) <= {6.0, 12.0}
    out = pararrayfun(2, lambda x, y: x * y, a, a, vectorized=True, chunks_per_proc=3)
    assert np.array_equal(out, a * a)
    sizes = pararrayfun(
        2, lambda x: np.full(len(x), len(x)), np.arange(12), vectorized=True, chunks_per_proc=3
    )
    assert sizes.tolist() == [2] * 12  # 2 processes x 3 chunks of 2
    total = pararrayfun(
        2, lambda x: x.sum(), a, vectorized=True, chunks_per_proc=2, cum_func=lambda p, q: p + q
    )
    assert total == a.sum()
    fixed = pararrayfun(
        2,
        lambda x: 1 / 0,
        np.arange(4),
        vectorized=True,
        chunks_per_proc=1,
        error_handler=lambda err, x: np.full(len(x), err.index),
    )
    assert fixed.tolist() == [0, 0, 2, 2]


def test_error_is_reraised_with_index_and_traceback() -> None:
    def inner(x: int) -> float:
        return 1 / (x - 37)

    with pytest.raises(ZeroDivisionError) as info:
        parcellfun(2, lambda x: inner(x), range(100))
    notes = "\n".join(info.value.__notes__)
    assert "parcellfun: raised by element 37" in notes
    if available_cores() >= 2:
        assert "in inner" in notes  # the traceback text from the pool process
    with pytest.raises(ZeroDivisionError, match="by zero") as info2:
        pararrayfun(2, lambda x: 1 // int(x), np.array([[1, 2], [0, 4]]))
    assert "pararrayfun: raised by element 2" in info2.value.__notes__[0]


def test_uniform_output_error() -> None:
    with pytest.raises(ValueError, match=r"index 7 .*uniform_output=False"):
        parcellfun(2, lambda x: [x] if x == 7 else x, range(20))
    with pytest.raises(ValueError, match=r"position \(1, 0\)"):
        pararrayfun(2, lambda x: "s" if x == 3 else x, np.arange(6).reshape(2, 3))


@multicore
def test_exception_that_cannot_come_back() -> None:
    def f(x: int) -> int:
        if x == 5:
            raise ValueError(threading.Lock())
        return x

    with pytest.raises(MapElementError) as info:
        parcellfun(2, f, range(10))
    assert (info.value.index, info.value.identifier) == (5, "ValueError")


@multicore
def test_unpicklable_argument_and_result() -> None:
    with pytest.raises(TypeError) as info:
        parcellfun(2, lambda x: 1, [threading.Lock(), threading.Lock()])
    assert any("pickling the chunk" in n for n in info.value.__notes__)
    with pytest.raises(TypeError, match="element 3 cannot be sent back"):
        parcellfun(2, lambda x: threading.Lock() if x == 3 else x, range(6), uniform_output=False)


def test_nproc_cut_and_validation() -> None:
    me = os.getpid()
    assert parcellfun(1, lambda x: os.getpid(), range(5)).tolist() == [me] * 5
    assert parcellfun(64, lambda x: os.getpid(), [0]).tolist() == [me]  # cut to 1 element
    assert parcellfun(1000, lambda x: x + 1, range(5)).tolist() == [1, 2, 3, 4, 5]
    assert parcellfun(3, lambda x: x, []).shape == (0,)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="nproc"):
            parcellfun(bad, lambda x: x, range(3))
    with pytest.raises(ValueError, match="nout"):
        parcellfun(2, lambda x: x, range(3), nout=0)
    with pytest.raises(ValueError, match="chunks_per_proc"):
        parcellfun(2, lambda x: x, range(3), chunks_per_proc=0)
    with pytest.raises(ValueError, match="callable"):
        parcellfun(2, 42, range(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same length"):
        parcellfun(2, lambda x, y: x, range(3), range(4))
    with pytest.raises(ValueError, match="same shape"):
        pararrayfun(2, lambda x, y: x, np.zeros(3), np.zeros(4))


def test_in_process_keeps_live_traceback() -> None:
    def deep(x: int) -> int:
        raise LookupError(x)

    with pytest.raises(LookupError) as info:
        parcellfun(1, deep, range(3))
    assert info.traceback[-1].name == "deep"
    assert info.value.__notes__ == ["parcellfun: raised by element 0"]


@multicore
def test_killed_pool_process_then_next_call_works() -> None:
    me = os.getpid()

    def f(x: int) -> int:
        if x == 3 and os.getpid() != me:
            os.kill(os.getpid(), 9)
        return x

    with pytest.raises(WorkerDiedError, match=r"SIGKILL\(-9\)") as info:
        parcellfun(2, f, range(8), chunks_per_proc=4)
    assert info.value.exitcodes == "{SIGKILL(-9)}"
    assert parcellfun(2, lambda x: x + 1, range(8)).tolist() == list(range(1, 9))


@multicore
def test_verbose_progress_bar(capfd: pytest.CaptureFixture[str]) -> None:
    parcellfun(2, lambda x: x, range(100), verbose=1)
    err = capfd.readouterr().err
    assert "parcellfun" in err and "100/100" in err
    pararrayfun(1, lambda x: x, np.arange(10), verbose=1)
    assert "10/10" in capfd.readouterr().err
    parcellfun(2, lambda x: x, range(10))
    assert capfd.readouterr().err == ""


def test_parcellfun_from_a_thread() -> None:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(parcellfun(2, abs, range(-3, 3)).tolist()))
    t.start()
    t.join(60)
    assert out == [[3, 2, 1, 0, 1, 2]]


def test_main_module_function_by_value() -> None:
    # A function defined in __main__-like dynamic code travels by value (cloudpickle).
    ns: dict[str, object] = {"__name__": "__main__"}
    exec("def triple(x):\n    return 3 * x\n", ns)
    import pickle

    # plain pickle would look `triple` up in the real __main__ (where it does not exist)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(ns["triple"])
    assert parcellfun(2, ns["triple"], range(4)).tolist() == [0, 3, 6, 9]
