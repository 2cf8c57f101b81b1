"""Soak test of parnet: a bounded random mix of every client call while servers get killed.

Run from the repository root::

    .venv/bin/python bench/soak.py [--minutes M] [--servers N] [--tls/--no-tls] [--seed S] [--quick]

(defaults: 10 minutes, 3 servers, TLS on). It starts N servers on 127.0.0.60, .61, ... (one
random free port pair, the same on every address), with ``PARNET_HOME`` and
``XDG_RUNTIME_DIR`` in a temporary directory (as ``bench_core.py`` does), and then, until the
time is up, runs random operations one after another in the main thread:

* ``connect``: ``sclose`` + ``pconnect`` to every live server (sometimes a random subset, in
  random order; sometimes deliberately with a server that is down: ``ConnectError`` expected);
* ``map``: ``netcellfun`` of small or medium jobs (medium ones go to the servers' local
  pools), some with ``nout``/``cum_func``, some with failing elements and an ``error_handler``,
  some with failing elements and none (``RemoteError`` expected);
* ``relay``: a value (a token or an array) client -> server i -> server j -> client, with
  ``psend``/``precv`` inside ``reval`` on the servers;
* ``echo``: client -> server -> client;
* ``rfeval``: waiting, ``nout``/``isout``, ``wait=False`` + ``precv``, and failing calls;
* ``install_vars``: by name and by value, to all servers or a subset, read back from each;
* ``select``: ``select_sockets`` with timeouts (0, short, longer) over delayed senders, and an
  idle ``select_sockets`` that must return ``[]``;
* ``reval_error``: a failing ``reval`` must surface as ``RemoteError`` and leave the network usable;
* ``second_net``: a second, short-lived network (``with pconnect(...)``) next to the main one;
* ``sclose``: closes the main network (twice: idempotent); a call on it must raise
  ``ConnectionClosed``.

A killer thread SIGKILLs one random server every 20-40 s: its daemon and every process
below it (found through /proc: parent pids, and the daemon's session), all SIGSTOPped first
so none can fork meanwhile; after 2-5 s the server is restarted on the same address and
ports. Each operation's outcome is recorded: ok; an *expected* failure (``ConnectionClosed``,
``ConnectError``, ``TimeoutError``, or ``RemoteError`` of a connection kind, when a server
the operation depends on was killed before or during it; ``RemoteError`` of the deliberate
kind where the operation asked for it); or an *unexpected* one (anything else, wrong results,
missing errors; its traceback is printed at once). After any failure the next operation
reconnects, so no stale value of a broken operation can confuse a later one.

Resources are sampled at the start (after a warm-up network has come and gone), every minute
and at the end (after closing every network and waiting, with a deadline, for the workers to
exit): per daemon its fd count, children (workers), all descendants, RSS; for this client
process its fd count, threads, RSS. At the end: every daemon's fds back to its own baseline
(taken right after it started), no children or descendants left, RSS within +20 MB; the
client's fds and threads back to baseline, RSS within +20 MB; no process of a killed server
left. Prints a report and ``soak: OK`` (exit 0) or ``soak: PROBLEMS (...)`` (exit 1).
Every server is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import gc
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import git_state, loadavg, pick_ports, proc_table  # noqa: E402

MB = 1 << 20
try:
    import ctypes

    _LIBC: Any = ctypes.CDLL("libc.so.6")

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    _LIBC.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):
    _LIBC = None


def fix_malloc_thresholds() -> bool:
    """Fixes glibc's mmap threshold at 1 MiB in this process (which also keeps the trim
    threshold at its 128 kB default). By default glibc raises both after the first large
    free, up to 32/64 MB, and the top of a thread's arena is then never given back (not even
    by malloc_trim): RSS climbs with no live memory behind it, and a leak would not show."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD


def malloc_in_use_kb() -> int | None:
    """Bytes glibc malloc has handed out and not got back (all arenas, mmapped chunks
    included), in kB: flat while RSS grows means fragmentation, not a leak."""
    if _LIBC is None:
        return None
    mi = _LIBC.mallinfo2()
    return (mi.uordblks + mi.hblkhd) // 1024


FIRST_ADDR = 60  # servers on 127.0.0.60, 127.0.0.61, ...
MARK = "soak-deliberate"  # in the message of every deliberately raised exception
KILL_EVERY = (20.0, 40.0)  # seconds between kills
DOWN_FOR = (2.0, 5.0)  # seconds a killed server stays down
OP_HANG = 120.0  # an operation running longer than this is a hang (stacks dumped, network closed)
OP_ABORT = 300.0  # ... and this long: the soak gives up (report, stop servers, exit 1)
WORKER_EXIT_DEADLINE = 30.0
RSS_TOLERANCE_KB = 20 * 1024
# RemoteError types that a killed peer can cause on the servers that survived it
CONN_TYPES = {
    "ConnectionClosed",
    "TimeoutError",
    "ConnectionError",
    "ConnectionResetError",
    "BrokenPipeError",
    "ConnectionAbortedError",
    "OSError",
    "ConnectError",
    "WorkerDiedError",
}
OPS = {  # name: weight
    "connect": 7,
    "map": 24,
    "relay": 14,
    "echo": 8,
    "rfeval": 12,
    "install_vars": 8,
    "select": 10,
    "reval_error": 5,
    "second_net": 4,
    "sclose": 3,
}


# --------------------------------------------------------------------------------------
# functions that run on the servers (cloudpickle sends them by value: this is __main__)
# --------------------------------------------------------------------------------------
def f_small(x: int) -> int:
    return x * x + 1


def f_medium(x: int, d: float) -> float:
    import time as _t

    _t.sleep(d)
    return float(sum(i * i for i in range(3000)) % 1000 + x)


def f_pair(x: int) -> tuple[int, int]:
    return x, -x


def f_fail(x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"{MARK}: element {x}")
    return 2 * x


def f_fail_slow(x: int, d: float) -> int:
    import time as _t

    _t.sleep(d)
    if x % 5 == 4:
        raise KeyError(f"{MARK}: element {x}")
    return 3 * x


def on_error(err: Any, *args: Any) -> int:
    return -1


def f_raise(msg: str) -> None:
    raise RuntimeError(f"{MARK}: {msg}")


def medium_expected(x: int) -> float:
    return float(sum(i * i for i in range(3000)) % 1000 + x)


# --------------------------------------------------------------------------------------
# /proc helpers (proc_table comes from bench_core)
# --------------------------------------------------------------------------------------
def descendants(pid: int, table: dict[int, tuple[int, int, str]] | None = None) -> set[int]:
    """Every live (non-zombie) process below ``pid``, by parent pid."""
    table = proc_table() if table is None else table
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for p, (pp, _, st) in table.items():
        if st != "Z":
            kids[pp].append(p)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def session_members(sid: int, table: dict[int, tuple[int, int, str]] | None = None) -> set[int]:
    """Live processes of session ``sid`` (the daemon is a session leader: start_new_session)."""
    table = proc_table() if table is None else table
    return {p for p, (_, s, st) in table.items() if s == sid and st != "Z"}


def direct_children(pid: int) -> list[int]:
    kids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.update(int(x) for x in f.read().split())
    except OSError:
        pass
    return sorted(kids)


def fd_count(pid: int | str) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_kb(pid: int | str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def threads(pid: int | str) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs; reaps it when it is a zombie child of ours."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pid: int) -> set[int]:
    """SIGKILLs ``pid`` and everything below it (and in its session). Every process is
    SIGSTOPped first, level by level, so that none can fork a new one meanwhile."""
    stopped: set[int] = set()

    def stop(p: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
        stopped.add(p)

    stop(pid)
    for _ in range(20):
        table = proc_table()
        new = (descendants(pid, table) | session_members(pid, table)) - stopped
        if not new:
            break
        for p in new:
            stop(p)
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in stopped):
        time.sleep(0.02)
    return stopped


class CheckFailed(Exception):
    """A wrong result or a missing error: always unexpected."""


class Hang(Exception):
    """An operation ran longer than OP_HANG seconds."""


@dataclass
class Server:
    idx: int
    addr: str
    port: int
    log: str
    pid: int = 0
    gen: int = 0  # incremented at every kill
    up: bool = False
    baseline: dict[str, int | None] = field(
        default_factory=dict
    )  # of the current pid, right after start
    starts: int = 0

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"


@dataclass
class OpCtx:
    name: str
    servers: list[Server]  # the servers this operation depends on
    gens: dict[int, int]  # server idx -> gen it had when the network (or the op) started
    expect_deliberate: bool = False
    variant: str = ""


@dataclass
class Sample:
    label: str
    t: float
    client: dict[str, int | None]
    servers: list[dict[str, Any]]


class Soak:
    def __init__(self, args: argparse.Namespace, home: str) -> None:
        self.args = args
        self.home = home
        self.rng = random.Random(args.seed)
        self.krng = random.Random(args.seed + 1)
        addrs = [f"127.0.0.{FIRST_ADDR + k}" for k in range(args.servers)]
        port = pick_ports(addrs, self.rng)
        self.servers = [
            Server(k, a, port, os.path.join(home, f"server-{a}-{port}.log"))
            for k, a in enumerate(addrs)
        ]
        self.lock = threading.Lock()  # guards server state (up, gen, pid) between threads
        self.stop_ev = threading.Event()
        self.t0 = time.monotonic()
        # the main network
        self.c: Any = None
        self.c_servers: list[Server] = []  # node k (1-based) -> self.c_servers[k - 1]
        self.c_gens: dict[int, int] = {}
        self.dirty = False
        # bookkeeping
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.variants: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self.unexpected: list[str] = []
        self.max_dur: dict[str, float] = collections.defaultdict(float)
        self.kills: list[dict[str, Any]] = []
        self.restart_failures: list[str] = []
        self.killed_pids: set[int] = set()
        self.samples: list[Sample] = []
        self.problems: list[str] = []
        self.cur_op: tuple[str, float, Any] | None = None  # (name, start, network) for the watchdog
        self.hangs = 0
        self.tok = 0
        self.warming = False
        self.reconnects = 0  # implicit reconnects before an operation (after a failure or sclose)

    # -- servers -------------------------------------------------------------------
    def start_server(self, s: Server) -> None:
        from parnet.server.launch import start_background

        pid = start_background(
            use_tls=self.args.tls,
            cmd_port=s.port,
            data_port=s.port + 1,
            bind=s.addr,
            allow_root=True,
            log_file=s.log,
        )
        time.sleep(0.1)
        with self.lock:
            s.pid = pid
            s.starts += 1
            s.baseline = {
                "fds": fd_count(pid),
                "rss": rss_kb(pid),
                "children": len(direct_children(pid)),
            }
            s.up = True

    def stop_all(self) -> None:
        from parnet.server.launch import stop_pid

        for s in self.servers:
            if s.pid:
                pid = s.pid
                with contextlib.suppress(Exception):
                    stop_pid(pid)
                with self.lock:
                    s.up = False

    def killer(self) -> None:
        """Kills a random server every KILL_EVERY seconds; restarts it after DOWN_FOR."""
        while not self.stop_ev.wait(self.krng.uniform(*KILL_EVERY)):
            s = self.krng.choice(self.servers)
            with self.lock:
                if not s.up:
                    continue
                s.up = False
                s.gen += 1
                pid = s.pid
            t_kill = time.monotonic()
            try:
                pids = kill_tree(pid)
            except Exception as e:  # noqa: BLE001
                self.problems.append(f"kill of {s.host} failed: {e!r}")
                pids = {pid}
            self.killed_pids |= pids
            rec = {
                "t": t_kill - self.t0,
                "server": s.idx,
                "host": s.addr,
                "pid": pid,
                "procs": len(pids),
                "down": None,
                "restarted": False,
            }
            self.kills.append(rec)
            self.log(f"KILL -9 server {s.idx} ({s.addr}, daemon {pid}, {len(pids)} processes)")
            self.stop_ev.wait(self.krng.uniform(*DOWN_FOR))  # restart even when stopping
            for attempt in range(5):
                try:
                    self.start_server(s)
                    rec["down"] = time.monotonic() - t_kill
                    rec["restarted"] = True
                    self.log(
                        f"restarted server {s.idx} ({s.addr}) as pid {s.pid} after {rec['down']:.1f} s"
                    )
                    break
                except Exception as e:  # noqa: BLE001
                    msg = f"restart of server {s.idx} ({s.host}), attempt {attempt + 1}: {type(e).__name__}: {e}"
                    self.restart_failures.append(msg)
                    self.log(msg)
                    time.sleep(1.0)

    def watchdog(self) -> None:
        warned: float | None = None
        while True:
            time.sleep(2.0)
            cur = self.cur_op
            if cur is None:
                warned = None
                if self.stop_ev.is_set():
                    return
                continue
            name, start, net = cur
            age = time.monotonic() - start
            if age > OP_HANG and warned != start:
                warned = start
                self.hangs += 1
                self.log(
                    f"HANG: operation {name} running for {age:.0f} s; stacks follow; closing its network"
                )
                faulthandler.dump_traceback(all_threads=True)
                if net is not None:
                    with contextlib.suppress(Exception):
                        net.close()
            if age > OP_ABORT:
                self.log(f"ABORT: operation {name} still running after {age:.0f} s")
                faulthandler.dump_traceback(all_threads=True)
                self.problems.append(f"operation {name} hung for {age:.0f} s: aborted")
                with contextlib.suppress(Exception):
                    self.report(final=False)
                self.stop_all()
                os._exit(1)

    # -- output ----------------------------------------------------------------------
    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    # -- sampling --------------------------------------------------------------------
    def sample(self, label: str) -> Sample:
        me = os.getpid()
        client = {"fds": fd_count(me), "threads": threads(me), "rss": rss_kb(me)}
        # what the process holds once the garbage is collected and glibc's free heap memory is
        # given back: tells a leak (grows) from the allocator keeping freed memory (does not)
        gc.collect()
        client["objs"] = len(gc.get_objects())
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        client["rss_trim"] = rss_kb(me)
        client["malloc"] = malloc_in_use_kb()
        table = proc_table()
        rows = []
        for s in self.servers:
            with self.lock:
                pid, up = s.pid, s.up
            ch = direct_children(pid) if up else []
            desc = descendants(pid, table) if up else set()
            rows.append(
                {
                    "server": s.idx,
                    "pid": pid,
                    "up": up,
                    "fds": fd_count(pid) if up else None,
                    "children": len(ch),
                    "desc": len(desc),
                    "rss": rss_kb(pid) if up else None,
                    "wrss": sum(rss_kb(p) or 0 for p in desc),
                }
            )
        smp = Sample(label, time.monotonic() - self.t0, client, rows)
        self.samples.append(smp)
        return smp

    # -- the main network ------------------------------------------------------------
    def up_servers(self) -> list[Server]:
        with self.lock:
            return [s for s in self.servers if s.up]

    def close_main(self) -> None:
        from parnet import sclose

        if self.c is not None:
            c, self.c = self.c, None
            sclose(c)
        self.c_servers, self.c_gens = [], {}
        self.dirty = False

    def open_main(self, targets: list[Server], ctx: OpCtx | None = None) -> None:
        from parnet import pconnect

        self.close_main()
        gens = {s.idx: s.gen for s in targets}
        if ctx is not None:
            ctx.servers, ctx.gens = targets, gens
        self.c = pconnect([s.host for s in targets], use_tls=self.args.tls, timeout=15.0)
        self.c_servers, self.c_gens = list(targets), gens

    def ensure_main(self, ctx: OpCtx) -> None:
        """The main network, (re)connected to every live server when it is missing or was
        used by a failed operation."""
        if self.c is None or self.dirty:
            ups = self.up_servers()
            if not ups:
                raise CheckFailed("no server is up")
            self.reconnects += 1
            self.open_main(ups, ctx)
        ctx.servers, ctx.gens = list(self.c_servers), dict(self.c_gens)

    def nodes(self) -> list[int]:
        return list(range(1, len(self.c_servers) + 1))

    def next_tok(self) -> int:
        self.tok += 1
        return self.tok

    # -- the operations ---------------------------------------------------------------
    def op_connect(self, ctx: OpCtx) -> None:
        from parnet import network_get_info

        ups = self.up_servers()
        with self.lock:
            downs = [s for s in self.servers if not s.up]
        r = self.rng.random()
        if downs and r < 0.5:
            ctx.variant = "with a down server"
            targets = ups + [self.rng.choice(downs)]
            self.rng.shuffle(targets)
            gens = {s.idx: s.gen for s in targets}
            was_down = {s.idx for s in targets if not s.up}
            ctx.servers, ctx.gens = targets, gens
            try:
                self.open_main(targets, ctx)
            except Exception as e:
                from parnet import ConnectError

                if isinstance(e, ConnectError) and was_down:
                    ctx.expect_deliberate = True
                    raise _Deliberate(e) from e
                raise
            return  # the server came back meanwhile: fine
        if not ups:
            raise CheckFailed("no server is up")
        if len(ups) > 1 and r < 0.45:
            ctx.variant = "subset"
            targets = self.rng.sample(ups, self.rng.randint(1, len(ups)))
        else:
            ctx.variant = "all"
            targets = list(ups)
            self.rng.shuffle(targets)
        self.open_main(targets, ctx)
        info = network_get_info(self.c)
        if len(info) != len(targets) + 1 or not all(i.open for i in info):
            if not self.disturbed(ctx):
                raise CheckFailed(f"network_get_info after pconnect: {info}")

    def op_map(self, ctx: OpCtx) -> None:
        from parnet import RemoteError, netcellfun

        self.ensure_main(ctx)
        c = self.c
        rng = self.rng
        kind = rng.choices(
            [
                "small",
                "medium",
                "nout",
                "cum",
                "fail_handled",
                "fail_unhandled",
                "fail_slow_unhandled",
            ],
            [25, 25, 8, 8, 14, 12, 8],
        )[0]
        ctx.variant = kind
        cs = rng.choice([1, 1, 2, 3, 5])
        target = (
            c
            if rng.random() < 0.8
            else c[[0] + rng.sample(self.nodes(), rng.randint(1, len(self.nodes())))]
        )
        if kind == "small":
            xs = list(range(rng.randint(1, 400)))
            got = netcellfun(target, f_small, xs, chunk_size=cs)
            if not np.array_equal(got, np.array([f_small(x) for x in xs])):
                raise CheckFailed(f"map small: wrong result {got[:10]}...")
        elif kind == "medium":
            n = rng.randint(4, 40)
            xs = list(range(n))
            ds = [rng.uniform(0.002, 0.04) for _ in xs]
            got = netcellfun(target, f_medium, xs, ds, chunk_size=cs)
            if not np.allclose(got, [medium_expected(x) for x in xs]):
                raise CheckFailed(f"map medium: wrong result {got[:10]}...")
        elif kind == "nout":
            xs = list(range(rng.randint(1, 100)))
            a, b = netcellfun(
                target, f_pair, xs, nout=2, uniform_output=rng.random() < 0.5, chunk_size=cs
            )
            if list(a) != xs or list(b) != [-x for x in xs]:
                raise CheckFailed("map nout=2: wrong result")
        elif kind == "cum":
            xs = list(range(rng.randint(1, 300)))
            got = netcellfun(target, f_small, xs, cum_func=lambda acc, x: acc + x, chunk_size=cs)
            if got != sum(f_small(x) for x in xs):
                raise CheckFailed(f"map cum_func: {got} != {sum(f_small(x) for x in xs)}")
        elif kind == "fail_handled":
            xs = list(range(rng.randint(1, 120)))
            got = netcellfun(target, f_fail, xs, error_handler=on_error, chunk_size=cs)
            want = [-1 if x % 7 == 3 else 2 * x for x in xs]
            if list(got) != want:
                raise CheckFailed(f"map with error_handler: wrong result {list(got)[:12]}...")
        else:
            slow = kind == "fail_slow_unhandled"
            n = rng.randint(5, 30) if slow else rng.randint(4, 120)
            xs = list(range(n))
            ctx.expect_deliberate = True
            try:
                if slow:
                    netcellfun(
                        target,
                        f_fail_slow,
                        xs,
                        [rng.uniform(0.002, 0.03) for _ in xs],
                        chunk_size=cs,
                    )
                else:
                    netcellfun(target, f_fail, xs, chunk_size=cs)
            except RemoteError as e:
                if MARK in e.message:
                    raise _Deliberate(e) from e
                raise
            raise CheckFailed(f"map {kind}: no RemoteError although elements raised")

    def _value(self, tok: int) -> Any:
        r = self.rng.random() if not self.warming else (tok % 3) * 0.3 + 0.5  # warm-up: every kind
        if r < 0.6:
            return ("tok", tok)
        if r < 0.9:
            return np.arange(self.rng.randint(1, 64 * 1024), dtype=np.float64) + tok
        return np.full(self.rng.randint(1, 4) * MB // 8, float(tok))  # 1-3 MB

    @staticmethod
    def _same(a: Any, b: Any) -> bool:
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.array_equal(a, b))
        return a == b

    def op_relay(self, ctx: OpCtx) -> None:
        from parnet import precv, psend, reval

        self.ensure_main(ctx)
        c = self.c
        if len(self.c_servers) < 2:
            ctx.variant = "echo (one server)"
            return self.op_echo(ctx, ensured=True)
        i, j = self.rng.sample(self.nodes(), 2)
        tok = self.next_tok()
        if self.rng.random() < 0.5:
            ctx.variant = "made on server"
            val: Any = np.arange(1000, dtype=np.float64) + tok
            reval(f"psend(np.arange(1000, dtype=np.float64) + {tok}, sockets[{j}])", c[i])
        else:
            ctx.variant = "from client"
            val = self._value(tok)
            psend(val, c[i])
            reval(f"psend(precv(sockets[0], timeout=20), sockets[{j}])", c[i])
        reval(f"psend(precv(sockets[{i}], timeout=20), sockets[0])", c[j])
        got = precv(c[j], timeout=30)
        if not self._same(val, got):
            raise CheckFailed(f"relay {i}->{j}: got {str(got)[:80]} for {str(val)[:80]}")

    def op_echo(self, ctx: OpCtx, ensured: bool = False) -> None:
        from parnet import precv, psend, reval

        if not ensured:
            self.ensure_main(ctx)
        c = self.c
        k = self.rng.choice(self.nodes())
        val = self._value(self.next_tok())
        if self.rng.random() < 0.5:
            psend(val, c[k])
            reval("psend(precv(sockets[0], timeout=20), sockets[0])", c[k])
        else:
            reval("psend(precv(sockets[0], timeout=20), sockets[0])", c[k])
            psend(val, c[k])
        got = precv(c[k], timeout=30)
        if not self._same(val, got):
            raise CheckFailed(f"echo via node {k}: got {str(got)[:80]} for {str(val)[:80]}")

    def op_rfeval(self, ctx: OpCtx) -> None:
        from parnet import RemoteError, precv, rfeval

        self.ensure_main(ctx)
        c = self.c
        k = self.rng.choice(self.nodes())
        kind = self.rng.choices(["wait", "nout", "nowait", "array", "fail"], [30, 15, 20, 15, 20])[
            0
        ]
        ctx.variant = kind
        x, y = self.rng.randint(-1000, 1000), self.rng.randint(-1000, 1000)
        if kind == "wait":
            got = rfeval(lambda a, b: a * b + 1, x, y, connection=c[k])
            want: Any = x * y + 1
        elif kind == "nout":
            got = rfeval(
                lambda a, b=0: (a, b, a + b),
                x,
                connection=c[k],
                b=y,
                nout=3,
                isout=[True, False, True],
            )
            want = [x, x + y]
        elif kind == "nowait":
            if rfeval(lambda a: ("late", a), x, connection=c[k], wait=False) is not None:
                raise CheckFailed("rfeval(wait=False) returned something")
            got = precv(c[k], timeout=30)
            want = ("late", x)
        elif kind == "array":
            a = np.random.default_rng(x + 5000).random(self.rng.randint(1, 200_000))
            got = rfeval(np.sum, a, connection=c[k])
            want = float(np.sum(a))
        else:
            ctx.expect_deliberate = True
            try:
                rfeval(f_raise, f"rfeval {x}", connection=c[k])
            except RemoteError as e:
                if MARK in e.message:
                    raise _Deliberate(e) from e
                raise
            raise CheckFailed("rfeval of a raising function returned")
        if got != want:
            raise CheckFailed(f"rfeval {kind}: got {got!r}, want {want!r}")

    def op_install_vars(self, ctx: OpCtx) -> None:
        from parnet import install_vars, precv, reval

        self.ensure_main(ctx)
        c = self.c
        nodes = self.nodes()
        sub = (
            nodes
            if self.rng.random() < 0.7
            else sorted(self.rng.sample(nodes, self.rng.randint(1, len(nodes))))
        )
        ctx.variant = "all" if sub == nodes else "subset"
        tok = self.next_tok()
        soak_named = {"tok": tok, "s": "x" * self.rng.randint(0, 1000)}  # noqa: F841 - looked up by name
        arr = np.arange(self.rng.randint(1, 300_000), dtype=np.float64) * tok
        target = c[[0] + sub] if self.rng.random() < 0.5 else c[sub]
        install_vars("soak_named", connections=target, soak_arr=arr)
        for k in sub:
            reval("psend((soak_named, soak_arr), sockets[0])", c[k])
        for k in sub:
            named, got = precv(c[k], timeout=30)
            if named != soak_named or not np.array_equal(got, arr):
                raise CheckFailed(
                    f"install_vars: node {k} has {named!r}, array equal "
                    f"{isinstance(got, np.ndarray) and np.array_equal(got, arr)}"
                )

    def op_select(self, ctx: OpCtx) -> None:
        from parnet import precv, reval, select_sockets

        self.ensure_main(ctx)
        c = self.c
        # nothing pending: [] after about the timeout
        t_idle = self.rng.choice([0, 0.05, 0.2])
        t1 = time.monotonic()
        ready = select_sockets(c, t_idle)
        dt = time.monotonic() - t1
        if ready:
            # a node whose link has closed is reported ready (its precv raises ConnectionClosed)
            got = precv(c[ready[0]], timeout=1.0)
            raise CheckFailed(
                f"select_sockets on an idle network returned {ready}; precv got {str(got)[:80]}"
            )
        if dt < t_idle * 0.9:
            raise CheckFailed(f"select_sockets({t_idle}) returned [] after {dt:.3f} s")
        nodes = self.nodes()
        senders = self.rng.sample(nodes, self.rng.randint(1, len(nodes)))
        tok = self.next_tok()
        for k in senders:
            d = self.rng.choice([0, 0.01, 0.1, 0.3])
            reval(f"import time\ntime.sleep({d})\npsend(('sel', {tok}, {k}), sockets[0])", c[k])
        waiting = set(senders)
        deadline = time.monotonic() + 30
        tmo = self.rng.choice([0, 0.05, 0.5, 2.0])
        ctx.variant = f"timeout {tmo}"
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"select: still waiting for nodes {sorted(waiting)} after 30 s")
            for pos in select_sockets(c, tmo):
                k = c.indices[pos]
                if k not in waiting:
                    got = precv(c[pos], timeout=1.0)  # a closed link: ConnectionClosed
                    raise CheckFailed(
                        f"select_sockets reported node {k} (position {pos}), not a sender; "
                        f"precv got {str(got)[:80]}"
                    )
                got = precv(c[pos], timeout=5)
                if got != ("sel", tok, k):
                    raise CheckFailed(f"select: node {k} sent {got!r}")
                waiting.discard(k)
            if tmo == 0:
                time.sleep(0.005)

    def op_reval_error(self, ctx: OpCtx) -> None:
        from parnet import RemoteError, precv, reval, select_sockets

        self.ensure_main(ctx)
        c = self.c
        k = self.rng.choice(self.nodes())
        reval(f"raise ValueError('{MARK}: reval')", c[k])
        deadline = time.monotonic() + 20
        how = self.rng.choice(["select", "reval", "precv"])
        ctx.variant = f"seen by {how}"
        err = None
        ctx.expect_deliberate = True
        while err is None and time.monotonic() < deadline:
            try:
                if how == "select":
                    select_sockets(c[k], 1.0)
                elif how == "reval":
                    time.sleep(0.05)
                    reval("pass", c[k])
                else:
                    precv(c[k], timeout=1.0)
            except RemoteError as e:
                err = e
            except TimeoutError:
                pass
        if err is None:
            raise CheckFailed(f"reval error on node {k} not reported within 20 s (by {how})")
        ctx.expect_deliberate = False
        if MARK not in err.message or err.node != k:
            raise CheckFailed(f"wrong RemoteError for a failing reval on node {k}: {err}")
        # the network stays usable
        reval("psend('after error', sockets[0])", c[k])
        got = precv(c[k], timeout=30)
        if got != "after error":
            raise CheckFailed(f"after a reval error, node {k} sent {got!r}")

    def op_second_net(self, ctx: OpCtx) -> None:
        from parnet import netcellfun, pconnect, precv, reval

        ups = self.up_servers()
        if not ups:
            raise CheckFailed("no server is up")
        targets = self.rng.sample(ups, self.rng.randint(1, len(ups)))
        ctx.servers, ctx.gens = targets, {s.idx: s.gen for s in targets}
        with pconnect([s.host for s in targets], use_tls=self.args.tls, timeout=15.0) as c2:
            if self.rng.random() < 0.5:
                ctx.variant = "map"
                xs = list(range(self.rng.randint(1, 60)))
                got = netcellfun(c2, f_small, xs)
                if not np.array_equal(got, [f_small(x) for x in xs]):
                    raise CheckFailed("second network: wrong map result")
            else:
                ctx.variant = "reval"
                k = self.rng.randint(1, len(targets))
                reval("psend('second', sockets[0])", c2[k])
                if precv(c2[k], timeout=30) != "second":
                    raise CheckFailed("second network: wrong value")

    def op_sclose(self, ctx: OpCtx) -> None:
        from parnet import ConnectionClosed, reval, sclose

        self.ensure_main(ctx)
        c = self.c
        sub = c[1:] if self.rng.random() < 0.5 else c[self.rng.randint(1, len(c) - 1)]
        ctx.variant = "whole" if len(sub) == len(c) - 1 else "via a single connection"
        sclose(sub)
        sclose(c)  # idempotent
        self.c, self.c_servers, self.c_gens = None, [], {}
        try:
            reval("pass", c)
        except ConnectionClosed:
            return
        raise CheckFailed("reval on a closed network did not raise ConnectionClosed")

    # -- running ------------------------------------------------------------------------
    def disturbed(self, ctx: OpCtx) -> bool:
        """Whether a server the operation depends on was killed since its network (or the
        operation) started, or is down now."""
        with self.lock:
            return any(s.gen != ctx.gens.get(s.idx, s.gen) or not s.up for s in ctx.servers)

    def classify(self, ctx: OpCtx, e: BaseException) -> tuple[bool, str]:
        from parnet import ConnectError, ConnectionClosed, RemoteError

        if isinstance(e, _Deliberate):
            return True, "deliberate"
        if isinstance(e, (CheckFailed, Hang)):
            return False, "check failed" if isinstance(e, CheckFailed) else "hang"
        dist = self.disturbed(ctx)
        if isinstance(e, RemoteError):
            if MARK in e.message:
                if ctx.expect_deliberate:
                    return True, "deliberate"
                return False, "stray deliberate error (from an earlier operation?)"
            if dist and e.exc_type.rsplit(".", 1)[-1] in CONN_TYPES:
                return True, "server killed"
            return False, "remote error" + (" (server killed)" if dist else "")
        if isinstance(e, (ConnectionClosed, ConnectError, TimeoutError)):
            if dist:
                return True, "server killed"
            return False, "no server killed"
        return False, "unexpected type" + (" (server killed)" if dist else "")

    def run_op(self, name: str) -> None:
        ctx = OpCtx(name, list(self.c_servers), dict(self.c_gens))
        t1 = time.monotonic()
        self.cur_op = (name, t1, self.c.network if self.c is not None else None)
        outcome = "ok"
        try:
            getattr(self, f"op_{name}")(ctx)
            if time.monotonic() - t1 > OP_HANG:
                raise Hang(f"{name} took {time.monotonic() - t1:.0f} s")
        except Exception as e:  # noqa: BLE001
            if time.monotonic() - t1 > OP_HANG and not isinstance(e, Hang):
                e2 = Hang(
                    f"{name} took {time.monotonic() - t1:.0f} s, then raised {type(e).__name__}: {e}"
                )
                e2.__cause__ = e
                e = e2
            expected, why = self.classify(ctx, e)
            real = e.__cause__ if isinstance(e, _Deliberate) else e
            etype = type(real).__name__
            if etype == "RemoteError":
                etype += f"[{getattr(real, 'exc_type', '?').rsplit('.', 1)[-1]}]"
            outcome = "expected" if expected else "UNEXPECTED"
            self.failures[(name, outcome, etype, why)] += 1
            if why != "deliberate":
                self.dirty = True  # reconnect before the next operation on the main network
            if not expected:
                text = "".join(traceback.format_exception(real))
                head = (
                    f"UNEXPECTED failure in {name} ({ctx.variant}) at {t1 - self.t0:.1f} s: {etype} "
                    f"({why}); servers {[s.idx for s in ctx.servers]}"
                )
                self.unexpected.append(
                    f"{t1 - self.t0:7.1f}s {name} ({ctx.variant}): {etype}: "
                    f"{str(real).splitlines()[0] if str(real) else ''} [{why}]"
                )
                self.log(head + "\n" + text)
        finally:
            self.cur_op = None
        dur = time.monotonic() - t1
        self.counts[name][outcome] += 1
        self.variants[f"{name}: {ctx.variant or '-'}"] += 1
        self.max_dur[name] = max(self.max_dur[name], dur)

    def choose(self) -> str:
        with self.lock:
            missing = [s for s in self.servers if s.up and s not in self.c_servers]
        if self.c is not None and missing and self.rng.random() < 0.25:
            return "connect"
        names = list(OPS)
        return self.rng.choices(names, [OPS[n] for n in names])[0]

    def wait_workers_gone(self, deadline_s: float) -> bool:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            table = proc_table()
            busy = [
                s
                for s in self.servers
                if s.up and (descendants(s.pid, table) or direct_children(s.pid))
            ]
            if not busy:
                return True
            time.sleep(0.2)
        return False

    def warm_up(self) -> None:
        """Every kind of operation a few times, then everything closed: imports and first-use
        allocations in this process happen before the baseline sample. These operations count
        in the report like the others (no server is killed yet)."""
        self.warming = True
        for name in list(OPS) * 3:
            self.run_op(name)
        self.warming = False
        self.close_main()
        if not self.wait_workers_gone(WORKER_EXIT_DEADLINE):
            self.problems.append("workers of the warm-up network did not exit")
        gc.collect()

    def run(self) -> int:
        a = self.args
        self.log(
            f"soak: {a.minutes:g} min, {a.servers} servers on {self.servers[0].addr}.. port "
            f"{self.servers[0].port}/{self.servers[0].port + 1}, TLS {'on' if a.tls else 'off'}, seed {a.seed}; "
            f"commit {git_state()}; python {sys.version.split()[0]}, {os.cpu_count()} cores; "
            f"load average {loadavg()}"
        )
        self.load_start = loadavg()
        for s in self.servers:
            self.start_server(s)
        self.warm_up()
        self.t0 = time.monotonic()
        end = self.t0 + a.minutes * 60
        # baselines: daemons right after their start; the client after the warm-up
        self.sample("start")
        kt = threading.Thread(target=self.killer, name="soak-killer", daemon=True)
        wt = threading.Thread(target=self.watchdog, name="soak-watchdog", daemon=True)
        kt.start()
        wt.start()
        next_sample = self.t0 + 60
        nops = 0
        try:
            while time.monotonic() < end:
                if time.monotonic() >= next_sample:
                    smp = self.sample(f"{round((time.monotonic() - self.t0) / 60):d} min")
                    next_sample += 60
                    self.log(
                        f"{nops} operations; {sum(1 for _ in self.unexpected)} unexpected; "
                        f"{len(self.kills)} kills; client fds {smp.client['fds']} threads "
                        f"{smp.client['threads']} RSS {smp.client['rss']} kB; workers "
                        f"{[r['desc'] for r in smp.servers]}"
                    )
                self.run_op(self.choose())
                nops += 1
        finally:
            self.stop_ev.set()
            self.log(
                "time is up: closing the networks, waiting for the killer thread to restart its server"
            )
            with contextlib.suppress(Exception):
                self.close_main()
            kt.join(timeout=30)
            wt.join(timeout=10)
        self.duration = time.monotonic() - self.t0
        gone = self.wait_workers_gone(WORKER_EXIT_DEADLINE)
        if not gone:
            self.problems.append(
                f"workers still running {WORKER_EXIT_DEADLINE:.0f} s after the last sclose"
            )
        gc.collect()
        time.sleep(0.5)
        self.sample("end")
        self.check_end()
        return self.report(final=True)

    # -- checks and report -----------------------------------------------------------------
    def check_end(self) -> None:
        start, end = self.samples[0], self.samples[-1]
        cs, ce = start.client, end.client
        if ce["fds"] != cs["fds"]:
            self.problems.append(f"client fds {cs['fds']} -> {ce['fds']}")
        if ce["threads"] != cs["threads"]:
            self.problems.append(f"client threads {cs['threads']} -> {ce['threads']}")
        if (ce["rss_trim"] or 0) > (cs["rss_trim"] or 0) + RSS_TOLERANCE_KB:
            self.problems.append(
                f"client RSS (after gc + malloc_trim) {cs['rss_trim']} -> {ce['rss_trim']} kB "
                "(> +20 MB)"
            )
        for s, row in zip(self.servers, end.servers, strict=True):
            if not row["up"]:
                self.problems.append(f"server {s.idx} is not up at the end")
                continue
            b = s.baseline
            if row["fds"] != b.get("fds"):
                self.problems.append(
                    f"server {s.idx} (pid {s.pid}) daemon fds {b.get('fds')} -> {row['fds']}"
                )
            if row["children"] or row["desc"]:
                self.problems.append(
                    f"server {s.idx} (pid {s.pid}): {row['children']} children, "
                    f"{row['desc']} descendants left"
                )
            if (row["rss"] or 0) > (b.get("rss") or 0) + RSS_TOLERANCE_KB:
                self.problems.append(
                    f"server {s.idx} (pid {s.pid}) daemon RSS {b.get('rss')} -> {row['rss']} kB"
                )
        left = sorted(p for p in self.killed_pids if alive(p))
        if left:
            self.problems.append(f"processes of killed servers still alive: {left}")
        if self.restart_failures:
            self.problems.append(f"{len(self.restart_failures)} failed restart attempts")
        if self.unexpected:
            self.problems.append(f"{len(self.unexpected)} unexpected failures")
        if self.hangs:
            self.problems.append(f"{self.hangs} hung operations")

    def server_log_findings(self) -> list[str]:
        out: collections.Counter[str] = collections.Counter()
        for s in self.servers:
            with contextlib.suppress(OSError), open(s.log, errors="replace") as f:
                for line in f:
                    if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                        parts = line.split(" ", 4)
                        out[parts[-1].strip()[:160] if len(parts) == 5 else line.strip()[:160]] += 1
        return [f"{n:4d}x {text}" for text, n in out.most_common(15)]

    def report(self, final: bool) -> int:
        p = print
        dur = getattr(self, "duration", time.monotonic() - self.t0)
        p("\n" + "=" * 100)
        p(
            f"soak report: {dur / 60:.1f} min ({dur:.0f} s), {self.args.servers} servers, TLS "
            f"{'on' if self.args.tls else 'off'}, seed {self.args.seed}; load average at start "
            f"{getattr(self, 'load_start', '?')}, at end {loadavg()}"
        )
        total = sum(sum(c.values()) for c in self.counts.values())
        p(
            f"\noperations: {total} (and {self.reconnects} implicit reconnects of the main network before an "
            "operation, after a failure or an sclose; counted in the operation)"
        )
        p(f"  {'kind':<14}{'total':>7}{'ok':>7}{'expected':>10}{'UNEXPECTED':>12}{'max s':>8}")
        for name in OPS:
            c = self.counts.get(name, collections.Counter())
            p(
                f"  {name:<14}{sum(c.values()):>7}{c['ok']:>7}{c['expected']:>10}{c['UNEXPECTED']:>12}"
                f"{self.max_dur.get(name, 0):>8.1f}"
            )
        p("\nvariants: " + ", ".join(f"{k} {v}" for k, v in sorted(self.variants.items())))
        p("\nfailures by type:")
        if not self.failures:
            p("  none")
        for (name, outcome, etype, why), n in sorted(
            self.failures.items(), key=lambda kv: (kv[0][1], kv[0][0])
        ):
            p(f"  {outcome:<10} {name:<14} {etype:<36} {why}: {n}")
        if self.unexpected:
            p("\nunexpected failures (tracebacks above, in the run's output):")
            for u in self.unexpected[:40]:
                p("  " + u)
            if len(self.unexpected) > 40:
                p(f"  ... and {len(self.unexpected) - 40} more")
        restarts = sum(1 for k in self.kills if k["restarted"])
        p(
            f"\nkills: {len(self.kills)}, restarts: {restarts}, failed restart attempts: {len(self.restart_failures)}"
        )
        for k in self.kills:
            down = f"down {k['down']:.1f} s" if k["down"] is not None else "not restarted"
            p(
                f"  {k['t']:7.1f}s server {k['server']} ({k['host']}) daemon {k['pid']}: {k['procs']} processes "
                f"killed, {down}"
            )
        for msg in self.restart_failures:
            p(f"  {msg}")
        p(
            "\nresources. client: fds, threads, RSS MB, RSS after gc.collect() + malloc_trim(0), MB in use by "
            "malloc (mallinfo2), live Python container objects;\n  each daemon: pid, fds, children (workers), all descendants, RSS MB, summed RSS of the "
            "descendants;\n  baseline of a daemon: right after it started, before any network"
        )
        hdr = f"  {'sample':<8}{'t s':>7} | {'client fds':>10}{'thr':>5}{'RSS':>7}{'trim':>7}{'malloc':>7}{'objs':>8} |"
        for s in self.servers:
            hdr += (
                f" server {s.idx}: {'pid':>7}{'fds':>5}{'ch':>4}{'desc':>5}{'RSS':>6}{'wRSS':>7} |"
            )
        p(hdr)
        base_row = f"  {'baseline':<8}{'':>7} | {'':>10}{'':>5}{'':>7}{'':>7}{'':>7}{'':>8} |"
        for s in self.servers:
            b = s.baseline
            base_row += (
                f" {'':>9}{s.pid:>8}{b.get('fds') or 0:>5}{b.get('children') or 0:>4}{'':>5}"
                f"{(b.get('rss') or 0) / 1024:>6.1f}{'':>7} |"
            )
        for smp in self.samples:
            c = smp.client
            row = (
                f"  {smp.label:<8}{smp.t:>7.0f} | {c['fds']:>10}{c['threads']:>5}{(c['rss'] or 0) / 1024:>7.1f}"
                f"{(c['rss_trim'] or 0) / 1024:>7.1f}{(c['malloc'] or 0) / 1024:>7.1f}{c['objs']:>8} |"
            )
            for r in smp.servers:
                if r["up"]:
                    row += (
                        f" {'':>9}{r['pid']:>8}{r['fds']:>5}{r['children']:>4}{r['desc']:>5}"
                        f"{(r['rss'] or 0) / 1024:>6.1f}{r['wrss'] / 1024:>7.1f} |"
                    )
                else:
                    row += f" {'':>9}{'(down)':>8}{'':>27} |"
            p(row)
        p(base_row + "  (current daemons)")
        findings = self.server_log_findings()
        p(
            f"\nserver logs: {len(findings)} distinct ERROR/Traceback lines"
            + (":" if findings else "")
        )
        for f_ in findings:
            p("  " + f_)
        if self.problems:
            p(f"\nsoak: PROBLEMS ({'; '.join(self.problems)})")
            return 1
        if final:
            p("\nsoak: OK")
        return 0


class _Deliberate(Exception):
    """Wraps an error the operation asked for (its ``__cause__``)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="parnet soak test: random operations while servers get killed"
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    ap.add_argument("--servers", type=int, default=3, help="number of servers (default 3)")
    ap.add_argument(
        "--tls", action=argparse.BooleanOptionalAction, default=True, help="TLS + SRP (default on)"
    )
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="an 18-second run (CI smoke test; same as --minutes 0.3)",
    )
    a = ap.parse_args(argv)
    if a.quick:
        a.minutes = 0.3
    if a.seed is None:
        a.seed = random.randrange(1_000_000)
    if a.servers < 1 or a.servers > 100:
        ap.error("--servers must be 1..100")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: dump stacks
    if not fix_malloc_thresholds():
        print(
            "(could not fix glibc's malloc thresholds: client RSS may climb without a leak)",
            flush=True,
        )
    home = tempfile.mkdtemp(prefix="parnet-soak-")
    os.environ["PARNET_HOME"] = home
    os.environ["XDG_RUNTIME_DIR"] = home
    keep = False
    soak = None
    try:
        from parnet.auth.keygen import parallel_generate_srp_data

        parallel_generate_srp_data(
            "soak", password="soak-password-123", directory=os.path.join(home, "srp")
        )
        soak = Soak(a, home)
        rc = soak.run()
        keep = rc != 0
        return rc
    except BaseException:
        traceback.print_exc()
        keep = True
        if soak is not None:
            with contextlib.suppress(Exception):
                soak.problems.append("the soak itself failed (traceback above)")
                soak.report(final=False)
        return 1
    finally:
        if soak is not None:
            soak.stop_ev.set()
            soak.stop_all()
            left = set()
            for s in soak.servers:
                left |= {p for p in session_members(s.pid) if alive(p)} if s.pid else set()
            if left:
                print(
                    f"after stopping the servers, processes remain in their sessions: {sorted(left)}",
                    flush=True,
                )
        if keep:
            print(f"(server logs kept in {home})", flush=True)
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
