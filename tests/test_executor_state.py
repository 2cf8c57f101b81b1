"""What an Executor says about itself (open, broken when its network closes, shut down), and
that it needs at least one open server."""

from __future__ import annotations

import pytest

from helpers import wait_until
from parnet import ConnectionClosed, Connections, Executor, sclose


def test_repr_follows_the_state(cluster) -> None:
    c = cluster.connect()
    try:
        ex = Executor(c)
        assert repr(ex) == "<parnet.Executor open: servers [1, 2], 0 calls out, 0 queued>"
        assert ex.submit(abs, -5).result(timeout=60) == 5
        sclose(c)
        wait_until(lambda: repr(ex).startswith("<parnet.Executor broken: "), 30, "broken")
        ex.shutdown()
        assert repr(ex).startswith("<parnet.Executor shut down: ")
    finally:
        sclose(c)


def test_needs_an_open_server(conns: Connections) -> None:
    with pytest.raises(ConnectionClosed, match="Executor: no open server in these connections"):
        Executor(conns[0])  # the local machine alone
    with Executor(conns[[0, 2]]) as ex:  # the local machine is ignored
        assert repr(ex).startswith("<parnet.Executor open: servers [2], ")
        assert ex.submit(abs, -3).result(timeout=60) == 3
