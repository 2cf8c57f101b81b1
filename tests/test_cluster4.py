"""Networks of 3 and 4 servers: install_vars two levels down its tree, a full mesh of 4
carrying values between every pair, select_sockets over 3 peers, and a map whose jobs are
rerun over several survivors after one of 4 servers dies mid-map.

Servers listen on 127.0.0.70-77 (the module's four, plain and TLS) and 127.0.0.80-87 (four
per test that kills one), on random ports, and are stopped by pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fault_tools import bytes_acked
from helpers import MODE_IDS, MODES, Cluster, descendants, wait_until
from parnet import (
    Connections,
    install_vars,
    netcellfun,
    network_set,
    precv,
    psend,
    reval,
    sclose,
    select_sockets,
)

N = 4
BIG = 8 * 1024 * 1024  # bytes of the array that install_vars spreads


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def four(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Four servers for the module, in each mode."""
    c = Cluster(N, request.param, first_ip=74 if request.param else 70)
    yield c
    c.stop()


@pytest.fixture()
def c4(four: Cluster) -> Iterator[Connections]:
    """A fresh network of the client and the module's four servers."""
    c = four.connect()
    yield c
    sclose(c)


def _acked(fd: int) -> int:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return bytes_acked(s)
    finally:
        s.close()


def client_sent(c: Connections) -> list[int]:
    """Bytes the client's links (command + data) to each server have delivered so far."""
    return [
        sum(_acked(link.fileno()) for link in (node.cmd, node.data)) for node in c.network.nodes[1:]
    ]


SERVER_SENT = """
import os, socket
def _acked(fd):
    s = socket.socket(fileno=os.dup(fd))
    try:
        raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
        return int.from_bytes(raw[120:128], 'little')
    finally:
        s.close()
_me = sockets.network.self_index
psend({k: _acked(n.data.fileno()) for k, n in enumerate(sockets.network.nodes)
       if k not in (0, _me) and n.data is not None}, sockets[0])
"""


def server_sent(c: Connections) -> dict[int, dict[int, int]]:
    """For each server: bytes its data link to each other server has delivered so far."""
    reval(SERVER_SENT, c[1:])
    return {k: precv(c[k], timeout=60) for k in range(1, len(c))}


# -- install_vars down a binary tree of 4 ----------------------------------------------------
def test_install_vars_two_levels_down_the_tree(c4: Connections) -> None:
    """The client uploads the data once, to server 1; server 1 forwards it to 2 and 3, and
    server 2 forwards it to 4 (depth 2); every server gets every value."""
    big = np.arange(BIG // 8, dtype=np.float64)
    reval("pass", c4[1:])
    before_c, before_s = client_sent(c4), server_sent(c4)
    install_vars("big", connections=c4[1:], tag="t14")
    reval("psend((float(big.sum()), big.shape, tag), sockets[0])", c4[1:])
    for k in range(1, N + 1):
        assert precv(c4[k], timeout=120) == (float(big.sum()), big.shape, "t14"), k
    after_c, after_s = client_sent(c4), server_sent(c4)
    up = [a - b for a, b in zip(after_c, before_c, strict=True)]
    # (bytes acknowledged: the last delayed ACK may still be on its way, hence 0.9)
    assert up[0] >= 0.9 * BIG, up  # the whole array went to the first server ...
    assert max(up[1:]) < BIG // 8, up  # ... and to no other
    fwd = {k: {j: after_s[k][j] - before_s[k][j] for j in after_s[k]} for k in after_s}
    big_links = sorted((k, j) for k in fwd for j in fwd[k] if fwd[k][j] >= 0.9 * BIG)
    assert big_links == [(1, 2), (1, 3), (2, 4)], fwd  # the binary tree, two levels deep
    small = [fwd[k][j] for k in fwd for j in fwd[k] if (k, j) not in big_links]
    assert max(small) < BIG // 8, fwd


# -- a full mesh of 4 ----------------------------------------------------------------------------
def test_mesh_of_four_between_every_pair(c4: Connections) -> None:
    """Every server sends a value to every other over the server-to-server links, and each
    reports what it received from each (plus the client's own value), in order."""
    psend("from-client", c4[1:])
    reval(
        "me = sockets.network.self_index\n"
        "for j in range(1, len(sockets)):\n"
        "    if j != me:\n"
        "        psend((me, j, np.full(1000, me * 10 + j)), sockets[j])\n"
        "got = {0: precv(sockets[0])}\n"
        "for j in range(1, len(sockets)):\n"
        "    if j != me:\n"
        "        a, b, arr = precv(sockets[j])\n"
        "        got[j] = (a, b, int(arr.sum()))\n"
        "psend(got, sockets[0])\n",
        c4[1:],
    )
    for k in range(1, N + 1):
        got = precv(c4[k], timeout=120)
        want = {0: "from-client"} | {
            j: (j, k, (j * 10 + k) * 1000) for j in range(1, N + 1) if j != k
        }
        assert got == want, k


# -- select_sockets over 3 peers -----------------------------------------------------------------
def test_select_sockets_over_three_peers_at_the_client(c4: Connections) -> None:
    peers = c4[[1, 3, 4]]
    assert select_sockets(peers, 0) == []
    reval("psend('b', sockets[0])", c4[3])
    assert wait_until(lambda: select_sockets(peers, 1.0), 60, "server 3's value") == [1]
    reval("psend('a', sockets[0])", c4[1])
    reval("psend('c', sockets[0])", c4[4])
    assert wait_until(lambda: select_sockets(peers, 1.0) == [0, 1, 2], 60, "all three values")
    assert [precv(peers[k], timeout=30) for k in (1, 0, 2)] == ["b", "a", "c"]
    assert select_sockets(peers, 0) == []


def test_select_sockets_over_three_peers_at_a_server(c4: Connections) -> None:
    """Server 1 waits on servers 2, 3 and 4; it sees 3 first, then all three."""
    reval(
        "peers = sockets[[2, 3, 4]]\n"
        "first = select_sockets(peers, 120)\n"
        "psend('go', sockets[0])\n"
        "import time\n"
        "deadline = time.monotonic() + 120\n"
        "while len(select_sockets(peers, 1.0)) < 3 and time.monotonic() < deadline:\n"
        "    pass\n"
        "psend((first, select_sockets(peers, 0), [precv(p) for p in peers]), sockets[0])\n",
        c4[1],
    )
    reval("psend('three', sockets[1])", c4[3])
    assert precv(c4[1], timeout=120) == "go"
    reval("psend('two', sockets[1])", c4[2])
    reval("psend('four', sockets[1])", c4[4])
    assert precv(c4[1], timeout=120) == ([1], [0, 1, 2], ["two", "three", "four"])


# -- a map rerun over several survivors ------------------------------------------------------------
@pytest.fixture(params=MODES, ids=MODE_IDS)
def doomed4(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Four servers for one test that kills one of them."""
    c = Cluster(N, request.param, first_ip=84 if request.param else 80)
    yield c
    c.stop()
    for pid in c.pids:
        for p in descendants(pid):  # orphans of a killed worker, if the test failed half-way
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


@pytest.mark.kills_workers
def test_map_rerun_over_several_survivors(
    doomed4: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 of one of 4 servers' workers mid-map: its unfinished jobs are rerun and the map
    finishes over the 3 survivors, each of which keeps running jobs after the kill."""
    c = doomed4.connect()
    try:
        network_set(c, "nlocaljobs", 2)
        workers = [doomed4.workers(k)[0] for k in range(N)]
        victim = workers[1]  # server 2
        marks = tmp_path

        def f(x: int) -> int:
            who = os.getpid()
            if who not in workers:  # a pool process: a child of the worker's fork server
                with open(f"/proc/{os.getppid()}/stat") as fh:
                    who = int(fh.read().rsplit(")", 1)[1].split()[1])
            Path(marks, f"s-{x}-{who}-{time.time_ns()}").touch()
            time.sleep(0.1)
            Path(marks, f"d-{x}-{who}").touch()
            return x * 3

        killed_at: list[int] = []

        def killer() -> None:
            def victim_started() -> int:
                return sum(
                    1
                    for p in marks.iterdir()
                    if p.name.startswith("s-") and p.name.split("-")[2] == str(victim)
                )

            wait_until(lambda: victim_started() >= 3, 120, "the victim to run jobs")
            killed_at.append(time.time_ns())
            os.kill(victim, signal.SIGKILL)

        t = threading.Thread(target=killer)
        t.start()
        with caplog.at_level(logging.WARNING, logger="parnet"):
            r = netcellfun(c, f, range(80), chunk_size=1)
        t.join()
        assert r.tolist() == [x * 3 for x in range(80)]
        assert killed_at, "the victim was never killed"
        assert not c.network.nodes[2].open
        assert [n.open for n in c.network.nodes[1:]] == [True, False, True, True]
        reruns = [m for m in caplog.messages if "rerunning" in m]
        assert reruns and int(reruns[0].split("rerunning ")[1].split()[0]) >= 1, caplog.messages
        starts = [p.name.split("-")[1:] for p in marks.iterdir() if p.name.startswith("s-")]
        done = {tuple(p.name.split("-")[1:]) for p in marks.iterdir() if p.name.startswith("d-")}
        survivors = {str(w) for k, w in enumerate(workers) if k != 1}
        after = {who for x, who, ns in starts if who in survivors and int(ns) > killed_at[0]}
        assert after == survivors, (after, survivors)  # all three carried on after the kill
        cut = {x for x, who, ns in starts if who == str(victim) and (x, who) not in done}
        for x in cut:  # a job cut short on the victim ran again on a survivor
            assert any(y == x and who in survivors for y, who, ns in starts), x
        # the three survivors still serve maps
        assert netcellfun(c[[1, 3, 4]], lambda x: x + 1, range(9)).tolist() == list(range(1, 10))
    finally:
        sclose(c)
