"""parnet.Executor between real servers: futures, concurrency per server, errors, cancel,
shutdown, a server lost mid-call, Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import CancelledError, as_completed, wait

import cloudpickle
import pytest

from helpers import children, wait_until
from parnet import ConnectionClosed, Executor, RemoteError, network_set, rfeval, sclose

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # servers cannot import this module


def _span(x: float, marks: str | None = None) -> tuple[int, int, float, float]:
    """Sleeps ``x`` s; returns (pid, parent pid, start, end); leaves a mark file first."""
    t0 = time.time()
    if marks:
        open(os.path.join(marks, f"{os.getpid()}-{t0}"), "w").close()
    time.sleep(x)
    return os.getpid(), os.getppid(), t0, time.time()


def _server_of(cluster, pid: int, ppid: int) -> int:
    """Position (0-based) of the server whose worker ran a call (itself or in its pool, whose
    processes are children of the worker's fork server)."""
    try:
        with open(f"/proc/{ppid}/stat") as f:
            gppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        gppid = 0
    for k in range(len(cluster.pids)):
        if {pid, ppid, gppid} & set(cluster.workers(k)):
            return k
    raise AssertionError(f"pid {pid} (parent {ppid}) is no server's worker or pool process")


def test_submit_map_and_futures_api(conns) -> None:
    base = 10
    with Executor(conns) as ex:
        assert ex.submit(lambda a, b=0: a * base + b, 4, b=2).result(timeout=60) == 42
        assert list(ex.map(lambda x: x * x, range(20))) == [x * x for x in range(20)]
        assert list(ex.map(pow, range(10), range(10), chunksize=3)) == [
            pow(x, x) for x in range(10)
        ]
        fs = [ex.submit(abs, -i) for i in range(50)]
        assert sorted(f.result() for f in as_completed(fs, timeout=60)) == list(range(50))
        done, not_done = wait(fs, timeout=60)
        assert len(done) == 50 and not not_done
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(abs, [1], chunksize=0)
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(abs, 1)
    assert rfeval(lambda: 7, connection=conns[1]) == 7  # shutdown left the network open


def test_calls_run_at_once_per_server_and_on_both(conns, cluster) -> None:
    """8 x 0.4 s on 2 servers x nlocaljobs 2: calls overlap on each server (not one at a
    time per server) and both servers take calls. Timing itself is in bench/."""
    network_set(conns, "nlocaljobs", 2)
    with Executor(conns) as ex:
        assert ex.nworkers == 4
        wait([ex.submit(_span, 0.05) for _ in range(8)])  # pools up
        spans = [f.result(timeout=60) for f in [ex.submit(_span, 0.4) for _ in range(8)]]
    by_server: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for pid, ppid, t0, t1 in spans:
        by_server[_server_of(cluster, pid, ppid)].append((t0, t1))
    for k, iv in by_server.items():
        assert iv, f"server {k} ran no call"
        overlap = any(
            a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(iv) for b0, b1 in iv[i + 1 :]
        )
        assert overlap, f"calls ran one at a time on server {k}: {iv}"


def test_remote_error_on_its_own_future(conns) -> None:
    with Executor(conns) as ex:
        fs = [ex.submit(lambda x: 1 // x, x) for x in (1, 0, 2)]
        assert fs[0].result(timeout=60) == 1 and fs[2].result(timeout=60) == 0
        err = fs[1].exception(timeout=60)
        assert isinstance(err, RemoteError)
        assert err.exc_type == "ZeroDivisionError" and "division" in err.message
        assert isinstance(err.original, ZeroDivisionError)
        assert err.host in conns.network.nodes[1].host + conns.network.nodes[2].host
        bad = ex.submit(lambda: threading.Lock())  # the result cannot travel back
        assert isinstance(bad.exception(timeout=60), RemoteError)
        unpicklable = ex.submit(abs, threading.Lock())
        with pytest.raises(TypeError):
            unpicklable.result(timeout=5)


def test_cancel_queued_calls_and_shutdown_cancel_futures(conns) -> None:
    with Executor(conns, max_workers=1) as ex:  # one call out at a time: the rest stay queued
        first = ex.submit(time.sleep, 0.5)
        rest = [ex.submit(abs, -i) for i in range(6)]
        assert all(f.cancel() for f in rest[3:])
        assert not first.cancel() or first.cancelled()  # sent at once: running
        assert [f.result(timeout=60) for f in rest[:3]] == [0, 1, 2]
        for f in rest[3:]:
            assert f.cancelled()
            with pytest.raises(CancelledError):
                f.result()
    ex = Executor(conns, max_workers=1)
    slow = ex.submit(time.sleep, 0.5)
    queued = [ex.submit(abs, 1) for _ in range(5)]
    wait_until(slow.running, 30, "the first call to be sent")
    ex.shutdown(wait=True, cancel_futures=True)
    assert slow.done() and slow.exception() is None
    assert all(f.cancelled() for f in queued)


def test_bad_arguments(conns) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_workers"):
            Executor(conns, max_workers=bad)
    with pytest.raises(TypeError):
        Executor("not connections")  # type: ignore[arg-type]
    with Executor(conns) as ex, pytest.raises(TypeError, match="callable"):
        ex.submit(42)


def test_closed_network(cluster) -> None:
    c = cluster.connect()
    ex = Executor(c)
    f = ex.submit(time.sleep, 30)
    wait_until(lambda: f.running(), 30, "the call to be sent")
    sclose(c)
    assert isinstance(f.exception(timeout=30), ConnectionClosed)
    with pytest.raises(ConnectionClosed):
        ex.submit(abs, 1)
    with pytest.raises(ConnectionClosed):
        Executor(c)


@pytest.mark.kills_workers
def test_server_lost_mid_call_reruns_elsewhere(fresh_cluster, tmp_path) -> None:
    c = fresh_cluster.connect()
    try:
        network_set(c, "nlocaljobs", 2)
        victim = fresh_cluster.workers(0)[0]
        victims = {victim, *children(victim)}  # the worker and its fork server
        marks = str(tmp_path)
        with Executor(c) as ex:
            wait([ex.submit(_span, 0.05) for _ in range(8)])
            for name in os.listdir(marks):
                os.unlink(os.path.join(marks, name))
            fs = [ex.submit(_span, 1.0, marks) for _ in range(8)]

            def started_on_victim() -> bool:
                for name in os.listdir(marks):
                    pid = int(name.split("-")[0])
                    try:
                        with open(f"/proc/{pid}/stat") as f:
                            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    except OSError:
                        continue
                    if victims & {pid, ppid}:
                        return True
                return False

            wait_until(started_on_victim, 30, "calls to run on the first server")
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)
            spans = [f.result(timeout=60) for f in fs]
        assert len(spans) == 8
        assert not c.network.nodes[1].open
        survivors = set(fresh_cluster.workers(1))
        survivors |= {z for w in survivors for z in children(w)}  # their fork servers
        late = [(pid, ppid) for pid, ppid, _, t1 in spans if t1 > killed_at]
        assert late and all({pid, ppid} & survivors for pid, ppid in late), (late, survivors)
        assert rfeval(lambda: 5, connection=c[2]) == 5
    finally:
        sclose(c)


def test_ctrl_c_cancels_queued_and_interrupts_running(conns) -> None:
    network_set(conns, "nlocaljobs", 2)
    main = threading.main_thread().ident
    with Executor(conns) as ex:
        wait([ex.submit(time.sleep, 0.05) for _ in range(8)])
        running = [ex.submit(time.sleep, 60) for _ in range(4)]
        queued = [ex.submit(time.sleep, 60) for _ in range(20)]
        wait_until(lambda: all(f.running() for f in running), 30, "the calls to be sent")

        def ctrl_c() -> None:
            time.sleep(0.5)
            signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]

        threading.Thread(target=ctrl_c, daemon=True).start()
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            running[0].result()
        # every call has its answer well before the 60 s sleeps could end
        done, _ = wait(running + queued, timeout=30)
        assert len(done) == 24 and time.monotonic() - t < 30
        for f in running + queued:
            assert f.cancelled() or isinstance(f.exception(), CancelledError)
        assert any(f.cancelled() for f in queued)
        # the executor and the network stay usable
        assert ex.submit(lambda: 3).result(timeout=60) == 3
    assert rfeval(lambda: 4, connection=conns[2]) == 4


def test_ctrl_c_through_the_with_block_keeps_the_network(conns) -> None:
    """Interrupted in result(), then the with block's exit interrupts again: that is not a
    second Ctrl-C (which would close the network)."""
    main = threading.main_thread().ident
    with pytest.raises(KeyboardInterrupt):
        with Executor(conns) as ex:
            running = ex.submit(time.sleep, 60)
            wait_until(running.running, 30, "the call to be sent")
            threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
            running.result()
    assert isinstance(running.exception(timeout=30), CancelledError)
    assert not conns.network.closed
    assert rfeval(lambda: 6, connection=conns[1]) == 6


def test_forgotten_executor_ends_its_thread(conns) -> None:
    import gc

    ex = Executor(conns)
    assert ex.submit(abs, -2).result(timeout=60) == 2
    thread = ex._thread
    del ex
    gc.collect()
    wait_until(lambda: not thread.is_alive(), 30, "the dispatcher thread to end")
