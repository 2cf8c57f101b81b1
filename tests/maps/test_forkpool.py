"""The fork-server pool (``parnet.maps.forkpool``): the pool of server workers.

In this process the fork server is started with ``start_exec`` (this process runs threads);
the servers fork theirs (``start_forked``), which the tests at the end check on real servers.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import signal
import time

import pytest

from fault_tools import comm, gone
from helpers import children, wait_until
from parnet import netcellfun, network_set, rfeval, sclose
from parnet.errors import ConnectionClosed
from parnet.maps.common import ChunkTask
from parnet.maps.forkpool import (
    FORK_SERVER_NAME,
    POOL_PROCESS_NAME,
    ForkPool,
    exitcode_name,
    start_exec,
)
from parnet.maps.pool import PoolShutDownError, WorkerDiedError


def _task(fun, values, start=0) -> ChunkTask:
    return ChunkTask(fun, [list(values)], start)


def _fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def server():
    s = start_exec()
    yield s
    s.close()


@pytest.fixture()
def pool(server):
    p = ForkPool(2, server)
    yield p
    p.shutdown(kill=True)


def test_runs_chunks_in_processes_of_the_fork_server(pool, server) -> None:
    res = pool.submit(_task(lambda x: x + 1, range(5), 10)).result(60)
    assert (res.start, res.count, res.outputs) == (10, 5, [[1, 2, 3, 4, 5]])
    futs = [pool.submit(_task(lambda x: (os.getpid(), os.getppid()), [0])) for _ in range(10)]
    pairs = {f.result(60).outputs[0][0] for f in futs}
    assert {ppid for _, ppid in pairs} == {server.pid}
    assert {pid for pid, _ in pairs} <= set(pool.pids()) and len(pool.pids()) == 2
    assert all(comm(p) == POOL_PROCESS_NAME for p in pool.pids())
    assert comm(server.pid) == FORK_SERVER_NAME


def test_cwd_path_environment_and_random_state(pool, tmp_path, monkeypatch) -> None:
    """A pool process has the owner's directory, sys.path and environment as of its start,
    and its own NumPy random state (a fork copies the generator's)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PARNET_FORKPOOL_TEST", "yes")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    with ForkPool(2, pool.server) as p:

        def info(_):
            import sys

            return os.getcwd(), sys.path[0], os.environ.get("PARNET_FORKPOOL_TEST"), os.getpid()

        cwd, path0, env, _ = p.submit(_task(info, [0])).result(60).outputs[0][0]
        assert (cwd, path0, env) == (str(tmp_path), str(tmp_path / "mods"), "yes")
        draws: dict[int, float] = {}
        deadline = time.monotonic() + 60
        while len(draws) < 2 and time.monotonic() < deadline:
            futs = [
                p.submit(_task(lambda _: (os.getpid(), __import__("numpy").random.random()), [0]))
                for _ in range(4)
            ]
            draws.update(f.result(60).outputs[0][0] for f in futs)
        assert len(draws) == 2 and len(set(draws.values())) == 2, draws


def _kill9(x: int) -> int:
    os.kill(os.getpid(), 9)
    return x


def _segfault(x: int) -> int:
    ctypes.string_at(0)
    return x


@pytest.mark.parametrize(
    ("fun", "codes"),
    [
        (_kill9, "{SIGKILL(-9)}"),
        (lambda x: os._exit(3), "{EXIT(3)}"),
        (_segfault, "{SIGSEGV(-11)}"),
    ],
    ids=["kill9", "os_exit", "segfault"],
)
def test_death_mid_chunk_fails_the_chunks_in_flight_and_restarts(pool, fun, codes: str) -> None:
    slow = pool.submit(_task(lambda x: time.sleep(x), [30], 0))  # on the other process
    wait_until(lambda: slow.running(), 30, "the slow chunk to run")
    fut = pool.submit(_task(fun, [1], 40))
    with pytest.raises(WorkerDiedError) as info:
        fut.result(60)
    assert info.value.exitcodes == codes
    assert "elements 40..40" in str(info.value) and codes in str(info.value)
    with pytest.raises(WorkerDiedError):  # loky's semantics: the whole generation fails
        slow.result(60)
    old = set(pool.pids())
    assert pool.submit(_task(lambda x: x * 3, [2])).result(60).outputs == [[6]]
    assert not old & set(pool.pids())
    wait_until(lambda: all(gone(p) for p in old), 30, "the broken generation to exit")


def test_idle_process_killed_breaks_the_generation(pool) -> None:
    pool.submit(_task(abs, [1])).result(60)
    victim = pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: pool._gen is None or pool._gen.broken, 30, "the pool to see the death")
    assert pool.submit(_task(abs, [-2])).result(60).outputs == [[2]]
    assert victim not in pool.pids()


def test_cancel_grow_and_shutdown(server) -> None:
    p = ForkPool(1, server)
    futs = [p.submit(_task(lambda x: x, [i], i)) for i in range(30)]
    cancelled = [f for f in futs if f.cancel()]
    for f in futs:
        if f not in cancelled:
            assert f.result(60).outputs[0][0] == f.result(60).start
    p.grow(3)
    assert p.nproc == 3
    wait_until(lambda: len(p.pids()) == 3, 30, "3 processes")
    running = p.submit(_task(lambda x: time.sleep(x), [30]))
    wait_until(lambda: running.running(), 30, "the chunk to run")
    pids = p.pids()
    p.shutdown(kill=True)
    with pytest.raises(PoolShutDownError):
        running.result(60)
    with pytest.raises(PoolShutDownError):
        p.submit(_task(abs, [1]))
    wait_until(lambda: all(gone(x) for x in pids), 30, "the processes to exit")
    with ForkPool(1, server) as q:  # a polite shutdown lets the running chunk finish
        f = q.submit(_task(lambda x: time.sleep(x) or x, [0.3]))
        wait_until(lambda: f.running(), 30, "the chunk to run")
    assert f.result(0).outputs == [[0.3]]
    with pytest.raises(ValueError):
        ForkPool(0, server)


def test_fork_server_holds_only_its_control_socket(pool, server) -> None:
    pool.submit(_task(abs, [1])).result(60)
    fds = _fds(server.pid)
    assert sum(f.startswith("socket:") for f in fds) == 1, fds
    assert all(f.startswith(("socket:", "anon_inode:", "/dev/null")) for f in fds), fds
    for child in pool.pids():  # its task socket, no other, once it has closed the fork
        # server's control socket (a process of the pool may still be starting: the chunk
        # above ran in one of them)
        wait_until(lambda c=child: _sockets(c) == 1, 20, f"pool process {child} to settle")


def test_owner_gone_ends_the_fork_server_and_its_processes() -> None:
    s = start_exec()
    p = ForkPool(2, s)
    f = p.submit(_task(lambda x: time.sleep(x), [60]))
    wait_until(lambda: f.running() and len(p.pids()) == 2, 30, "the pool to run")
    pids = [s.pid, *p.pids()]
    s.close()  # its end of the control socket hangs up, as when the owner exits
    wait_until(lambda: all(gone(x) for x in pids), 30, f"{pids} to exit")
    with pytest.raises(WorkerDiedError):
        f.result(30)


def test_exitcode_name() -> None:
    assert exitcode_name(9) == "SIGKILL(-9)"
    assert exitcode_name(3 << 8) == "EXIT(3)"


# -- on real servers ---------------------------------------------------------------------------


def _fork_server_of(worker: int) -> int:
    """The worker's fork server, once it has started (forked after SETUP, it may still be
    starting when the client's first call returns, on a slow or coverage-traced host)."""

    def one() -> int | None:
        kids = [k for k in children(worker) if comm(k) == FORK_SERVER_NAME]
        assert len(kids) <= 1, kids
        return kids[0] if kids else None

    return wait_until(one, 20, f"worker {worker}'s fork server")


def _sockets(pid: int) -> int:
    return sum(f.startswith("socket:") for f in _fds(pid))


@pytest.mark.kills_workers
def test_server_pool_is_forked_and_ends_with_its_worker(cluster) -> None:
    """A server's pool processes are children of the worker's fork server; the fork server
    holds no connection of the worker's (the client sees the worker die at once); a worker
    killed mid-map takes its fork server and pool processes with it."""
    c = cluster.connect()
    try:
        network_set(c, "nlocaljobs", 2)
        w = rfeval(os.getpid, connection=c[1])
        z = _fork_server_of(w)
        # its control socket only, once it has closed what it inherited (at its start)
        wait_until(lambda: _sockets(z) == 1, 20, f"the fork server to hold one socket ({_fds(z)})")
        r = netcellfun(c[1], lambda x: (time.sleep(0.05), os.getpid())[1], range(12))
        pool = set(r.tolist()) - {w}
        assert pool and pool <= set(children(z))
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(netcellfun, c[1], lambda x: time.sleep(x), [20.0] * 4)
            wait_until(lambda: len(children(z)) == 2, 30, "the pool to run the map")
            procs = [z, *children(z)]
            os.kill(w, signal.SIGKILL)
            with pytest.raises(ConnectionClosed):
                fut.result(30)
        wait_until(lambda: all(gone(p) for p in procs), 30, f"{procs} to exit")
    finally:
        sclose(c)
