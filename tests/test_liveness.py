"""Liveness (API.md, "Liveness"), the client's imports, and output as it is printed.

* Busy is not dead: a call that holds the GIL in C code for 4x the heartbeat (``sleep`` of
  libc called through ``ctypes.PyDLL``, which keeps the GIL, unlike ``time.sleep``) returns
  its result, and the node stays open; so does a worker frozen by SIGSTOP (its kernel still
  acknowledges), which only a call's own timeout ends; a frozen client keeps its workers.
* A killed peer is reported at once (long before its heartbeat).
* ``pconnect(heartbeat=...)`` takes only a number of seconds > 0.
* The client's working directory is first on the worker's ``sys.path``; a module missing at
  the server says where it must be.
* What a server prints reaches the client's stderr while the client does nothing.

A link cut (machine or network gone) needs hosts in network namespaces: tests/test_netbed.py.
Servers here listen on 127.0.0.70 .. 127.0.0.75 on random ports and are stopped by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fault_tools import ClientProc, gone, kill_quietly, reaped
from helpers import MODE_IDS, MODES, Cluster, wait_until
from parnet import (
    ConnectionClosed,
    RemoteError,
    netcellfun,
    network_get_info,
    network_set,
    pconnect,
    precv,
    rfeval,
    sclose,
)

HB = 2.0  # heartbeat of these networks, seconds
FIRST_IP = {True: 70, False: 73}


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Two servers per mode for the module."""
    c = Cluster(2, request.param, first_ip=FIRST_IP[request.param])
    yield c
    c.stop()


# libc's sleep called through ctypes.PyDLL keeps the GIL: no Python thread of the worker runs
# meanwhile (neither its heartbeat nor its output thread). A lambda: sent by value.
hold_gil = lambda seconds: __import__("ctypes").PyDLL(None).sleep(seconds)  # noqa: E731


# -- busy is not dead ------------------------------------------------------------------------
def test_call_holding_the_gil_for_4_heartbeats_returns(cluster: Cluster) -> None:
    c = cluster.connect(heartbeat=HB)
    try:
        secs = int(4 * HB)
        t = time.monotonic()
        assert rfeval(hold_gil, secs, connection=c[1]) == 0
        assert time.monotonic() - t >= secs  # it really held the worker that long
        assert all(i.open for i in network_get_info(c))
        assert rfeval(lambda x: x + 1, 1, connection=c[1]) == 2
    finally:
        sclose(c)


def test_map_holding_the_gil_on_every_server_completes(cluster: Cluster) -> None:
    """Every server's worker (nlocaljobs 0: the calls run in the worker itself) holds the GIL
    for 3 heartbeats per element."""
    c = cluster.connect(heartbeat=HB)
    try:
        secs = int(3 * HB)
        out = netcellfun(c, lambda x, s=secs: hold_gil(s) + x, [1, 2])
        assert list(out) == [1, 2]
        assert all(i.open for i in network_get_info(c))
    finally:
        sclose(c)


def test_frozen_worker_is_busy_not_dead(cluster: Cluster) -> None:
    """SIGSTOP: the worker's kernel still acknowledges, so it is alive; a precv on it ends by
    its own timeout, and once continued the worker answers."""
    c = cluster.connect(heartbeat=HB)
    w = rfeval(os.getpid, connection=c[1])
    os.kill(w, signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError):
            precv(c[1], timeout=3 * HB)
        assert network_get_info(c)[1].open
    finally:
        os.kill(w, signal.SIGCONT)
    try:
        assert rfeval(lambda: 7, connection=c[1]) == 7
    finally:
        sclose(c)


FROZEN_CLIENT = r"""
import os, sys
from parnet import pconnect, rfeval
tls, hb, *hosts = sys.argv[1:]
c = pconnect(hosts, use_tls=tls == "1", heartbeat=float(hb))
print("workers", *[rfeval(os.getpid, connection=c[k]) for k in (1, 2)], flush=True)
for line in sys.stdin:
    print("answer", rfeval(lambda x: x * 2, int(line), connection=c[1]), flush=True)
"""


def test_frozen_client_keeps_its_workers(cluster: Cluster) -> None:
    """A client stopped (SIGSTOP, Ctrl-Z) for 3 heartbeats is alive, not gone: its workers stay
    and it goes on once continued; killed, its workers exit."""
    p = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CLIENT, "1" if cluster.tls else "0", str(HB), *cluster.hosts],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    wpids: list[int] = []
    try:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline().split()
        assert line[0] == "workers", line
        wpids = [int(x) for x in line[1:]]
        os.kill(p.pid, signal.SIGSTOP)
        t = time.monotonic()
        # a deadline, not a state: nothing must happen during it
        wait_until(lambda: time.monotonic() - t > 3 * HB, 10, "three heartbeats")
        assert not any(gone(w) for w in wpids), "a worker left its frozen client"
        os.kill(p.pid, signal.SIGCONT)
        p.stdin.write("21\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["answer", "42"]
        p.kill()
        p.wait(10)
        wait_until(lambda: all(gone(w) for w in wpids), 15, "the killed client's workers to exit")
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait(10)
        kill_quietly([w for w in wpids if not gone(w)])


@pytest.mark.kills_workers
def test_killed_peer_is_reported_at_once(cluster: Cluster) -> None:
    """With a heartbeat of 60 s, a precv on a worker that is killed ends in seconds: its
    kernel closes the connection."""
    c = cluster.connect(heartbeat=60)
    try:
        w = rfeval(os.getpid, connection=c[1])
        threading.Timer(0.5, kill_quietly, ([w],)).start()
        t = time.monotonic()
        with pytest.raises(ConnectionClosed):
            precv(c[1], timeout=50)
        assert time.monotonic() - t < 20
        assert not network_get_info(c)[1].open and network_get_info(c)[2].open
        wait_until(lambda: reaped(w), 10, "the daemon to reap the killed worker")  # and log it
    finally:
        sclose(c)


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf")])
def test_heartbeat_must_be_a_positive_number(bad: float) -> None:
    """(Not a number at all, e.g. "2", is a TypeError: tests/test_args.py.)"""
    with pytest.raises(ValueError, match="pconnect: heartbeat must be"):
        pconnect(["127.0.0.70:2"], use_tls=False, heartbeat=bad)


def test_heartbeat_default_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import parnet.client.api

    monkeypatch.setattr(parnet.client.api, "DEFAULT_TIMEOUT", 0.0)
    with pytest.raises(
        ValueError, match="PARNET_HEARTBEAT_TIMEOUT must be a number of seconds > 0"
    ):
        pconnect(["127.0.0.70:2"], use_tls=False)


# -- the client's directory and imports -------------------------------------------------------
def test_modules_of_the_client_directory_import_on_the_server(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rfeval(helpers.triple, ...)`` and a map of it, with ``helpers.py`` in the client's
    working directory (the servers run there: same machine)."""
    mod = f"lv_helpers_{os.getpid()}"
    (tmp_path / f"{mod}.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers = __import__(mod)
    try:
        c = cluster.connect()
        try:
            assert rfeval(helpers.triple, 5, connection=c[1]) == 15
            network_set(c, "nlocaljobs", 2)  # pool processes too
            assert list(netcellfun(c, helpers.triple, list(range(8)))) == [3 * x for x in range(8)]
        finally:
            sclose(c)
    finally:
        sys.modules.pop(mod, None)


def test_missing_module_says_where_it_must_be(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module importable at the client only (not in its working directory)."""
    mod = f"lv_only_here_{os.getpid()}"
    (tmp_path / f"{mod}.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    only_here = __import__(mod)
    try:
        c = cluster.connect()
        try:
            with pytest.raises(RemoteError) as ei:
                rfeval(only_here.f, connection=c[1])
            assert ei.value.exc_type == "ModuleNotFoundError"
            assert "must exist here" in str(ei.value) and "register_pickle_by_value" in str(
                ei.value
            )
        finally:
            sclose(c)
    finally:
        sys.modules.pop(mod, None)


# -- output as it is printed ------------------------------------------------------------------
IDLE_PRINT = textwrap.dedent(r"""
    import sys, time
    from parnet import pconnect, reval
    tls, *hosts = sys.argv[1:]
    c = pconnect(hosts, use_tls=tls == "1", heartbeat=60)
    reval("print('printed remotely', flush=True)", c[1])
    print("sent", flush=True)
    time.sleep(60)  # idle: no parnet call from here on
""")


def test_output_arrives_while_the_client_idles(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client makes no call after ``reval``; the line still reaches its stderr (heartbeats
    of 60 s: no periodic task of the heartbeat thread could bring it in time)."""
    monkeypatch.setenv("PARNET_HEARTBEAT_TIMEOUT", "60")
    proc = ClientProc(IDLE_PRINT, "1" if cluster.tls else "0", *cluster.hosts)
    try:
        proc.expect("sent", 60)
        wait_until(
            lambda: f"[{cluster.hosts[0]}] printed remotely" in proc.stderr_text(),
            10,
            "the remote line on the idle client's stderr",
        )
    finally:
        proc.stop()


# -- the kernel's part (pure) -----------------------------------------------------------------
@pytest.mark.parametrize("hb", [2, 2.5, 3, 5, 7.9, 10, 30, 60, 3600])
def test_keepalive_ends_an_idle_link_within_the_heartbeat(hb: float) -> None:
    """The kernel aborts after ``count`` unanswered probes ``k`` s apart, the first ``k`` s
    after the last acknowledgement: at most ``hb`` s after it, and late enough that one
    lost probe alone does not end a link of 5 s or more."""
    from parnet.transport.heartbeat import keepalive_settings

    k, count = keepalive_settings(hb)
    assert k >= 1 and count >= 1
    assert (count + 1) * k <= hb
    if hb >= 5:
        assert count >= 2


def test_watched_sockets_get_keepalive() -> None:
    import socket

    from parnet.transport.heartbeat import keepalive_settings, set_keepalive

    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    try:
        set_keepalive(a, 10)
        k, count = keepalive_settings(10)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == k
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == k
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == count
    finally:
        for s in (a, b, srv):
            s.close()
