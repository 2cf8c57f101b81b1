"""The reusable local process pool: reuse, growth, crashes, pickling failures, shutdown."""

from __future__ import annotations

import concurrent.futures
import ctypes
import operator
import os
import threading

import pytest

from parnet.errors import ParnetError
from parnet.maps.common import ChunkResult, ChunkTask, Shared
from parnet.maps.pool import Pool, PoolShutDownError, WorkerDiedError, get_pool, shutdown_pools


def _task(fun, values, start=0, **kw) -> ChunkTask:
    return ChunkTask(fun, [list(values)], start, **kw)


@pytest.fixture(scope="module")
def pool() -> Pool:
    p = Pool(2)
    yield p
    p.shutdown()


def test_submit_and_reuse(pool: Pool) -> None:
    res = pool.submit(_task(lambda x: x + 1, range(5), 10)).result(60)
    assert isinstance(res, ChunkResult)
    assert (res.start, res.count, res.outputs) == (10, 5, [[1, 2, 3, 4, 5]])
    pids = {
        pool.submit(_task(lambda x: os.getpid(), [0])).result(60).outputs[0][0] for _ in range(20)
    }
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # the same processes, reused


def test_shared_function_and_element_error(pool: Pool) -> None:
    big = list(range(10000))
    fun = Shared(lambda x: big[x] * 2)
    futs = [pool.submit(_task(fun, [i], i)) for i in range(6)]
    assert [f.result(60).outputs[0][0] for f in futs] == [0, 2, 4, 6, 8, 10]
    res = pool.submit(_task(lambda x: 1 // x, [1, 0, 2], 7)).result(60)
    assert res.error is not None and res.error[:2] == (8, "ZeroDivisionError")
    assert isinstance(res.exception, ZeroDivisionError)


def test_concurrent_submitters(pool: Pool) -> None:
    results: dict[int, list[int]] = {}

    def run(k: int) -> None:
        futs = [pool.submit(_task(lambda x, k=k: x * k, range(10), i)) for i in range(5)]
        results[k] = [f.result(60).outputs[0][-1] for f in futs]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: [9 * k] * 5 for k in range(4)}


class _Bomb:
    """Pickles fine, explodes when unpickled (in the pool process)."""

    def __reduce__(self):
        return (operator.truediv, (1, 0))


def test_pickling_failures_do_not_break_the_pool(pool: Pool) -> None:
    fut = pool.submit(_task(lambda x: x, [threading.Lock()]))
    with pytest.raises(TypeError) as info:
        fut.result(60)
    assert any("pickling the chunk at 0" in n for n in info.value.__notes__)
    res = pool.submit(_task(lambda x: x, [_Bomb()], 3)).result(60)
    assert res.error is not None and res.error[:2] == (3, "ZeroDivisionError")
    assert "unpickling the chunk" in res.error[3]
    assert pool.submit(_task(lambda x: -x, [4])).result(60).outputs == [[-4]]


def _segfault(x: int) -> int:
    ctypes.string_at(0)
    return x


def _kill9(x: int) -> int:
    os.kill(os.getpid(), 9)
    return x


CRASHES = [
    (_kill9, r"SIGKILL\(-9\)"),
    (lambda x: os._exit(3), r"EXIT\(3\)"),
    (_segfault, r"SIGSEGV\(-11\)"),
]


@pytest.mark.parametrize(("fun", "pattern"), CRASHES, ids=["kill9", "os_exit", "segfault"])
def test_dead_worker_is_reported_and_pool_restarts(pool: Pool, fun, pattern: str) -> None:
    fut = pool.submit(_task(fun, [1], 40))
    with pytest.raises(WorkerDiedError, match=pattern) as info:
        fut.result(60)
    assert isinstance(info.value, ParnetError)
    assert "elements 40..40" in str(info.value)
    assert pool.submit(_task(lambda x: x * 3, [2])).result(60).outputs == [[6]]


def test_system_exit_in_fun_is_an_element_error(pool: Pool) -> None:
    res = pool.submit(_task(lambda x: exit(4), [1], 2)).result(60)
    assert res.error is not None and res.error[:3] == (2, "SystemExit", "4")
    assert res.exception is None
    assert pool.submit(_task(lambda x: x, [1])).result(60).outputs == [[1]]


def test_get_pool_shared_grows_and_restarts() -> None:
    p1 = get_pool(1)
    assert get_pool(1) is p1 and p1.nproc >= 1
    p2 = get_pool(p1.nproc + 1)
    assert p2 is p1 and p1.nproc >= 2
    assert p2.submit(_task(lambda x: x, [5])).result(60).outputs == [[5]]
    shutdown_pools()
    assert p1.closed
    p3 = get_pool(1)
    assert p3 is not p1 and not p3.closed
    assert p3.submit(_task(lambda x: x, [6])).result(60).outputs == [[6]]


def test_shutdown() -> None:
    p = Pool(1)
    p.shutdown()  # never started: nothing to stop
    p.shutdown()
    with pytest.raises(PoolShutDownError):
        p.submit(_task(lambda x: x, [1]))
    with Pool(1) as q:
        assert q.submit(_task(lambda x: x, [1])).result(60).outputs == [[1]]
    assert q.closed
    r = Pool(1)
    r.submit(_task(lambda x: x, [1])).result(60)
    r.shutdown(kill=True)
    with pytest.raises(ValueError):
        Pool(0)


def test_future_cancel_of_queued_chunk() -> None:
    p = Pool(1)
    try:
        futs = [p.submit(_task(lambda x: x, [i], i)) for i in range(30)]
        cancelled = [f for f in futs if f.cancel()]
        done = [f for f in futs if f not in cancelled]
        for f in done:
            assert f.result(60).outputs[0][0] == f.result(60).start
        for f in cancelled:
            with pytest.raises(concurrent.futures.CancelledError):
                f.result(0)
    finally:
        p.shutdown()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_exit_when_the_owner_is_killed() -> None:
    import subprocess
    import sys
    import time

    code = (
        "import os\n"
        "from parnet.maps.pool import Pool\n"
        "from parnet.maps.common import ChunkTask\n"
        "p = Pool(2)\n"
        "fs = [p.submit(ChunkTask(lambda x: os.getpid(), [[0]], 0)) for _ in range(8)]\n"
        "print(' '.join(str(f.result().outputs[0][0]) for f in fs), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        pids = {int(x) for x in proc.stdout.readline().split()}  # type: ignore[union-attr]
        assert pids and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait(30)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"pool processes {pids} outlived their owner"
        time.sleep(0.05)
