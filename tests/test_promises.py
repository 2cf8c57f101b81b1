"""Promises of the API contract that no other file checks on its own (issue 14, item 13; the
map of every promise to its test is tests/API_PROMISES.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from helpers import fd_count, wait_until
from parnet import (
    ConnectError,
    ConnectionClosed,
    RemoteError,
    network_get_info,
    network_set,
    pconnect,
    precv,
    psend,
    reval,
    sclose,
    select_sockets,
)


def test_sockets_at_a_server_in_client_order_own_position_local(conns) -> None:
    """``sockets`` at a server: the client's order, its own position is the local machine."""
    reval(
        "from parnet import network_get_info\n"
        "psend([(i.local_machine, i.real_node_id, i.peername == '') for i in network_get_info(sockets)], "
        "sockets[0])",
        conns[1:],
    )
    for k in (1, 2):
        info = precv(conns[k], timeout=30)
        assert [i[1] for i in info] == [0, 1, 2]
        assert [i[0] for i in info] == [j == k for j in range(3)], (k, info)
        assert info[k][2]  # no peer name for itself
    reval("psend(len(sockets), sockets[0])", conns[2])
    assert precv(conns[2], timeout=30) == len(conns)


def test_reval_returns_once_sent_and_runs_in_order(conns) -> None:
    """reval does not wait for its command: the first one waits for a value only sent after
    reval returned; the second runs after it."""
    reval("got = precv(sockets[0])", conns[1])  # would hang here if reval waited
    reval("psend(('second', got), sockets[0])", conns[1])
    psend("unblock", conns[1])
    assert precv(conns[1], timeout=30) == ("second", "unblock")


def test_reval_and_psend_skip_the_calling_node(conns) -> None:
    reval("x = 3", conns)  # includes the local machine: skipped
    reval("psend(('all', sockets.network.self_index), sockets)", conns[1])  # to every other node
    assert precv(conns[1], timeout=30) == ("all", 1)
    reval("psend((x, precv(sockets[1])), sockets[0])", conns[2])
    assert precv(conns[2], timeout=30) == (3, ("all", 1))


def test_select_sockets_waits_without_limit_and_reports_failures(conns) -> None:
    """Negative or None: no limit; nfds is accepted; a failed command raises RemoteError."""
    reval("psend('late', sockets[0])", conns[2])
    assert select_sockets(conns[1:], None) == [1]
    assert select_sockets(conns[1:], -1, nfds=99) == [1]
    assert precv(conns[2], timeout=30) == "late"
    reval("1 / 0", conns[1])
    with pytest.raises(RemoteError) as ei:
        select_sockets(conns[1:], 30)
    assert isinstance(ei.value, ZeroDivisionError) and ei.value.node == 1
    assert select_sockets(conns[1:], 0) == []


def test_sclose_of_a_subset_closes_the_whole_network(cluster) -> None:
    c = cluster.connect()
    workers = [w for k in (0, 1) for w in cluster.workers(k)]
    reval("x = 1", c[1:])
    sclose(c[2])
    assert c.network.closed and not any(i.open for i in network_get_info(c))
    for k in (1, 2):
        with pytest.raises(ConnectionClosed):
            psend(1, c[k])
    wait_until(
        lambda: not set(workers) & {w for k in (0, 1) for w in cluster.workers(k)},
        20,
        "the workers of both servers to exit",
    )
    sclose(c)  # idempotent


def test_node_info_network_id_and_nlocaljobs_default(conns) -> None:
    info = network_get_info(conns)
    assert str(uuid.UUID(info[0].network_id)) == info[0].network_id
    default = info[1].nlocaljobs
    assert info[1].nproc >= 1
    network_set(conns[1], "nlocaljobs", 1)
    assert network_get_info(conns)[1].nlocaljobs == 1
    network_set(conns[1], "nlocaljobs", 0)  # 0: back to the default
    assert network_get_info(conns)[1].nlocaljobs == default


def test_connect_failure_names_the_server_and_leaves_nothing_open(cluster) -> None:
    """One good server and one that is not there: ConnectError naming the missing one; the good
    server's worker goes and no descriptor is left open here."""
    before = fd_count(os.getpid())
    missing = "127.0.0.99:" + str(cluster.port)
    with pytest.raises(ConnectError, match="127.0.0.99"):
        pconnect([cluster.hosts[0], missing], use_tls=cluster.tls, timeout=10)
    wait_until(lambda: not cluster.workers(0), 20, "the good server's worker to exit")
    wait_until(lambda: fd_count(os.getpid()) <= before, 10, "no descriptor left open")


def test_loopback_name_accepted_first() -> None:
    """``localhost`` first is accepted (the failure is then connecting, not the host list)."""
    with pytest.raises(ConnectError, match="localhost"):
        pconnect(["localhost:1", "192.0.2.1:1"], use_tls=False, timeout=5)


def test_default_parnet_home(tmp_path: Path) -> None:
    """Without PARNET_HOME, keys go to ~/.config/parnet/srp."""
    env = {k: v for k, v in os.environ.items() if k != "PARNET_HOME"}
    env["HOME"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "parnet", "keygen", "erin"],
        input="\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (
        (tmp_path / ".config" / "parnet" / "srp" / "server" / "passwd")
        .read_text()
        .startswith("erin:")
    )
    assert (tmp_path / ".config" / "parnet" / "srp" / "client" / "user_passwd").exists()


HEARTBEAT_FROM_ENV = """
import sys
from parnet import pconnect, sclose
tls, hosts = sys.argv[1] == "1", sys.argv[2:]
try:
    c = pconnect(hosts, use_tls=tls)
except ValueError as e:
    print("default:", e)
else:
    sclose(c)
    print("default: connected")
c = pconnect(hosts, use_tls=tls, heartbeat=3)  # an explicit value wins over the environment
sclose(c)
print("explicit: connected")
"""


@pytest.mark.parametrize("value, default_ok", [("0", False), ("-1", False), ("2.5", True)])
def test_heartbeat_default_from_the_environment(cluster, value: str, default_ok: bool) -> None:
    """``PARNET_HEARTBEAT_TIMEOUT`` is the default heartbeat of ``pconnect``: a value that is not
    > 0 there makes a ``pconnect`` without ``heartbeat=`` fail naming it (so it is read and
    used); an explicit ``heartbeat=`` is used instead of it. (What the heartbeat does is
    tested by the liveness tests.)"""
    env = dict(os.environ, PARNET_HEARTBEAT_TIMEOUT=value)
    r = subprocess.run(
        [sys.executable, "-c", HEARTBEAT_FROM_ENV, "1" if cluster.tls else "0", *cluster.hosts],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    if default_ok:
        assert "default: connected" in r.stdout, r.stdout
    else:
        assert re.search(r"default: .*PARNET_HEARTBEAT_TIMEOUT", r.stdout), r.stdout
    assert "explicit: connected" in r.stdout, r.stdout


def test_promise_map_names_existing_tests() -> None:
    """Every test named in API_PROMISES.md exists (the map stays true as tests move); a
    ``::name`` goes with the file named before it on its line."""
    import ast
    import fnmatch

    here = Path(__file__).parent
    refs = []
    for line in (here / "API_PROMISES.md").read_text().splitlines():
        path = None
        for f, name in re.findall(r"`([\w/]+\.py)?::([\w*]+)(?:\[[^\]]*\])?`", line):
            path = f or path
            assert path, f"::{name} without a file before it: {line}"
            refs.append((path, name))
    assert len(refs) > 80
    missing = []
    for path, name in refs:
        tree = ast.parse((here / path).read_text())
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        if not fnmatch.filter(names, name):
            missing.append(f"{path}::{name}")
    assert not missing, missing
