"""netcellfun / netarrayfun between real servers: options, errors, reruns after a death."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from helpers import Cluster, children, wait_until
from parnet import (
    RemoteError,
    install_vars,
    netarrayfun,
    netcellfun,
    network_set,
    precv,
    reval,
    rfeval,
    sclose,
)


def test_order_and_uniform_output(conns) -> None:
    r = netcellfun(conns, lambda x: x * 2, range(2000))
    assert isinstance(r, np.ndarray) and r.tolist() == [2 * x for x in range(2000)]
    for cs in (1, 7, 100, 5000):
        assert netcellfun(
            conns, lambda x, y: x - y, range(50), range(0, 100, 2), chunk_size=cs
        ).tolist() == [x - 2 * x for x in range(50)]


def test_local_machine_ignored_and_subsets(conns) -> None:
    assert netcellfun(conns[[0, 2]], abs, [-1, -2, 3]).tolist() == [1, 2, 3]
    assert netcellfun(conns[1], str.upper, ["a", "b"], uniform_output=False) == ["A", "B"]


def test_empty_map(conns) -> None:
    assert netcellfun(conns, abs, []).tolist() == []


def test_netarrayfun_shape_and_not_uniform(conns) -> None:
    a = np.arange(6).reshape(2, 3)
    r = netarrayfun(conns, lambda x, y: x * y, a, a + 1)
    assert r.shape == (2, 3) and r.tolist() == (a * (a + 1)).tolist()
    o = netarrayfun(conns, lambda x: [x] * int(x), a, uniform_output=False)
    assert o.shape == (2, 3) and o.dtype == object and o[1, 2] == [5] * 5


def test_nout(conns) -> None:
    q, r = netcellfun(conns, divmod, range(10), [3] * 10, nout=2)
    assert q.tolist() == [x // 3 for x in range(10)] and r.tolist() == [x % 3 for x in range(10)]


def test_cum_func(conns) -> None:
    assert netcellfun(conns, lambda x: x, range(1001), cum_func=lambda a, b: a + b) == sum(
        range(1001)
    )
    assert (
        netcellfun(conns, lambda x: x, range(1, 7), cum_func=lambda a, b: a * b, chunk_size=2)
        == 720
    )


def test_vectorized(conns) -> None:
    a = np.arange(103.0)
    seen = netarrayfun(conns, lambda v: np.full(len(v), len(v)), a, vectorized=True, chunk_size=10)
    assert seen.max() <= 10 and seen.shape == (103,)
    assert (
        netarrayfun(conns, lambda v: v**2, a, vectorized=True, chunk_size=16).tolist()
        == (a**2).tolist()
    )


def test_error_handler(conns) -> None:
    def handler(err, x):
        return (err.identifier, err.index, "zero" in err.message)

    r = netcellfun(
        conns, lambda x: 1 / x, [1, 0, 2, 0], error_handler=handler, uniform_output=False
    )
    assert r[0] == 1.0 and r[2] == 0.5
    assert r[1] == ("ZeroDivisionError", 1, True) and r[3] == ("ZeroDivisionError", 3, True)


def test_error_without_handler_raises_and_network_usable(conns) -> None:
    with pytest.raises(RemoteError) as ei:
        netcellfun(conns, lambda x: 1 // (x - 500), range(1000))
    e = ei.value
    assert e.exc_type == "ZeroDivisionError" and "element 500" in e.message and e.index == 500
    assert isinstance(e.original, ZeroDivisionError)
    assert netcellfun(conns, lambda x: x + 1, range(10)).tolist() == list(range(1, 11))


def test_uniform_output_checks(conns) -> None:
    with pytest.raises(ValueError, match="uniform_output"):
        netcellfun(conns, lambda x: [x], range(3))


def test_closure_and_verbose(conns, capfd) -> None:
    offset = np.arange(5)

    def f(i):
        return int(offset[i]) * 10

    assert netcellfun(conns, f, range(5), verbose=1).tolist() == [0, 10, 20, 30, 40]
    assert "netcellfun" in capfd.readouterr().err


def test_pool_path_two_levels(conns) -> None:
    """Slow calls go to each server's local pool (processes other than the workers)."""
    network_set(conns, "nlocaljobs", 2)

    def slow(x):
        time.sleep(0.05)
        return os.getpid()

    netcellfun(conns, slow, range(8))  # the pools start (in the background) on first use
    workers = {rfeval(os.getpid, connection=conns[k]) for k in (1, 2)}
    r = netcellfun(conns, slow, range(24), uniform_output=False)
    assert len(r) == 24
    assert set(r) - workers, "no call ran in a pool process"


def test_trivial_map_starts_no_pool(conns) -> None:
    """Trivial calls run in the workers and start no pool processes (issue 13): whether a
    job is slow is judged by its busy time, not by wall time a loaded host inflates."""
    network_set(conns, "nlocaljobs", 2)
    workers = [rfeval(os.getpid, connection=conns[k]) for k in (1, 2)]
    r = netcellfun(conns, lambda x: os.getpid(), range(3000), uniform_output=False)
    assert set(r) <= set(workers), "a trivial call ran outside the workers"
    # the worker's only child is its idle fork server (maps.forkpool), which forked nothing
    kids = [children(w) for w in workers]
    assert all(len(k) == 1 for k in kids), kids
    assert [children(k[0]) for k in kids] == [[], []], (
        "a worker started processes for trivial calls"
    )


def test_slow_map_spreads_over_every_server(tmp_path) -> None:
    """A map starts on two servers and spreads to all when its jobs prove slow (issue 13)."""
    cl = Cluster(4, False, first_ip=30)
    try:
        with cl.connect() as c:
            workers = {rfeval(os.getpid, connection=c[k]) for k in range(1, 5)}
            network_set(c, "nlocaljobs", 1)

            def slow(x):
                time.sleep(0.1)
                return os.getpid()

            assert set(netcellfun(c, slow, range(16))) == workers
    finally:
        cl.stop()


def test_install_vars(conns) -> None:
    big = np.arange(100_000)
    label = "L"  # noqa: F841 - installed by name
    install_vars("big", "label", connections=conns, extra=7)
    reval("psend((int(big.sum()), label, extra), sockets[0])", conns[1:])
    for k in (1, 2):
        assert precv(conns[k], timeout=30) == (int(big.sum()), "L", 7)
    with pytest.raises(NameError):
        install_vars("no_such_name_here", connections=conns)


def test_install_vars_keeps_pending_values(conns) -> None:
    """A user value already queued on a data link is not taken by install_vars."""
    reval("psend('queued', sockets[2])", conns[1])
    install_vars(v=5, connections=conns[1:])
    reval("psend((precv(sockets[1]), v), sockets[0])", conns[2])
    assert precv(conns[2], timeout=30) == ("queued", 5)


@pytest.mark.kills_workers
def test_rerun_after_server_killed(fresh_cluster, tmp_path) -> None:
    """kill -9 of one server's worker mid-map: its jobs rerun on the other; results complete."""
    c = fresh_cluster.connect()
    try:
        victim = fresh_cluster.workers(0)[0]
        marks = str(tmp_path)

        def killer():
            wait_until(lambda: len(os.listdir(marks)) >= 6, 30, "the map to be under way")
            os.kill(victim, signal.SIGKILL)

        t = threading.Thread(target=killer)
        t.start()

        def f(x):
            open(os.path.join(marks, str(x)), "w").close()
            time.sleep(0.05)
            return x * 3

        r = netcellfun(c, f, range(60))
        t.join()
        assert r.tolist() == [x * 3 for x in range(60)]
        assert not c.network.nodes[1].open  # the map noticed the death
        assert netcellfun(c[2], lambda x: x, range(3)).tolist() == [0, 1, 2]  # the survivor works
    finally:
        sclose(c)


def test_job_that_kills_servers_twice(fresh_cluster) -> None:
    c = fresh_cluster.connect()
    try:
        network_set(c, "nlocaljobs", 1)  # in-process: os._exit kills the worker itself
        with pytest.raises(RemoteError, match="lost with two servers"):
            netcellfun(c, lambda x: os._exit(3) if x == 5 else x, range(10), chunk_size=1)
    finally:
        sclose(c)
