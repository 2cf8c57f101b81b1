"""``Connections`` objects and the data calls around them: equality and hashing, NumPy indices,
how a closed network shows itself, the type checks of every call taking connections, and the
calls as a server makes them (psend to itself, precv timing out on another server, client-only
calls refused)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import Cluster
from parnet import (
    ConnectionClosed,
    Connections,
    network_get_info,
    precv,
    psend,
    reval,
    sclose,
    select_sockets,
)


@pytest.fixture(scope="module")
def plain() -> Cluster:
    """Two servers without TLS: nothing here depends on the mode."""
    c = Cluster(2, False, first_ip=70)
    yield c
    c.stop()


@pytest.fixture()
def c(plain: Cluster):
    conns = plain.connect()
    yield conns
    sclose(conns)


def test_equal_connections_hash_alike(c: Connections) -> None:
    assert c[1] == c[[1]] == c[1:2] and hash(c[1]) == hash(c[[1]])
    assert c[1:] == c[[1, 2]] and c[1:] != c[[2, 1]] and c[1] != c[2]
    assert c[1] != (1,) and len({c[1], c[[1]], c[2]}) == 2
    other = c.network.single(1)
    assert other is c[1]  # one cached object per node


def test_numpy_integer_index(c: Connections) -> None:
    assert c[np.int64(2)] is c[2] and c[np.int32(-1)] is c[2]
    assert c[np.array([2, 1])].indices == (2, 1)
    with pytest.raises(TypeError, match="index with an int, a slice"):
        c[True]
    with pytest.raises(TypeError, match="got str"):
        c["1"]


def test_closed_network_says_so(plain: Cluster) -> None:
    conns = plain.connect()
    assert "closed" not in repr(conns)
    sclose(conns)
    text = repr(conns)
    assert text.startswith(f"<Connections {conns.network.id_str[:8]} closed: [0] local, ")
    # each server shown closed by sclose (not as if its worker had gone: it exits after)
    for k, host in enumerate(plain.hosts, start=1):
        assert f"[{k}] {host} closed (sclose was called)" in text, text
    assert "closed" in str(conns).splitlines()[0]
    with pytest.raises(ConnectionClosed, match="the network is closed"):
        reval("x = 1", conns[1])
    with pytest.raises(ConnectionClosed, match="the network is closed"):
        psend(1, conns[1])


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x: psend(1, x), "psend"),
        (lambda x: precv(x), "precv"),
        (lambda x: select_sockets(x, 0), "select_sockets"),
        (lambda x: sclose(x), "sclose"),
        (lambda x: network_get_info(x), "network_get_info"),
        (lambda x: reval("1", x), "reval"),
    ],
)
def test_calls_want_connections(call, name: str) -> None:
    with pytest.raises(TypeError, match=f"{name}: expected a Connections object, got list"):
        call([1])


def test_reval_wants_source_text(c: Connections) -> None:
    with pytest.raises(TypeError, match="reval: commands must be a str"):
        reval(b"x = 1", c[1])  # type: ignore[arg-type]


def test_server_side_calls(c: Connections) -> None:
    """At a server: psend to itself sends nothing, precv from another server that sends
    nothing times out naming it, and client-only calls say so."""
    reval(
        "psend(1, sockets[1]); psend(np.zeros(10000), sockets[[0, 1]][1:])\n"
        "try:\n"
        "    precv(sockets[2], timeout=0.2)\n"
        "except TimeoutError as e:\n"
        "    psend(('timeout', str(e)), sockets[0])\n"
        "try:\n"
        "    import parnet\n"
        "    parnet.reval('1', sockets[2])\n"
        "except Exception as e:\n"
        "    psend((type(e).__name__, str(e)), sockets[0])\n"
        "psend('end', sockets[0])",
        c[1],
    )
    kind, text = precv(c[1], timeout=30)
    assert (
        kind == "timeout"
        and text == f"precv: nothing from {c[2].network.nodes[2].host} (node 2) within 0.2 s"
    )
    assert precv(c[1], timeout=30) == ("ParnetError", "reval can only be called at the client")
    assert precv(c[1], timeout=30) == "end"  # nothing else came: the sends to itself went nowhere
    assert select_sockets(c[1:], 0.2) == []
