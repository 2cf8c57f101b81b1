"""Core behaviour between real server processes: pconnect, reval, psend/precv, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from helpers import Cluster, wait_until
from parnet import (
    ConnectionClosed,
    Connections,
    RemoteError,
    network_get_info,
    network_set,
    pconnect,
    precv,
    psend,
    reval,
    rfeval,
    sclose,
    select_sockets,
)


def test_reference_example(cluster) -> None:
    c = cluster.connect()
    try:
        # Octave: reval('psend (precv (sockets(2)), sockets(1))', sockets(3)) -> 0-based:
        reval("psend(precv(sockets[1]), sockets[0])", c[2])
        reval("psend(precv(sockets[0]), sockets[2])", c[1])
        psend("some data", c[1])
        assert precv(c[2], timeout=20) == "some data"
    finally:
        sclose(c)


def test_connections_indexing(conns: Connections) -> None:
    assert len(conns) == 3
    assert conns[0].indices == (0,)
    assert conns[1:].indices == (1, 2)
    assert conns[[2, 0]].indices == (2, 0)
    assert conns[[False, True, True]].indices == (1, 2)
    assert [c.indices for c in conns] == [(0,), (1,), (2,)]
    assert conns[1:][0].indices == (1,)
    text = str(conns)
    assert conns.network.id_str in text and "local machine" in text and "open" in text
    with pytest.raises(IndexError):
        conns[[True, False]]


def test_persistent_namespace_and_sockets(conns: Connections) -> None:
    reval("x = 20", conns[1:])
    reval("y = x * 2 + 2", conns[1:])
    reval("psend((y, len(sockets), type(np.zeros(1)).__name__), sockets[0])", conns[1:])
    assert precv(conns[1], timeout=20) == (42, 3, "ndarray")
    assert precv(conns[2], timeout=20) == (42, 3, "ndarray")


def test_big_array_before_receiver_precv(conns: Connections) -> None:
    """psend of 96 MB returns although the server has not called precv yet."""
    a = np.arange(12_000_000, dtype=np.float64)
    t = time.monotonic()
    psend(a, conns[1])
    assert time.monotonic() - t < 20  # returned (the server is idle, not reading)
    a2 = a.copy()
    a[:] = -1  # the sender may reuse its buffer at once
    reval(
        "b = precv(sockets[0]); psend(float(b.sum()), sockets[0]); psend(b[:5], sockets[0])",
        conns[1],
    )
    assert precv(conns[1], timeout=60) == float(a2.sum())
    assert precv(conns[1], timeout=20).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_fifo_order_per_sender(conns: Connections) -> None:
    for k in range(200):
        psend(k, conns[1:])
    reval("psend([precv(sockets[0]) for _ in range(200)], sockets[0])", conns[1:])
    assert precv(conns[1], timeout=20) == list(range(200))
    assert precv(conns[2], timeout=20) == list(range(200))


def test_server_to_server_large(conns: Connections) -> None:
    reval("psend(np.ones(3_000_000), sockets[2])", conns[1])
    reval("v = precv(sockets[1]); psend(v.sum(), sockets[0])", conns[2])
    assert precv(conns[2], timeout=60) == 3_000_000.0


def test_remote_error_fields_and_recovery(conns: Connections) -> None:
    reval("def f():\n    raise KeyError('missing-key')\nf()", conns[1])
    with pytest.raises(RemoteError) as ei:
        precv(conns[1], timeout=20)
    e = ei.value
    assert e.node == 1 and e.host == conns.network.nodes[1].host
    assert e.exc_type == "KeyError" and "missing-key" in e.message
    assert "raise KeyError" in e.remote_traceback and "f()" in e.remote_traceback
    assert isinstance(e.original, KeyError) and e.__cause__ is e.original
    assert "KeyError" in str(e)
    # the network is still usable, and the other server was never affected
    reval("psend('fine', sockets[0])", conns[1:])
    assert precv(conns[1], timeout=20) == "fine"
    assert precv(conns[2], timeout=20) == "fine"


def test_remote_error_unpicklable_exception(conns: Connections) -> None:
    reval(
        "import threading\nclass E(Exception):\n    def __init__(self):\n        super().__init__('bad')\n"
        "        self.lock = threading.Lock()\nraise E()",
        conns[2],
    )
    with pytest.raises(RemoteError) as ei:
        select_sockets(conns[1:], 20)
        select_sockets(conns[1:], 20)
    assert ei.value.original is None and ei.value.node == 2 and "bad" in ei.value.message


def test_error_raised_in_waiting_precv(conns: Connections) -> None:
    """A precv already waiting on a server ends with RemoteError when it fails."""
    reval("import time; time.sleep(0.3); 1/0", conns[1])
    t = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        precv(conns[1], timeout=30)
    assert ei.value.exc_type == "ZeroDivisionError"
    assert time.monotonic() - t < 20


def test_error_raised_in_precv_waiting_without_timeout(conns: Connections) -> None:
    """Without a timeout a plain precv waits on the data link alone; the failure still ends it
    (the worker's NOTICE on the data link wakes it)."""
    reval("import time; time.sleep(0.3); 1/0", conns[1])
    with pytest.raises(RemoteError) as ei:
        precv(conns[1])
    assert ei.value.exc_type == "ZeroDivisionError"
    reval("psend('after', sockets[0])", conns[1])
    assert precv(conns[1]) == "after"


def test_error_right_after_a_value_is_not_missed(conns: Connections) -> None:
    """The value and the NOTICE of the failure after it may arrive in one read: the next
    precv must still raise, not wait for a value that never comes."""
    for _ in range(20):
        reval("psend(1, sockets[0]); 1/0", conns[1])
        got = []
        for _ in range(2):  # the value and the error, in either order (the error may come first)
            try:
                got.append(precv(conns[1]))
            except RemoteError as e:
                got.append(e.exc_type)
        assert sorted(got, key=str) == [1, "ZeroDivisionError"]


def test_output_printed_while_precv_waits_without_timeout(
    cluster: Cluster, capfd: pytest.CaptureFixture[str]
) -> None:
    c = cluster.connect(forward_output=True)
    try:
        reval(
            "print('tok-while-waiting', flush=True); import time; time.sleep(0.5); psend(2, sockets[0])",
            c[1],
        )
        assert precv(c[1]) == 2
        assert "tok-while-waiting" in capfd.readouterr().err  # printed during the wait
    finally:
        sclose(c)


def test_output_printed_before_a_value_is_shown_before_it_returns(
    cluster: Cluster, capfd: pytest.CaptureFixture[str]
) -> None:
    """What a server's code prints before it sends a value (rfeval's result, a psend to the
    client) or fails is shown by the time that call returns or raises, every time (a
    notebook shows it in the cell that ran the call, not a later one)."""
    c = cluster.connect(forward_output=True)
    try:
        for i in range(30):
            assert rfeval(lambda i=i: print(f"tok-rf-{i}", flush=True) or i, connection=c[1]) == i
            assert f"tok-rf-{i}" in capfd.readouterr().err, i
            reval(f"print('tok-ps-{i}'); psend({i}, sockets[0])", c[1])
            assert precv(c[1]) == i
            assert f"tok-ps-{i}" in capfd.readouterr().err, i
            with pytest.raises(RemoteError):
                rfeval(lambda i=i: print(f"tok-err-{i}") or 1 / 0, connection=c[1])
            assert f"tok-err-{i}" in capfd.readouterr().err, i
    finally:
        sclose(c)


def test_printing_server_does_not_flood_the_data_link(cluster: Cluster) -> None:
    """Forwarded output is announced on the data link (NOTICE, 16 bytes) at most every 50 ms,
    not once per output frame."""
    import fcntl
    import struct
    import termios

    c = cluster.connect(forward_output=True)
    try:
        reval(
            "import time\nfor i in range(200):\n    print('tok-line', i, flush=True)\n    time.sleep(0.002)",
            c[1],
        )
        assert rfeval(len, "done", connection=c[1]) == 4  # the printing command has ended
        fd = c.network.nodes[1].data.fileno()
        unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        assert (
            unread <= 40 * 16 + 64
        )  # about one per 50 ms of output (and a heartbeat or two), not 200
        reval("psend('after', sockets[0])", c[1])
        assert precv(c[1]) == "after"
    finally:
        sclose(c)


def test_error_raised_by_next_reval(conns: Connections) -> None:
    reval("undefined_name_xyz", conns[1])
    with pytest.raises(RemoteError) as ei:
        wait_until(lambda: reval("pass", conns[1]) and False, 20, "the error")
    assert ei.value.exc_type == "NameError"


def test_select_sockets(conns: Connections) -> None:
    assert select_sockets(conns, 0) == []
    reval("psend('a', sockets[0])", conns[2])
    ready = select_sockets(conns, 20)
    assert ready == [2]
    assert select_sockets(conns[[2, 1]], 0) == [0]
    assert precv(conns[2], timeout=5) == "a"
    assert select_sockets(conns, 0.05) == []


def test_closures_and_lambdas(conns: Connections) -> None:
    base = 10

    def add(x: int) -> int:
        return x + base

    assert rfeval(add, 5, connection=conns[1]) == 15
    psend(lambda v: v * base, conns[2])
    reval("fn = precv(sockets[0]); psend(fn(4), sockets[0])", conns[2])
    assert precv(conns[2], timeout=20) == 40


def test_rfeval_options(conns: Connections) -> None:
    assert rfeval(divmod, 17, 5, connection=conns[1], nout=2) == [3, 2]
    assert rfeval(divmod, 17, 5, connection=conns[1], nout=2, isout=[False, True]) == [2]
    assert rfeval(lambda a, b=1: a * b, 3, b=4, connection=conns[2]) == 12
    assert rfeval(lambda: 7, connection=conns[1], wait=False) is None
    assert precv(conns[1], timeout=20) == 7
    with pytest.raises(RemoteError) as ei:
        rfeval(lambda: [][1], connection=conns[1])
    assert ei.value.exc_type == "IndexError"
    with pytest.raises(ValueError):
        rfeval(len, [], connection=conns[0])
    with pytest.raises(ValueError):
        rfeval(len, [], connection=conns[1:])


def test_info_and_set(conns: Connections) -> None:
    info = network_get_info(conns)
    assert [i.real_node_id for i in info] == [0, 1, 2]
    assert info[0].local_machine and info[0].peername == ""
    assert all(i.open for i in info) and len({i.network_id for i in info}) == 1
    assert info[1].peername == conns.network.nodes[1].host and info[1].nproc >= 1
    network_set(conns[1], "nlocaljobs", 3)
    assert network_get_info(conns[1])[0].nlocaljobs == 3
    with pytest.raises(ValueError):
        network_set(conns, "nlocaljobs", -1)
    with pytest.raises(ValueError):
        network_set(conns, "bogus", 1)


def test_timeouts_and_self(conns: Connections) -> None:
    with pytest.raises(TimeoutError):
        precv(conns[1], timeout=0.2)
    with pytest.raises(ValueError):
        precv(conns[0])
    with pytest.raises(ValueError):
        precv(conns[1:])
    reval(
        "try:\n    precv(sockets[1])\nexcept ValueError as e:\n    psend('self:' + str(e), sockets[0])",
        conns[1],
    )
    assert precv(conns[1], timeout=20).startswith("self:")


def test_worker_cwd(conns: Connections, tmp_path, monkeypatch) -> None:
    import os
    import tempfile

    reval("import os; psend(os.getcwd(), sockets[0])", conns[1])
    assert precv(conns[1], timeout=20) in (os.getcwd(), tempfile.gettempdir())


def test_two_clients_one_server(cluster) -> None:
    a = cluster.connect()
    b = cluster.connect()
    try:
        reval("v = 'A'", a[1:])
        reval("v = 'B'", b[1:])
        reval("psend(v, sockets[0])", a[1])
        reval("psend(v, sockets[0])", b[1])
        assert precv(a[1], timeout=20) == "A"
        assert precv(b[1], timeout=20) == "B"
        assert a.network.netid != b.network.netid
    finally:
        sclose(a)
        sclose(b)


def test_sclose_idempotent_and_context_manager(cluster) -> None:
    with cluster.connect() as c:
        reval("x = 1", c[1:])
        workers = cluster.workers(0)
        assert workers
    sclose(c)  # idempotent
    assert c.network.closed
    with pytest.raises(ConnectionClosed):
        psend(1, c[1])
    wait_until(lambda: not set(workers) & set(cluster.workers(0)), 15, "workers to exit")


def test_host_validation(cluster) -> None:
    with pytest.raises(ValueError):
        pconnect([cluster.hosts[0], cluster.hosts[0]], use_tls=cluster.tls)
    with pytest.raises(ValueError):
        pconnect([])
    with pytest.raises(ValueError, match="loopback"):
        pconnect(["10.255.255.1:1", "localhost:1"], use_tls=cluster.tls, timeout=1)
