"""The fault table (STYLE.md section 9): what fails, where, what the client sees, and that
nothing is left behind.

Rows share a body where they can (``pytest.mark.parametrize`` over the table), in the manner
of loky's ``crash_cases``: each row is (what fails, where, expected exception, message
pattern, deadline). Every row also checks that no process or fd is left: each surviving
daemon back to no children and its baseline fd count, every worker and pool process seen
before the fault gone, and this process back to its own baseline fds.

Where the outcome depends on an order that the kernel decides (which end of a dead server's
two links ``precv`` reads first), the row fixes that order, so each row is deterministic.
Rows that exposed parnet bugs keep them covered as regressions.

Servers here listen on 127.0.0.50 .. 127.0.0.63 on random ports and are stopped by pid.
Heartbeats are short (``HB`` s) so that silent peers are noticed in seconds. Client scripts
that get signals (kill -9, Ctrl-C) run as subprocesses. Waits are on conditions with
deadlines; the only fixed waits are CPU-measurement windows.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import parnet.client.api
from fault_tools import (
    Baseline,
    ClientProc,
    RefusingProxy,
    busy_pids,
    bytes_acked,
    cmdline,
    descendants,
    gone,
    kill_quietly,
    log_since,
    log_size,
    pool_processes,
    reaped,
    server_log,
)
from helpers import Cluster, wait_until
from parnet import (
    ConnectError,
    ConnectionClosed,
    Connections,
    RemoteError,
    netcellfun,
    network_get_info,
    network_set,
    precv,
    psend,
    reval,
    rfeval,
    sclose,
)
from parnet.constants import MAGIC, PROTOCOL_VERSION
from parnet.transport import handshake as hs

MODES = [True, False]
MODE_IDS = ["tls" if t else "plain" for t in MODES]
HB = 2.0  # heartbeat timeout for these networks, seconds
PROMPT = 5.0  # seconds for a waiting call to notice a dead peer
# A process using more than this share of a CPU is busy. Low: on a loaded machine a process
# that never stops computing may get a small share, and an idle one uses none.
BUSY = 0.06

# address plan (first octet 127.0.0.): shared clusters, one-test clusters, the proxy row
SHARED_IP = {True: 50, False: 52}
DOOMED_IP = {True: 54, False: 56}
PROXY_IP = {True: (58, 59, 60), False: (61, 62, 63)}


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared() -> Iterator[Callable[[bool], Cluster]]:
    """Two servers per mode for the whole module (started on first use), for rows that do
    not kill a daemon."""
    made: dict[bool, Cluster] = {}

    def get(tls: bool) -> Cluster:
        if tls not in made:
            made[tls] = Cluster(2, tls, first_ip=SHARED_IP[tls])
        return made[tls]

    yield get
    for c in made.values():
        c.stop()


@pytest.fixture()
def reaper() -> Iterator[list[int]]:
    """Pids to SIGKILL at teardown if a failing test left them running (parnet processes
    only: the command line must name python)."""
    pids: list[int] = []
    yield pids
    for p in pids:
        if not gone(p) and "python" in cmdline(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
                os.kill(p, signal.SIGKILL)


def server_pids(c: Connections) -> list[int]:
    """The worker pid serving each server of ``c`` (in order)."""
    return [rfeval(os.getpid, connection=c[k]) for k in range(1, len(c))]


def below(pids: list[int]) -> list[int]:
    """``pids`` and every process below them (workers and their pools), for the leak check."""
    return pids + [p for w in pids for p in descendants(w)]


def check_other_server_works(c: Connections, k: int) -> None:
    """Server ``k`` of ``c`` answers commands and data, both ways."""
    assert rfeval(lambda: 6 * 7, connection=c[k]) == 42
    reval("psend(sum(precv(sockets[0])), sockets[0])", c[k])
    psend(list(range(10)), c[k])
    assert precv(c[k], timeout=20) == 45


def marker_job(mk: str, seconds: float) -> Callable[[int], int]:
    """A map function that leaves ``<pid>-<i>`` in ``mk`` when it starts, then sleeps for
    ``seconds``."""

    def job(i: int) -> int:
        import os
        import time

        open(os.path.join(mk, f"{os.getpid()}-{i}"), "w").close()
        time.sleep(seconds)
        return i

    return job


def started_by(mk: str | Path) -> set[int]:
    """Pids that started a ``marker_job`` so far."""
    return {int(f.split("-")[0]) for f in os.listdir(mk)}


def jobs_of(mk: str | Path, pids: set[int] | list[int], ended: bool | None = None) -> list[str]:
    """The jobs (``<pid>-<i>``) that processes ``pids`` started; with ``ended``, only those
    that did (True) or did not (False) finish."""
    names = set(os.listdir(mk))
    out = [f for f in names if not f.endswith("-end") and int(f.split("-")[0]) in set(pids)]
    if ended is not None:
        out = [f for f in out if (f + "-end" in names) == ended]
    return out


# == 1, 2, 3, 10: a peer fails while the client waits in precv on it ==========================
class _Ordered:
    """precv's poll object (over server k's data and command links), optionally reporting the
    end of one link (``first``) before anything on the other: the two ends of a dead server
    arrive a moment apart, in either order, and each order must give the same answer."""

    def __init__(self, real: Any, first_fd: int | None, entered: threading.Event) -> None:
        self._real = real
        self._first_fd = first_fd
        self._entered = entered
        self._first_seen = first_fd is None

    def poll(self, *args: Any) -> Any:
        if not args or args[0] != 0:
            self._entered.set()
        events = self._real.poll(*args)
        if self._first_seen:
            return events
        if any(fd == self._first_fd for fd, _ in events):
            self._first_seen = True
            return [e for e in events if e[0] == self._first_fd]
        return []  # held back: precv polls again

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def fault_while_precv_waits(
    c: Connections, k: int, fault: Callable[[], None], first: str | None = None
) -> tuple[BaseException | None, float]:
    """``precv(c[k])`` (nothing will come) while another thread runs ``fault`` as soon as that
    precv waits in its poll; ``first``: "cmd" or "data", the link whose end precv sees first.
    Returns (what precv raised, seconds from the fault to the raise)."""
    node = c.network.nodes[k]
    fd = {None: None, "cmd": node.cmd.fileno(), "data": node.data.fileno()}[first]  # type: ignore[union-attr]
    entered = threading.Event()
    node._poller = _Ordered(node.poller(), fd, entered)
    at: list[float] = []
    errors: list[BaseException] = []

    def run() -> None:
        if entered.wait(30):
            at.append(time.monotonic())
            try:
                fault()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    raised: BaseException | None = None
    try:
        precv(c[k], timeout=30)
    except BaseException as e:  # noqa: BLE001 - the caller asserts on it
        raised = e
    done = time.monotonic()
    entered.set()
    th.join(30)
    node._poller = None
    if errors:
        raise errors[0]
    assert at, "precv never waited"
    return raised, done - at[0]


GONE = (
    r"connection closed by the peer|Connection reset by peer|command link closed|data link closed"
)
SHUTTING = r"the server is shutting down \(notice from {host}\)"
NAMED = r"{host} \(node 1"

# what fails, where, whose end precv sees first (None: as it comes), expected, message, within (s)
PRECV_FAULTS = [
    pytest.param("SIGKILL", "server", None, ConnectionClosed, GONE, PROMPT, id="kill-server"),
    pytest.param("SIGKILL", "worker", None, ConnectionClosed, GONE, PROMPT, id="kill-worker"),
    pytest.param(
        "SIGKILL", "worker", "data", ConnectionClosed, NAMED, PROMPT, id="kill-worker-data-first"
    ),
    pytest.param(
        "SIGKILL", "worker", "cmd", ConnectionClosed, NAMED, PROMPT, id="kill-worker-cmd-first"
    ),
    pytest.param(
        "SIGTERM",
        "server",
        "cmd",
        ConnectionClosed,
        SHUTTING,
        PROMPT,
        id="sigterm-server-cmd-first",
    ),
    pytest.param(
        "SIGTERM",
        "server",
        "data",
        ConnectionClosed,
        SHUTTING,
        PROMPT,
        id="sigterm-server-data-first",
    ),
    pytest.param(
        "--kill", "server", "cmd", ConnectionClosed, SHUTTING, PROMPT, id="cli-kill-cmd-first"
    ),
]


def check_peer_fault_while_precv_waits(
    tls: bool,
    how: str,
    where: str,
    first: str | None,
    exc: type,
    pattern: str,
    within: float,
    shared: Callable[[bool], Cluster],
    reaper: list[int],
) -> None:
    """One row: server 1 fails while the client waits in precv on it."""
    own = where == "server"  # the daemon dies: a cluster of its own
    cl = Cluster(2, tls, first_ip=DOOMED_IP[tls]) if own else shared(tls)
    try:
        base = Baseline(cl)
        daemon, host, ip = cl.pids[0], cl.hosts[0], cl.ips[0]
        c = cl.connect(heartbeat=HB)
        try:
            w, w2 = server_pids(c)
            reaper += [w, w2]
            assert cl.workers(0) == [w]

            def fault() -> None:
                if how == "SIGKILL":
                    kill_quietly([daemon, w] if where == "server" else [w])
                elif how == "SIGTERM":
                    os.kill(daemon, signal.SIGTERM)
                else:
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "parnet",
                            "server",
                            "--kill",
                            "--bind",
                            ip,
                            "--cmd-port",
                            str(cl.port),
                        ],
                        check=True,
                        timeout=20,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )

            raised, took = fault_while_precv_waits(c, 1, fault, first)
            assert isinstance(raised, exc), f"expected {exc.__name__}, got {raised!r}"
            assert re.search(pattern.format(host=re.escape(host)), str(raised)), str(raised)
            assert took < within, f"took {took:.1f} s"
            info = network_get_info(c)
            assert not info[1].open and info[2].open
            with pytest.raises(ConnectionClosed):
                reval("x = 1", c[1])
            with pytest.raises(ConnectionClosed):
                psend(1, c[1])
            check_other_server_works(c, 2)
            if where == "server":
                wait_until(lambda: gone(daemon) and gone(w), 5, "the server's processes to end")
            else:
                wait_until(lambda: reaped(w), 10, "the daemon to reap the killed worker")
            procs = below([w, w2])
        finally:
            sclose(c)
        base.check(dead_daemons=[daemon] if where == "server" else [], gone_pids=procs)
    finally:
        if own:
            reaper += [p for pid in cl.pids for p in descendants(pid)]
            cl.stop()


@pytest.mark.kills_workers
@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("how, where, first, exc, pattern, within", PRECV_FAULTS)
def test_peer_fault_while_precv_waits(
    tls: bool,
    how: str,
    where: str,
    first: str | None,
    exc: type,
    pattern: str,
    within: float,
    shared: Callable[[bool], Cluster],
    reaper: list[int],
) -> None:
    check_peer_fault_while_precv_waits(tls, how, where, first, exc, pattern, within, shared, reaper)


# == 4: a pool process killed during a map ===================================================
def _kill_a_pool_process_mid_map(
    cl: Cluster, c: Connections, mk: Path, reaper: list[int]
) -> tuple[RemoteError, list[int]]:
    """Runs a map of slow jobs over both servers (2 local jobs each) and kill -9s a pool
    process of server 1 while it runs a job. Returns the map's error and every process that
    was below the workers before the kill."""
    network_set(c, "nlocaljobs", 2)
    w1, w2 = server_pids(c)
    before: list[int] = []
    victim: list[int] = []

    def killer() -> None:
        p = wait_until(
            lambda: next(iter(started_by(mk) & set(pool_processes(w1))), None),
            30,
            "a pool process of server 1 to run a job",
        )
        before.extend(descendants(w1) + descendants(w2))
        reaper.extend(before)
        victim.append(p)
        os.kill(p, signal.SIGKILL)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        with pytest.raises(RemoteError) as ei:
            netcellfun(c[1:], marker_job(str(mk), 0.3), list(range(40)))
    finally:
        th.join(30)
    assert victim, "no pool process was killed"
    return ei.value, [w1, w2, *before]


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_pool_process_killed_mid_map(
    tls: bool, shared: Callable[[bool], Cluster], tmp_path: Path, reaper: list[int]
) -> None:
    cl = shared(tls)
    base = Baseline(cl)
    c = cl.connect(heartbeat=HB)
    try:
        err, procs = _kill_a_pool_process_mid_map(cl, c, tmp_path, reaper)
        # parnet's answer: the map fails, naming the server and how its pool process died
        assert err.host == cl.hosts[0] and err.node == 1
        assert err.exc_type.endswith("WorkerDiedError")
        assert re.search(r"local pool died .*exit codes \{SIGKILL\(-9\)\}", err.message), (
            err.message
        )
        # the network stays usable
        assert all(i.open for i in network_get_info(c))
        assert rfeval(lambda: 5, connection=c[1]) == 5
        check_other_server_works(c, 2)
        # and so do maps, at the first try (the pool restart once made this one fail)
        mk2 = tmp_path / "next"
        mk2.mkdir()
        out = netcellfun(c[1:], marker_job(str(mk2), 0.05), list(range(12)))
        assert out.tolist() == list(range(12))
        procs += below(procs[:2])  # the replacement pool too
    finally:
        sclose(c)
    base.check(gone_pids=procs)


# == 4b: the same fault where the pool restarts: the chunks it spares =========================
def _pool_chunk(mk: str, i: int) -> int:
    import os
    import time

    open(os.path.join(mk, f"{os.getpid()}-{i}"), "w").close()
    time.sleep(0.5)
    return i


def test_pool_restart_spares_later_chunks(tmp_path: Path, reaper: list[int]) -> None:
    """kill -9 of a pool process with two chunks in flight, every finished chunk submitting the
    next one from its done callback (as WorkerMapRunner does): the two chunks in flight fail
    with WorkerDiedError, every later chunk runs on the restarted pool."""
    from parnet.maps.common import ChunkTask
    from parnet.maps.pool import Pool

    mk, n = str(tmp_path), 8
    outcome: dict[int, str] = {}
    lock = threading.Lock()
    others = set(pool_processes(os.getpid()))  # e.g. the shared pool of earlier parcellfun tests
    pool = Pool(2)
    nxt = iter(range(n))

    def submit_next() -> None:
        with lock:
            i = next(nxt, None)
        if i is not None:
            fut = pool.submit(ChunkTask(functools.partial(_pool_chunk, mk), [[i]], i))
            fut.add_done_callback(lambda f, i=i: done(i, f))

    def done(i: int, f: Any) -> None:
        e = f.exception()
        outcome[i] = "ok" if e is None else type(e).__name__
        submit_next()

    seen: set[int] = set()
    try:
        submit_next()
        submit_next()
        procs = wait_until(
            lambda: len(started_by(mk)) == 2 and started_by(mk),
            60,
            "two chunks to run in two pool processes",
        )
        reaper += list(procs)
        os.kill(min(procs), signal.SIGKILL)
        wait_until(lambda: len(outcome) == n, 60, f"every chunk to end ({outcome})")
        seen |= started_by(mk) | (set(pool_processes(os.getpid())) - others)
        reaper += list(seen)
    finally:
        pool.shutdown(kill=True)
    wait_until(lambda: all(gone(p) for p in seen), 15, "the pool processes to end")
    assert sorted(outcome.items()) == [(0, "WorkerDiedError"), (1, "WorkerDiedError")] + [
        (i, "ok") for i in range(2, n)
    ], outcome


# == 5: the client dies or freezes =============================================================
CLIENT_MAPPING = r"""
import os, sys, time
from parnet import pconnect, network_set, netcellfun, rfeval
tls, mk, hb, *hosts = sys.argv[1:]
c = pconnect(hosts, use_tls=tls == "1", heartbeat=float(hb))
network_set(c, "nlocaljobs", 2)
print("workers", *[rfeval(os.getpid, connection=c[k]) for k in (1, 2)], flush=True)
def job(i, mk=mk):
    import os, time
    open(os.path.join(mk, f"{os.getpid()}-{i}"), "w").close()
    time.sleep(0.3)
    return i
print("waiting", flush=True)
while True:
    netcellfun(c, job, list(range(40)))
"""

# what fails (in the client), deadline for its workers and their pools to be gone. A frozen
# (SIGSTOP) client is alive but busy, not gone: test_liveness.py keeps its workers running.
CLIENT_FAULTS = [
    ("SIGKILL", 15.0),
]


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("sig, within", CLIENT_FAULTS, ids=[r[0] for r in CLIENT_FAULTS])
def test_client_fault_ends_its_workers(
    tls: bool,
    sig: str,
    within: float,
    shared: Callable[[bool], Cluster],
    tmp_path: Path,
    reaper: list[int],
) -> None:
    cl = shared(tls)
    base = Baseline(cl)
    proc = ClientProc(CLIENT_MAPPING, "1" if cl.tls else "0", str(tmp_path), str(HB), *cl.hosts)
    reaper.append(proc.pid)
    try:
        wpids = [int(p) for p in proc.expect("workers", 60).split()]
        reaper += wpids
        proc.expect("waiting", 10)
        wait_until(
            lambda: all(started_by(tmp_path) & set(pool_processes(w)) for w in wpids),
            30,
            "pool processes on both servers to run jobs",
        )
        procs = wpids + [p for w in wpids for p in descendants(w)]
        reaper += procs
        os.kill(proc.pid, getattr(signal, sig))
        wait_until(
            lambda: all(gone(p) for p in procs),
            within,
            f"the workers of the {sig} client and their pools to exit "
            f"({[(p, cmdline(p)[:60]) for p in procs if not gone(p)]})",
        )
    finally:
        proc.stop()
    base.check(gone_pids=procs)


# == 6: a link closed in the middle of a frame ===================================================
RECV_AND_REPORT = """
try:
    x = precv(sockets[0])
    res = 'got %d bytes' % len(x)
except Exception as e:
    res = type(e).__name__ + ': ' + str(e)
open({path!r}, 'w').write(res)
"""

NEXT_CALLS: dict[str, Callable[[Connections], Any]] = {
    "precv": lambda c: precv(c[1], timeout=10),
    "psend": lambda c: psend(1, c[1]),
    "reval": lambda c: reval("y = 1", c[1]),
    "rfeval": lambda c: rfeval(lambda: 1, connection=c[1]),
}
# mode, the client's next call involving server 1
MID_FRAME_ROWS = [
    pytest.param(tls, name, id=f"{mid}-{name}")
    for tls, mid in zip(MODES, MODE_IDS, strict=True)
    for name in ("precv", "psend", "reval", "rfeval")
]


@pytest.mark.parametrize("tls, next_call", MID_FRAME_ROWS)
def test_link_closed_mid_frame(
    tls: bool,
    next_call: str,
    shared: Callable[[bool], Cluster],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    reaper: list[int],
) -> None:
    cl = shared(tls)
    base = Baseline(cl)
    logs = [server_log(cl, k) for k in (0, 1)]
    offsets = [log_size(p) for p in logs]
    c = cl.connect(heartbeat=HB)
    try:
        w1, w2 = server_pids(c)
        reaper += [w1, w2]
        report = tmp_path / "worker-saw"
        reval(RECV_AND_REPORT.format(path=str(report)), c[1])
        link = c.network.nodes[1].data
        sock = link._sock
        start = bytes_acked(sock)
        cut = threading.Event()

        def cutter() -> None:
            # Once 16 MB of the frame are across, shut the socket down. Under the link's I/O
            # lock: an SSLSocket.shutdown racing a send in another thread could put plaintext
            # on the wire, which would be the test's fault, not parnet's.
            deadline = time.monotonic() + 30
            while bytes_acked(sock) - start < 16 << 20 and time.monotonic() < deadline:
                time.sleep(0.0005)
            with link._io_lock:
                sock.shutdown(socket.SHUT_RDWR)
            cut.set()

        th = threading.Thread(target=cutter, daemon=True)
        th.start()
        big = np.ones(200 << 20, dtype=np.uint8)
        with contextlib.suppress(ConnectionClosed):  # may fail at once, or in the background
            psend(big, c[1])
        th.join(30)
        del big
        assert cut.is_set()
        # the worker got part of the frame, then the end of the link. The client marks
        # server 1 lost at once, which ends the worker's command link too: the worker either
        # exits straight away or first sees a clean ConnectionClosed in its precv.
        wait_until(lambda: report.exists() or reaped(w1), 15, "the worker's precv to end")
        if report.exists():
            wait_until(lambda: report.read_text() or reaped(w1), 5, "the worker's report")
            saw = report.read_text()
            assert not saw or (
                saw.startswith("ConnectionClosed") and "in the middle of a message" in saw
            ), saw
        # the client: the next call involving server 1 says it is gone, once the client has
        # seen the cut: at once when psend still wrote, else when its writer thread next writes
        dl = c.network.nodes[1].data
        wait_until(
            lambda: not dl.usable or not c.network.nodes[1].open, 10, "the client to see the cut"
        )
        with pytest.raises(ConnectionClosed, match=re.escape(cl.hosts[0])):
            NEXT_CALLS[next_call](c)
        with pytest.raises(ConnectionClosed):  # and server 1 stays lost, for every call
            reval("z = 1", c[1])
        assert not network_get_info(c)[1].open
        check_other_server_works(c, 2)
        # the worker of server 1 is of no use without its client link: it exits
        wait_until(lambda: reaped(w1), 10, "server 1's worker to exit")
        procs = below([w1, w2])
    finally:
        sclose(c)
    base.check(gone_pids=procs)
    for p, off in zip(logs, offsets, strict=True):
        text = log_since(p, off)
        assert "Traceback" not in text and "ERROR" not in text, text
    assert "Traceback" not in capfd.readouterr().err


# == 7: Ctrl-C at the client ===================================================================
CTRL_C_CLIENT = r"""
import json, os, sys, threading, time
from parnet import (pconnect, precv, reval, rfeval, netcellfun, network_set, sclose,
                    ConnectionClosed)
tls, mode, mk, hb, *hosts = sys.argv[1:]
c = pconnect(hosts, use_tls=tls == "1", heartbeat=float(hb))
workers = [rfeval(os.getpid, connection=c[k]) for k in (1, 2)]
print("workers", *workers, flush=True)
started = os.path.join(mk, "started")
if mode == "precv":
    reval(f"import time; open({started!r}, 'w').close(); time.sleep(60)", c[1])
    block = lambda: precv(c[1])
elif mode == "peer-precv":
    # server 1's command waits for server 2, which sends nothing: without TLS the worker
    # waits in a blocking recv on its data link (no poll), where Ctrl-C must reach it too
    reval(f"open({started!r}, 'w').close(); x = precv(sockets[2])", c[1])
    block = lambda: precv(c[1])
elif mode == "rfeval":
    def slow(started=started):
        import time
        open(started, "w").close()
        time.sleep(60)
    block = lambda: rfeval(slow, connection=c[1])
elif mode == "netcellfun":
    network_set(c, "nlocaljobs", 2)
    warm = lambda i: time.sleep(0.05) or i  # starts the pools: the next map uses them at once
    netcellfun(c, warm, list(range(8)))
    def job(i, mk=mk):
        import os, time
        open(os.path.join(mk, f"{os.getpid()}-{i}"), "w").close()
        t = time.monotonic()
        while time.monotonic() - t < 3:  # 3 s of CPU: an unstopped job shows
            pass
        open(os.path.join(mk, f"{os.getpid()}-{i}-end"), "w").close()
        return i
    block = lambda: netcellfun(c, job, list(range(40)))
else:  # "stubborn": the command swallows Ctrl-C
    reval("import time\n"
          f"open({started!r}, 'w').close()\n"
          "while True:\n"
          "    try:\n"
          "        time.sleep(60)\n"
          "    except KeyboardInterrupt:\n"
          "        pass\n", c[1])
    block = lambda: precv(c[1])

def cpu(pid):
    try:
        st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")

main = threading.main_thread().ident
# precv waits in one of these: the hot path (blocked in recv on the data link) or the latter,
# which watches both links
waits = ("_next_value_frame", "_precv", "_wait_value")
inside = {"precv": waits, "peer-precv": waits, "stubborn": waits, "rfeval": ("wait_links",),
          "netcellfun": ("wait_links",)}[mode]

def announce(tag):
    # "waiting" once the main thread is inside the blocking call (its own Ctrl-C handling)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        f = sys._current_frames().get(main)
        while f is not None and f.f_code.co_name not in inside:
            f = f.f_back
        if f is not None:
            print("waiting" + tag, flush=True)
            return
        time.sleep(0.002)
    print("never-blocked" + tag, flush=True)

def interrupted(tag):
    threading.Thread(target=announce, args=(tag,), daemon=True).start()
    try:
        block()
    except KeyboardInterrupt:
        print("interrupted" + tag, flush=True)
        return True
    print("not-interrupted" + tag, flush=True)
    return False

out = {"first": interrupted("")}
if mode == "stubborn":
    out["second"] = interrupted("2")
    try:
        rfeval(lambda: 5, connection=c[1])
        out["after"] = "no error"
    except ConnectionClosed as e:
        out["after"] = "ConnectionClosed: " + str(e)
else:
    out["rfeval"] = [rfeval(lambda: 5, connection=c[k]) for k in (1, 2)]
    if mode == "peer-precv":  # the interrupted wait left server 1's link to server 2 intact
        reval("psend(('late', np.arange(100000)), sockets[1])", c[2])
        reval("v = precv(sockets[2]); psend((v[0], int(v[1].sum())), sockets[0])", c[1])
        out["late"] = list(precv(c[1], timeout=60))
    # no CPU burning at the servers: the workers and everything below them, over 0.5 s
    pids = list(workers)
    for w in workers:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == w:
                        pids.append(int(d))
                except OSError:
                    pass
    before = {p: cpu(p) for p in pids}
    time.sleep(0.5)  # the measurement window
    after = {p: cpu(p) for p in pids}
    out["cpu"] = {}
    for p in pids:
        if before[p] is not None and after[p] is not None:
            try:
                name = open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:90]
            except OSError:
                name = "?"
            out["cpu"][p] = [after[p] - before[p], name]
print("json", json.dumps(out), flush=True)
sclose(c)
print("closed", flush=True)
"""

# blocked in, what the server runs, when Ctrl-C comes, SIGINTs sent
CTRL_C_ROWS = [
    pytest.param("precv", "reval sleeping 60 s", "started", 1, id="precv"),
    pytest.param(
        "peer-precv", "reval waiting in precv from server 2", "started", 1, id="peer-precv"
    ),
    pytest.param("rfeval", "a function sleeping 60 s", "started", 1, id="rfeval"),
    pytest.param(
        "netcellfun",
        "40 jobs of 3 s CPU, 2 local jobs",
        "first job in the worker",
        1,
        id="netcellfun-first-job",
    ),
    pytest.param(
        "netcellfun",
        "40 jobs of 3 s CPU, 2 local jobs",
        "every job in the pool",
        1,
        id="netcellfun-pool-jobs",
    ),
    pytest.param(
        "stubborn", "reval that swallows KeyboardInterrupt", "started", 2, id="second-ctrl-c"
    ),
]


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("mode, what, when, sigints", CTRL_C_ROWS)
def test_ctrl_c_at_client(
    tls: bool,
    mode: str,
    what: str,
    when: str,
    sigints: int,
    shared: Callable[[bool], Cluster],
    tmp_path: Path,
    reaper: list[int],
) -> None:
    cl = shared(tls)
    base = Baseline(cl)
    proc = ClientProc(
        CTRL_C_CLIENT, "1" if cl.tls else "0", mode, str(tmp_path), str(HB), *cl.hosts
    )
    reaper.append(proc.pid)
    try:
        wpids = [int(p) for p in proc.expect("workers", 60).split()]
        reaper += wpids
        assert proc.line(20) == "waiting"  # the client is inside the call
        pools: list[int] = []
        if when == "started":
            wait_until((tmp_path / "started").exists, 20, "the command to start at the server")
        elif when == "first job in the worker":
            # (it takes 3 s) and the pool warm: it runs a job too
            def first_jobs_run() -> bool:
                return all(
                    jobs_of(tmp_path, [w], ended=False)
                    and jobs_of(tmp_path, pool_processes(w), ended=False)
                    for w in wpids
                )

            wait_until(first_jobs_run, 20, "the first jobs to run, in the workers and their pools")
        else:  # the first job, in the worker, is over: every running job is in the pool

            def pool_jobs_only() -> bool:
                return all(
                    jobs_of(tmp_path, [w], ended=True)
                    and not jobs_of(tmp_path, [w], ended=False)
                    and len(jobs_of(tmp_path, pool_processes(w), ended=False)) == 2
                    for w in wpids
                )

            wait_until(pool_jobs_only, 30, "two pool jobs and none in the worker on each server")
        if mode == "netcellfun":
            pools = [p for w in wpids for p in descendants(w)]
            reaper += pools
        t = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        assert proc.line(10) == "interrupted"
        took = time.monotonic() - t
        assert took < 2, f"KeyboardInterrupt after {took:.1f} s"
        if sigints == 2:
            assert proc.line(10) == "waiting2"
            t = time.monotonic()
            os.kill(proc.pid, signal.SIGINT)
            assert proc.line(10) == "interrupted2"
            assert time.monotonic() - t < 2
            out = proc.json(20)
            assert out["after"].startswith("ConnectionClosed"), out
            # the second Ctrl-C closed the network: its workers exit though their command runs on
            wait_until(lambda: all(gone(p) for p in wpids), 10, "the workers to exit")
        else:
            out = proc.json(30)
            assert out["rfeval"] == [5, 5]  # usable at once
            if mode == "peer-precv":
                assert out["late"] == ["late", sum(range(100000))]
            hot = {p: v for p, v in out["cpu"].items() if v[0] > BUSY * 0.5}
            assert not hot, f"server processes still burn CPU after the interrupt: {hot}"
            if pools:
                n = len(jobs_of(tmp_path, pools + wpids))
                assert not busy_pids(pools, limit=BUSY), (
                    "pool processes still run the interrupted jobs"
                )
                assert len(jobs_of(tmp_path, pools + wpids)) == n, (
                    "jobs started after the interrupt"
                )
        assert proc.line(20) == "closed"
        assert proc.wait(20) == 0, proc.stderr_text()
        assert "Traceback" not in proc.stderr_text(), proc.stderr_text()
    finally:
        proc.stop()
    base.check(gone_pids=wpids + pools)


# == 8: output forwarding ======================================================================
OUTPUT_CLIENT = r"""
import os, sys, time
class Tee:
    def __init__(self, real):
        self.real, self.parts = real, []
    def write(self, s):
        self.parts.append(s)
        return self.real.write(s)
    def flush(self):
        self.real.flush()
    def text(self):
        return "".join(self.parts)
sys.stderr = tee = Tee(sys.stderr)
from parnet import pconnect, reval, rfeval, netcellfun, network_set, sclose
tls, forward, log1, *hosts = sys.argv[1:]
c = pconnect(hosts, use_tls=tls == "1", forward_output=forward == "1", heartbeat=5)
w1, w2 = [rfeval(os.getpid, connection=c[k]) for k in (1, 2)]
print("workers", w1, w2, flush=True)
reval("print('tok-print', len(sockets))", c[1:])
reval("import warnings; warnings.warn('tok-warn')", c[1])
reval("import logging; logging.warning('tok-logging')", c[1])
def fast(i):
    import os
    print(f"tok-here-{i}-{os.getpid()}")
    return i
network_set(c, "nlocaljobs", 1)  # no pool: every job runs in the worker itself
netcellfun(c[1], fast, list(range(3)))
network_set(c, "nlocaljobs", 2)
def slow(i):
    import os, time
    time.sleep(0.05)
    print(f"tok-pool-{i}-{os.getpid()}")
    return i
netcellfun(c[1], slow, list(range(6)))
def kids(pid):
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
        except OSError:
            pass
    return out
print("pool", *kids(w1), flush=True)
reval("import sys; sys.stdout.write('tok-partial')", c[1])  # no newline: printed at sclose
reval("import sys; print('tok-last', file=sys.stderr)", c[1])
want = ["tok-print", "tok-warn", "tok-logging", "tok-last"] + [f"tok-here-{i}-" for i in range(3)] \
    + [f"tok-pool-{i}-" for i in range(6)]
deadline = time.monotonic() + 15
if forward == "1":
    while not all(w in tee.text() for w in want) and time.monotonic() < deadline:
        time.sleep(0.02)
else:  # the worker wrote to its own stderr, the server log: wait until it is there
    while "tok-last" not in open(log1).read() and time.monotonic() < deadline:
        time.sleep(0.02)
sclose(c)
print("closed", flush=True)
"""


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("forward", [True, False], ids=["forward", "no-forward"])
def test_output_forwarding(
    tls: bool, forward: bool, shared: Callable[[bool], Cluster], reaper: list[int]
) -> None:
    cl = shared(tls)
    base = Baseline(cl)
    log1 = server_log(cl, 0)
    proc = ClientProc(
        OUTPUT_CLIENT, "1" if cl.tls else "0", "1" if forward else "0", log1, *cl.hosts
    )
    reaper.append(proc.pid)
    try:
        w1, w2 = (int(p) for p in proc.expect("workers", 60).split())
        reaper += [w1, w2]
        pool = [int(p) for p in proc.expect("pool", 60).split()]
        reaper += pool
        assert pool, "server 1 started no pool"
        proc.expect("closed", 60)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
    err = proc.stderr_text()
    lines = err.splitlines()
    h1, h2 = (f"[{h}] " for h in cl.hosts)
    if not forward:
        assert "tok-" not in err, err
        assert "tok-last" in log_since(log1, 0)
    else:

        def has(prefix: str, token: str) -> list[str]:
            return [ln for ln in lines if ln.startswith(prefix) and token in ln]

        assert has(h1, "tok-print 3") and has(h2, "tok-print 3"), err
        assert has(h1, "UserWarning: tok-warn"), err
        assert has(h1, "tok-logging"), err
        assert has(h1, "tok-last"), err
        assert has(h1, "tok-partial"), err
        for i in range(3):  # in the worker itself (fast jobs)
            (ln,) = has(h1, f"tok-here-{i}-")
            assert ln.endswith(f"-{w1}"), ln
        pool_pids = set()
        for i in range(6):  # in its pool (slow jobs)
            (ln,) = has(h1, f"tok-pool-{i}-")
            pool_pids.add(int(ln.rsplit("-", 1)[1]))
        assert pool_pids - {w1}, "no slow job ran in the pool"  # (the first runs in the worker)
        assert all(ln.startswith("[") for ln in lines if "tok-" in ln), err
    base.check(gone_pids=[w1, w2, *pool])


# == 9: version differences ======================================================================
@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_version_difference_warns(
    tls: bool, shared: Callable[[bool], Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    cl = shared(tls)
    base = Baseline(cl)
    real = parnet.client.api.versions
    monkeypatch.setattr(parnet.client.api, "versions", lambda: {**real(), "python": "2.7.18"})
    with pytest.warns(RuntimeWarning) as rec:
        c = cl.connect(heartbeat=HB)
    try:
        (w,) = [r for r in rec if "versions differ" in str(r.message)]
        text = str(w.message)
        for k, host in enumerate(cl.hosts, start=1):
            assert re.search(
                rf"{re.escape(host)} \(node {k}\): python \S+ \(client 2\.7\.18\)", text
            ), text
        assert "numpy" not in text  # only what differs
        assert rfeval(lambda: 5, connection=c[1]) == 5
    finally:
        sclose(c)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same versions: no warning
        sclose(cl.connect(heartbeat=HB))
    base.check()


# kind of connection, version in the preamble
VERSION_ROWS = [(hs.KIND_CMD, 99), (hs.KIND_DATA, 99), (hs.KIND_CMD, 0)]


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("kind, version", VERSION_ROWS, ids=["cmd-99", "data-99", "cmd-0"])
def test_protocol_version_mismatch_refused(
    tls: bool, kind: int, version: int, shared: Callable[[bool], Cluster]
) -> None:
    cl = shared(tls)
    base = Baseline(cl)
    ip = cl.ips[0]
    port = cl.port if kind == hs.KIND_CMD else cl.port + 1
    want = f"protocol version mismatch: server speaks {PROTOCOL_VERSION}, client {version}"
    pre = hs.Preamble(version, kind, cl.tls, uuid.uuid4().bytes, 0, 1)
    with socket.create_connection((ip, port), timeout=10) as s:
        s.sendall(pre.pack())
        s.settimeout(10)
        buf = b""
        while len(buf) < hs.REPLY.size:
            chunk = s.recv(4096)
            assert chunk, f"closed without a reply ({buf!r})"
            buf += chunk
        magic, _, status, _, rlen = hs.REPLY.unpack(buf[: hs.REPLY.size])
        while len(buf) < hs.REPLY.size + rlen:
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
        assert s.recv(4096) == b""  # and the daemon hangs up
    assert magic == MAGIC
    assert status == hs.STATUS_ERROR
    assert buf[hs.REPLY.size :].decode() == want
    # what a client makes of it
    with pytest.raises(ConnectError, match=re.escape(f"{ip}:{port}: {want}")):
        hs.open_channel(ip, port, pre, deadline=time.monotonic() + 10, ctx=None)
    base.check()


# == 11: one pair of servers cannot reach each other ===============================================
@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_unreachable_mesh_pair(tls: bool, reaper: list[int]) -> None:
    a_ip, b_ip, proxy_ip = (f"127.0.0.{x}" for x in PROXY_IP[tls])
    cl = Cluster(2, tls, first_ip=PROXY_IP[tls][0])  # A and B
    proxy = None
    try:
        assert cl.ips == [a_ip, b_ip]
        base = Baseline(cl)
        # B's ports, seen through the proxy, refuse A (whose data links leave from its bind
        # address) and let the client through
        proxy = RefusingProxy(proxy_ip, b_ip, [cl.port, cl.port + 1], refuse={a_ip})
        a_host, b_host = cl.hosts[0], f"{proxy_ip}:{cl.port}"
        timeout = 5.0
        t = time.monotonic()
        with pytest.raises(ConnectError) as ei:
            parnet.client.api.pconnect([a_host, b_host], use_tls=tls, timeout=timeout, heartbeat=HB)
        took = time.monotonic() - t
        msg = str(ei.value)
        assert took < timeout + 1, f"{took:.1f} s"
        assert re.search(
            rf"server 1 \({re.escape(a_host)}\) could not reach server 2 "
            rf"\({re.escape(proxy_ip)}\) at {re.escape(proxy_ip)}:{cl.port + 1}",
            msg,
        ), msg
        assert (a_ip, cl.port + 1) in proxy.refused
        assert ("127.0.0.1", cl.port) in proxy.forwarded  # the client itself got through
        for pid in cl.pids:  # the set-up ended everywhere: the network's workers exit
            reaper += descendants(pid)
        proxy.close()
        proxy = None
        base.check()
    finally:
        if proxy is not None:
            proxy.close()
        cl.stop()
