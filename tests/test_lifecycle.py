"""Lifecycle of client networks on real servers: workers exit on sclose and when the client,
the worker or the whole server dies; nothing leaks over many networks; one client's sclose
leaves another's alone; the worker's working directory.

Servers here listen on 127.0.0.40 .. 127.0.0.47 on random ports and are stopped by pid.
Every wait is on a condition with a deadline; a kill during a waiting ``precv`` is started
by a thread that waits until ``precv`` is inside its poll.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    MODE_IDS,
    MODES,
    Cluster,
    all_children,
    descendants,
    fd_count,
    pid_alive,
    reaped,
    wait_until,
)
from parnet import (
    ConnectionClosed,
    Connections,
    network_get_info,
    precv,
    psend,
    pserver,
    reval,
    sclose,
)

PROMPT = 5.0  # seconds for a waiting precv to notice a dead peer


# -- helpers ---------------------------------------------------------------------------
def wait_idle(cluster: Cluster) -> None:
    """Until no server of ``cluster`` has a worker (left over from an earlier test)."""
    for pid in cluster.pids:
        wait_until(lambda: not all_children(pid), 15, f"server {pid} to have no workers")  # noqa: B023


def ask(conns: Connections, code: str, timeout: float = 20) -> list[Any]:
    """Runs ``code`` (which must psend one value to sockets[0]) at each server; their values."""
    reval(code, conns)
    return [precv(conns[k], timeout=timeout) for k in range(len(conns))]


def worker_pid(conns: Connections) -> int:
    """The pid of the worker serving the one server ``conns``."""
    (pid,) = ask(conns, "import os; psend(os.getpid(), sockets[0])")
    return pid


class _SignalOnPoll:
    """A poll object that sets ``entered`` each time someone waits in it."""

    def __init__(self, real: Any, entered: threading.Event) -> None:
        self._real = real
        self._entered = entered

    def poll(self, *args: Any) -> Any:
        self._entered.set()
        return self._real.poll(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def kill_while_precv_waits(
    conns: Connections, k: int, pids: list[int], timeout: float = 30
) -> float:
    """``precv(conns[k])`` (nothing will come) while another thread kill -9s ``pids`` as soon as
    that precv waits in its poll. Asserts ConnectionClosed; returns seconds from kill to raise."""
    node = conns.network.nodes[k]
    entered = threading.Event()
    node._poller = _SignalOnPoll(node.poller(), entered)  # precv's wait on data + command link
    killed_at: list[float] = []

    def killer() -> None:
        if entered.wait(timeout):
            killed_at.append(time.monotonic())
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        with pytest.raises(ConnectionClosed):
            precv(conns[k], timeout=timeout)
        done = time.monotonic()
    finally:
        entered.set()
        th.join(timeout)
    assert killed_at, "precv never waited"
    return done - killed_at[0]


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout (binary pipe), within ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        r, _, _ = select.select([fd], [], [], max(0.0, left))
        if not r:
            raise AssertionError(
                f"no line from the client process within {timeout} s (got {buf!r})"
            )
        chunk = os.read(fd, 4096)
        if not chunk:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"the client process ended: {buf!r} {err}")
        buf += chunk
    return buf.decode().strip()


@pytest.fixture(scope="module", params=MODES, ids=MODE_IDS)
def lc_cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Two servers for the module, in each mode."""
    c = Cluster(2, request.param, first_ip=42 if request.param else 40)
    yield c
    c.stop()


@pytest.fixture()
def idle(lc_cluster: Cluster) -> Cluster:
    """The module's cluster with no worker left from an earlier test."""
    wait_idle(lc_cluster)
    return lc_cluster


@pytest.fixture(params=MODES, ids=MODE_IDS)
def doomed(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Two servers for one test that kills one of them."""
    c = Cluster(2, request.param, first_ip=46 if request.param else 44)
    yield c
    c.stop()
    for pid in c.pids:
        for p in descendants(pid):  # orphans of a killed daemon, if a test failed half-way
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


# -- sclose and leaks ---------------------------------------------------------------------------
def test_sclose_ends_every_worker(idle: Cluster) -> None:
    c = idle.connect()
    try:
        wpids = [worker_pid(c[k]) for k in (1, 2)]
        assert [idle.workers(0), idle.workers(1)] == [[wpids[0]], [wpids[1]]]
    finally:
        sclose(c)
    wait_until(lambda: all(reaped(p) for p in wpids), 15, "the workers to exit and be reaped")
    wait_until(lambda: not any(all_children(p) for p in idle.pids), 15, "no children left")
    assert all(pid_alive(p) for p in idle.pids)


def test_no_leaks_over_30_networks(idle: Cluster) -> None:
    def cycle() -> None:
        c = idle.connect()
        try:
            reval("psend(precv(sockets[1]), sockets[0])", c[2])  # through the server mesh
            reval("psend(('x', 7), sockets[2]); psend(sum(range(10)), sockets[0])", c[1])
            assert precv(c[1], timeout=20) == 45
            assert precv(c[2], timeout=20) == ("x", 7)
            psend(b"\0" * 100_000, c[1:])
        finally:
            sclose(c)

    cycle()  # warm up (lazy imports, TLS contexts) before the baseline
    wait_idle(idle)
    base_fds = [fd_count(p) for p in idle.pids]
    base_own = fd_count(os.getpid())
    for _ in range(30):
        cycle()

    def now() -> tuple[list[int], list[int], int]:
        return (
            [fd_count(p) for p in idle.pids],
            [len(all_children(p)) for p in idle.pids],
            fd_count(os.getpid()),
        )

    try:
        wait_until(
            lambda: now() == (base_fds, [0, 0], base_own), 20, "fds and children back to baseline"
        )
    except AssertionError as e:
        raise AssertionError(
            f"{e}: (server fds, server children, client fds) were "
            f"{(base_fds, [0, 0], base_own)}, now {now()}"
        ) from None


def test_one_clients_sclose_leaves_the_other(idle: Cluster) -> None:
    a = idle.connect()
    b = idle.connect()
    try:
        reval("v = 'A'", a[1:])
        reval("v = 'B'", b[1:])
        wa = [worker_pid(a[k]) for k in (1, 2)]
        wb = [worker_pid(b[k]) for k in (1, 2)]
        assert not set(wa) & set(wb)
        sclose(a)
        wait_until(lambda: all(reaped(p) for p in wa), 15, "a's workers to exit")
        assert all(pid_alive(p) for p in wb)
        assert ask(b[1:], "psend(v, sockets[0])") == ["B", "B"]
        reval("psend(v + '2', sockets[2])", b[1])  # b's server-to-server link is intact
        reval("psend(precv(sockets[1]), sockets[0])", b[2])
        assert precv(b[2], timeout=20) == "B2"
        assert all(i.open for i in network_get_info(b))
        assert not any(i.open for i in network_get_info(a))
    finally:
        sclose(a)
        sclose(b)


# -- a client that dies ---------------------------------------------------------------------
CLIENT = r"""
import sys, time
from parnet import pconnect, precv, reval
c = pconnect(sys.argv[2:], use_tls=sys.argv[1] == "1")
reval("import os, time; psend(os.getpid(), sockets[0]); time.sleep(600)", c[1])  # busy worker
reval("import os; psend(os.getpid(), sockets[0])", c[2])  # idle worker
print("ready", precv(c[1], timeout=30), precv(c[2], timeout=30), flush=True)
time.sleep(600)
"""


def test_client_killed_workers_exit(idle: Cluster) -> None:
    other = idle.connect()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "1" if idle.tls else "0", *idle.hosts],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        word, *pids = read_line(proc, 60).split()
        assert word == "ready"
        wpids = [int(p) for p in pids]
        assert wpids[0] in idle.workers(0) and wpids[1] in idle.workers(1)
        proc.kill()
        proc.wait(10)
        wait_until(lambda: all(reaped(p) for p in wpids), 15, "the dead client's workers to exit")
        # the daemons serve on: an open network and a new one
        assert ask(other[1:], "psend('still here', sockets[0])") == ["still here"] * 2
        with idle.connect() as c:
            assert ask(c[1:], "psend(len(sockets), sockets[0])") == [3, 3]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()  # type: ignore[union-attr]
        sclose(other)


# -- a worker or a server that dies ---------------------------------------------------------
def _check_lost_and_other_works(c: Connections) -> None:
    """Server 1 of ``c`` is gone: the client knows, and server 2 works on."""
    info = network_get_info(c)
    assert not info[1].open and info[2].open
    with pytest.raises(ConnectionClosed):
        psend(1, c[1])
    with pytest.raises(ConnectionClosed):
        reval("x = 1", c[1])
    with pytest.raises(ConnectionClosed):
        precv(c[1], timeout=5)
    assert ask(c[2], "psend(21 * 2, sockets[0])") == [42]
    psend([1, 2, 3], c[2])
    assert ask(c[2], "psend(sum(precv(sockets[0])), sockets[0])") == [6]


def test_server_killed(doomed: Cluster) -> None:
    c = doomed.connect()
    try:
        worker_pid(c[1])
        victims = [doomed.pids[0], *descendants(doomed.pids[0])]  # the daemon and its worker
        assert len(victims) >= 2
        took = kill_while_precv_waits(c, 1, victims)
        assert took < PROMPT
        _check_lost_and_other_works(c)
        wait_until(
            lambda: not any(pid_alive(p) for p in victims), 10, "the server's processes to die"
        )
    finally:
        sclose(c)


def test_server_stopped_with_live_network(doomed: Cluster) -> None:
    """``pserver("kill")`` of a server that a network uses, its worker busy: the daemon and
    the worker end, the client sees that server gone, the other server works on."""
    c = doomed.connect()
    try:
        w = worker_pid(c[1])
        reval("psend('busy', sockets[0]); import time; time.sleep(600)", c[1])
        assert precv(c[1], timeout=20) == "busy"
        t = time.monotonic()
        pserver("kill", cmd_port=doomed.port, bind=doomed.ips[0])
        assert time.monotonic() - t < 10
        assert not pid_alive(doomed.pids[0])
        wait_until(lambda: not pid_alive(w), 10, "the busy worker to end")
        with pytest.raises(ConnectionClosed):
            precv(c[1], timeout=PROMPT)
        _check_lost_and_other_works(c)
    finally:
        sclose(c)


@pytest.mark.kills_workers
def test_worker_killed_daemon_reaps_it(idle: Cluster) -> None:
    c = idle.connect()
    try:
        w = worker_pid(c[1])
        assert idle.workers(0) == [w]
        os.kill(w, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(ConnectionClosed):
            precv(c[1], timeout=30)
        assert time.monotonic() - t < PROMPT
        _check_lost_and_other_works(c)
        # reaped by its daemon: no zombie, children back to none
        wait_until(lambda: reaped(w), 10, "the daemon to reap the killed worker")
        assert not all_children(idle.pids[0])
        assert pid_alive(idle.pids[0])
    finally:
        sclose(c)
    with idle.connect() as c2:  # the daemon serves new networks
        assert ask(c2[1:], "psend('up', sockets[0])") == ["up", "up"]


@pytest.mark.kills_workers
def test_precv_waiting_when_worker_dies(idle: Cluster) -> None:
    c = idle.connect()
    try:
        w = worker_pid(c[1])
        took = kill_while_precv_waits(c, 1, [w])
        assert took < PROMPT
        _check_lost_and_other_works(c)
        wait_until(lambda: reaped(w), 10, "the daemon to reap the killed worker")
    finally:
        sclose(c)


# -- the worker's working directory -----------------------------------------------------------
WHERE = "import os, tempfile; psend((os.getcwd(), tempfile.gettempdir()), sockets[0])"


def test_worker_starts_in_client_cwd(
    idle: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with idle.connect() as c:
        got = ask(c[1:], WHERE)
    assert [cwd for cwd, _ in got] == [os.path.realpath(tmp_path)] * 2


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_worker_starts_in_temp_dir_without_client_cwd(
    kind: str, idle: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "missing":
        fake = str(tmp_path / "does" / "not" / "exist")
    else:
        fake = str(tmp_path / "a-file")
        Path(fake).write_text("not a directory")
    monkeypatch.setattr(os, "getcwd", lambda: fake)
    with idle.connect() as c:
        got = ask(c[1:], WHERE)
    monkeypatch.undo()
    for cwd, tmp in got:
        assert cwd == tmp == os.path.realpath(tempfile.gettempdir())


# -- the client's background reader ------------------------------------------------------------
class _OverlapDetector:
    """Stands in for a link's poll object and records whether two threads were inside its
    ``poll`` at once. The main thread's first call lingers (up to ``linger`` s, until another
    thread comes in) so that an unsynchronised reader shows up deterministically."""

    def __init__(self, real: Any, linger: float) -> None:
        self._real = real
        self._linger = linger
        self._lock = threading.Lock()
        self._inside: set[int] = set()
        self._lingered = False
        self._other_came = threading.Event()
        self.overlap = False

    def poll(self, *args: Any) -> Any:
        me = threading.get_ident()
        with self._lock:
            self._inside.add(me)
            if len(self._inside) > 1:
                self.overlap = True
                self._other_came.set()
        try:
            if me == threading.main_thread().ident and not self._lingered:
                self._lingered = True
                self._other_came.wait(self._linger)
            return self._real.poll(*args)
        finally:
            with self._lock:
                self._inside.discard(me)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_output_reader_never_reads_a_link_a_call_is_using(idle: Cluster) -> None:
    """The client's output reader reads command links (forwarded output, errors) only while
    no call uses them: a link's poll object is never used by two threads at once (it raises
    'RuntimeError: concurrent poll() invocation'). Output arrives while a call's error check
    lingers in that poll, so an unsynchronised reader would come in."""
    c = idle.connect()
    link = c.network.nodes[1].cmd
    real = link._poller
    det = _OverlapDetector(real, linger=2.0)
    try:
        reval("import time; time.sleep(0.3); print('while a call waits')", c[1])
        link._poller = det
        reval("x = 1", c[1])  # checks the command link for reported errors on the way
    finally:
        link._poller = real
        sclose(c)
    assert not det.overlap, "the output reader polled the command link during reval"
