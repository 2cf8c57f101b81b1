"""Bad arguments get a clear TypeError/ValueError naming the argument, before anything is sent
(client calls), or a one-line message without a Python traceback (``parnet`` command line)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import parnet
from helpers import Cluster, free_port_pair, stop_pid
from parnet import (
    ConnectError,
    ParnetError,
    netarrayfun,
    netcellfun,
    parcellfun,
    pconnect,
    precv,
    psend,
    reval,
    rfeval,
    sclose,
    select_sockets,
)
from parnet.server.launch import pserver, start_background


@pytest.fixture(scope="module")
def plain() -> Cluster:
    """Two servers without TLS: the checks do not depend on the mode."""
    c = Cluster(2, False, first_ip=60)
    yield c
    c.stop()


@pytest.fixture()
def c(plain: Cluster):
    conns = plain.connect()
    yield conns
    sclose(conns)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parnet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# -- pconnect ---------------------------------------------------------------------------


def test_host_port_not_a_number() -> None:
    with pytest.raises(ValueError, match=r"host '127\.0\.0\.2:abc': port 'abc' is not a number"):
        pconnect(["127.0.0.2:abc"], use_tls=False)
    with pytest.raises(ValueError, match=r"host '\[::1\]:x'"):
        pconnect(["[::1]:x"], use_tls=False)


def test_host_port_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"host '127\.0\.0\.2:99999': port 99999 is out of range"):
        pconnect(["127.0.0.2:99999"], use_tls=False)
    with pytest.raises(ValueError, match="out of range"):
        pconnect(["127.0.0.2:0"], use_tls=False)


def test_host_not_a_str() -> None:
    with pytest.raises(TypeError, match="host must be a str"):
        pconnect(["127.0.0.2", 5], use_tls=False)


def test_pconnect_timeout_and_heartbeat() -> None:
    with pytest.raises(TypeError, match="pconnect: timeout must be a number"):
        pconnect(["127.0.0.2:20000"], use_tls=False, timeout="x")
    with pytest.raises(ValueError, match="pconnect: timeout must be > 0"):
        pconnect(["127.0.0.2:20000"], use_tls=False, timeout=0)
    with pytest.raises(ValueError, match="pconnect: heartbeat must be > 0"):
        pconnect(["127.0.0.2:20000"], use_tls=False, heartbeat=-1)


def test_pconnect_user_without_terminal() -> None:
    """No terminal and nothing on stdin: a ConnectError that says so, not a bare EOFError."""
    code = (
        "import parnet\n"
        "try:\n"
        "    parnet.pconnect(['127.0.0.2:20000'], user='alice')\n"
        "except parnet.ConnectError as e:\n"
        "    print('ConnectError:', e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # no controlling terminal
    assert r.returncode == 0, r.stderr
    assert "ConnectError: pconnect(user='alice'): no terminal to ask for the password" in r.stdout
    assert "EOFError" not in r.stdout + r.stderr


# -- calls on a network -------------------------------------------------------------------


def test_precv_timeout_type(c) -> None:
    with pytest.raises(TypeError, match="precv: timeout must be a number"):
        precv(c[1], timeout="abc")


def test_select_sockets_timeout_type(c) -> None:
    with pytest.raises(TypeError, match="select_sockets: timeout must be a number"):
        select_sockets(c, "x")


def test_verbose_type(c) -> None:
    with pytest.raises(TypeError, match="netcellfun: verbose must be an int"):
        netcellfun(c, abs, [1, 2], verbose="yes")
    with pytest.raises(TypeError, match="netarrayfun: verbose must be an int"):
        netarrayfun(c, abs, [1, 2], verbose="yes")
    with pytest.raises(TypeError, match="parcellfun: verbose must be an int"):
        parcellfun(1, abs, [1, 2], verbose="yes")


def test_index_float(c) -> None:
    with pytest.raises(TypeError, match="Connections index must be an int, a slice, or a list"):
        c[1.0]
    with pytest.raises(TypeError, match="Connections index"):
        c[[1.0]]


def test_index_duplicates(c) -> None:
    with pytest.raises(ValueError, match="names a node twice"):
        c[[1, 1]]
    with pytest.raises(ValueError, match="names a node twice"):
        c[[1, -2]]  # the same node, once from each end
    psend("once", c[[1, 2]])  # each node once: exactly one value each
    reval("psend(precv(sockets[0]), sockets[0])", c[1:])
    assert precv(c[1], timeout=20) == "once" and precv(c[2], timeout=20) == "once"
    assert select_sockets(c[1:], 0.2) == []


def test_rfeval_not_callable(c) -> None:
    with pytest.raises(TypeError, match="rfeval: func must be callable, got int 123"):
        rfeval(123, 4, connection=c[1])
    assert rfeval(abs, -3, connection=c[1]) == 3  # nothing was sent: no error waits


def test_map_without_servers(c) -> None:
    with pytest.raises(ValueError, match="netcellfun: no servers in these connections"):
        netcellfun(c[0], abs, [1, 2])
    with pytest.raises(ValueError, match="netarrayfun: no servers"):
        netarrayfun(c[[0]], abs, [1, 2])


# -- the server's command line and pserver ---------------------------------------------------


@pytest.mark.parametrize("value", ["70000", "-1", "0", "abc"])
def test_server_port_out_of_range(value: str) -> None:
    r = cli("server", "--no-tls", "--cmd-port", value, "--data-port", "30001")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(
        rf"argument --cmd-port: port '?{value}'? (is out of range \(1-65535\)|is not a number)",
        r.stderr,
    ), r.stderr
    with pytest.raises((ValueError, TypeError), match="cmd_port: port"):
        pserver(use_tls=False, cmd_port=int(value) if value.lstrip("-").isdigit() else value)


def test_server_same_ports() -> None:
    r = cli("server", "--no-tls", "--cmd-port", "30002", "--data-port", "30002")
    assert (
        r.returncode == 2 and "--cmd-port and --data-port must differ (both are 30002)" in r.stderr
    )
    assert "in use" not in r.stderr
    with pytest.raises(ValueError, match="must differ"):
        pserver(use_tls=False, cmd_port=30002, data_port=30002)


def test_server_log_file_in_missing_directory(tmp_path) -> None:
    bad = str(tmp_path / "nonexistent" / "x.log")
    r = cli("server", "--no-tls", "--cmd-port", "30004", "--data-port", "30005", "--log-file", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--log-file {bad}: directory {tmp_path / 'nonexistent'} does not exist" in r.stderr
    with pytest.raises(ParnetError, match="cannot open the log file"):
        start_background(use_tls=False, cmd_port=30004, data_port=30005, log_file=bad)


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"parnet {parnet.__version__} (Python ")


def test_server_prints_its_log_file(tmp_path) -> None:
    log = tmp_path / "server.log"
    for _ in range(5):  # another test's server may hold the port pair
        port = free_port_pair()
        r = cli(
            "server",
            "--no-tls",
            "--bind",
            "127.0.0.61",
            "--cmd-port",
            str(port),
            "--data-port",
            str(port + 1),
            "--allow-root",
            "--log-file",
            str(log),
        )
        if "in use" not in r.stderr:
            break
    m = re.search(r"started \(pid (\d+)\)", r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr
    try:
        assert r.stdout.rstrip().endswith(f"log: {log}") and log.exists()
    finally:
        stop_pid(int(m.group(1)))


def test_connect_error_is_still_a_connect_error() -> None:
    """Checks come first, but a well-formed host that is not there still fails to connect."""
    with pytest.raises(ConnectError):
        pconnect(["127.0.0.62:20002"], use_tls=False, timeout=2)
