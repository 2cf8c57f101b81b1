"""Core performance benchmark of parnet, measured against the physical limit in the same run.

Run from the repository root::

    .venv/bin/python bench/bench_core.py [--tls] [--quick]

1. Raw baselines: two Python processes over loopback TCP (TCP_NODELAY), length-prefixed frames
   carrying pickle protocol 5 (large arrays as one out-of-band buffer, received with
   ``recv_into`` into a preallocated buffer on both sides). ``--tls``: the same over TLS 1.3
   (stdlib ``ssl``, blocking ``SSLSocket``, self-signed certificate made with ``cryptography``).
2. parnet with two local servers on 127.0.0.2 and 127.0.0.3 (no TLS; ``--tls`` adds a TLS run):
   W1 small round trip, W2 echo of 8 MB / 80 MB, W3 80 MB through two servers, W5 ``pconnect``
   time, and the idle worker's (and the daemon's) resident memory.

Prints one table; asserts nothing; exits 0 (also when a workload fails: that row says why).
See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import os
import pickle
import platform
import random
import resource
import select
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MB = 1 << 20
SIZES = {"8 MB": 8 * MB, "80 MB": 80 * MB}
SERVER_ADDRS = ("127.0.0.2", "127.0.0.3")
SMALL_MSG = "psend(1, sockets[0])"  # what the client sends in W1 (there: as a reval command)


@dataclass
class Reps:
    """How many repetitions each measurement takes."""

    rtt: int
    rtt_warm: int
    echo8: int
    echo80: int
    warm_bulk: int
    connects: int
    #: payload sizes of the slow extras (values kept alive, raw variants): all in a full run,
    #: 8 MB only in a quick one
    extra_sizes: tuple[str, ...] = ("8 MB", "80 MB")


FULL = Reps(rtt=3000, rtt_warm=300, echo8=40, echo80=15, warm_bulk=2, connects=15)
QUICK = Reps(
    rtt=400, rtt_warm=50, echo8=6, echo80=3, warm_bulk=1, connects=4, extra_sizes=("8 MB",)
)


# --------------------------------------------------------------------------------------
# Raw baseline: framing shared by the parent (client) and the child (echo peer)
# --------------------------------------------------------------------------------------
# header: kind u8 (0 message, 1 quit), body length u32, out-of-band buffer length u64
HDR = struct.Struct("!BIQ")
K_MSG, K_QUIT = 0, 1
_SCRATCH = 256 * 1024


@dataclass(frozen=True)
class RawOpts:
    """How the raw pair treats its memory and sockets (``--gap`` compares the variants).

    alloc: ``numpy``: receive buffers from ``np.empty``, which NumPy advises onto transparent
        huge pages (``MADV_HUGEPAGE``, arrays of 4 MB or more), touched once and reused: the
        memory parnet's buffer pool receives into. ``bytearray``: zero-filled ``bytearray``
        (no huge-page advice), the baseline before issue 14. ``fresh``: a new ``np.empty``
        per receive (page faults on every receive, as without a pool).
    chunk: most bytes per ``recv_into`` call (0: all that is missing).
    sockbuf: ``SO_SNDBUF``/``SO_RCVBUF`` in bytes on both sides (0: the kernel's autotuning).
    nbsend: send a large buffer as parnet does (plain TCP only): ``send`` with ``MSG_DONTWAIT``,
        ``poll`` for room when the socket is full; otherwise one blocking ``sendall``.
    own_session: the echo child runs in a session of its own, as parnet's servers do
        (``start_new_session``). With ``sched_autogroup_enabled`` (the default on most
        desktop and many server kernels) every session is a scheduling group with an equal
        share of a busy CPU: a child in the benchmark's session shares one share with the
        client, while parnet's client and worker have one each.
    """

    alloc: str = "numpy"
    chunk: int = 0
    sockbuf: int = 0
    nbsend: bool = False
    own_session: bool = True

    def argv(self) -> list[str]:
        return [
            "--raw-alloc",
            self.alloc,
            "--raw-chunk",
            str(self.chunk),
            "--raw-sockbuf",
            str(self.sockbuf),
            *(["--raw-nbsend"] if self.nbsend else []),
        ]


def raw_buffer(size: int, alloc: str) -> memoryview:
    """A receive buffer of ``size`` bytes as ``alloc`` says (see ``RawOpts``), touched once."""
    if alloc == "bytearray":
        return memoryview(bytearray(size))
    a = np.empty(size, dtype=np.uint8)
    if alloc != "fresh":
        a.fill(0)  # fault every page in now, as the pool's reused blocks were by earlier values
    return memoryview(a)


class RawBuffers:
    """The receive buffers of one side: one per payload size, preallocated (or, with
    ``alloc="fresh"``, a new one per receive)."""

    def __init__(self, alloc: str) -> None:
        self.alloc = alloc
        self.bufs = (
            []
            if alloc == "fresh"
            else [raw_buffer(s + 4096, alloc) for s in sorted(SIZES.values())]
        )

    def get(self, n: int) -> memoryview:
        if self.alloc == "fresh":
            return raw_buffer(n, "fresh")
        for b in self.bufs:
            if b.nbytes >= n:
                return b
        raise ValueError(f"no preallocated buffer of {n} bytes")


class RawConn:
    """A blocking socket with a read-ahead scratch buffer: a small frame costs one ``recv``,
    a large out-of-band buffer is read straight into memory from ``RawBuffers``."""

    def __init__(self, sock: socket.socket, opts: RawOpts) -> None:
        self.sock = sock
        self.chunk = opts.chunk
        self.nbsend = opts.nbsend and not isinstance(sock, ssl.SSLSocket)
        self.scratch = bytearray(_SCRATCH)
        self.mv = memoryview(self.scratch)
        self.start = self.end = 0

    def _fill(self, need: int) -> None:
        """Makes at least ``need`` bytes available in scratch."""
        if self.end - self.start >= need:
            return
        if self.start:
            n = self.end - self.start
            self.scratch[:n] = self.scratch[self.start : self.end]
            self.start, self.end = 0, n
        while self.end < need:
            got = self.sock.recv_into(self.mv[self.end :])
            if not got:
                raise ConnectionError("peer closed")
            self.end += got

    def read_exact(self, n: int) -> bytes:
        """``n`` bytes (small parts only: header, pickle body)."""
        self._fill(n)
        out = bytes(self.mv[self.start : self.start + n])
        self.start += n
        return out

    def read_into(self, target: memoryview) -> None:
        """Fills ``target``: first from what is already buffered, then with ``recv_into``."""
        have = min(self.end - self.start, target.nbytes)
        target[:have] = self.mv[self.start : self.start + have]
        self.start += have
        off = have
        total = target.nbytes
        chunk = self.chunk or total
        while off < total:
            got = self.sock.recv_into(target[off : off + chunk])
            if not got:
                raise ConnectionError("peer closed")
            off += got

    def send_msg(self, obj: object) -> None:
        """One frame: header + pickle body in one write, then the out-of-band buffer if any."""
        bufs: list[memoryview] = []

        def keep(pb: pickle.PickleBuffer) -> bool:
            mv = pb.raw()
            if mv.nbytes < 1024:
                return True
            bufs.append(mv)
            return False

        body = pickle.dumps(obj, protocol=5, buffer_callback=keep)
        blen = bufs[0].nbytes if bufs else 0
        self.sock.sendall(HDR.pack(K_MSG, len(body), blen) + body)
        if bufs and self.nbsend:
            self._send_nowait(bufs[0].cast("B"))
        elif bufs:
            self.sock.sendall(bufs[0])

    def _send_nowait(self, mv: memoryview) -> None:
        off = 0
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLOUT)
        while off < mv.nbytes:
            try:
                off += self.sock.send(mv[off:], socket.MSG_DONTWAIT)
            except BlockingIOError:
                poller.poll()

    def recv_msg(self, into: RawBuffers | None) -> tuple[int, object]:
        """The next frame: (kind, value); a buffer is read into memory from ``into``."""
        kind, blen, buflen = HDR.unpack(self.read_exact(HDR.size))
        if kind == K_QUIT:
            return kind, None
        body = self.read_exact(blen)
        bufs = []
        if buflen:
            assert into is not None, "a buffer arrived but there is no memory for it"
            target = into.get(buflen)[:buflen]
            self.read_into(target)
            bufs.append(target)
        return kind, pickle.loads(body, buffers=bufs)


def _tune(sock: socket.socket, opts: RawOpts) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if opts.sockbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.sockbuf)


def echo_loop(sock: socket.socket, opts: RawOpts) -> None:
    """The echo peer's side of a connected socket: answers every message until told to quit.

    A str (the small message) is answered with the int 1, like W1's ``psend(1, ...)`` (a str
    naming a number, as W1's uncached commands do, with that number); anything else (an
    array, received into this side's buffer) is sent back as is.
    """
    conn = RawConn(sock, opts)
    bufs = RawBuffers(opts.alloc)
    while True:
        kind, val = conn.recv_msg(bufs)
        if kind == K_QUIT:
            break
        if isinstance(val, str):
            val = int(val[6:-13]) if val[6:-13].isdigit() else 1
        conn.send_msg(val)


def raw_child_main(port: int, use_tls: bool, opts: RawOpts) -> int:
    """The echo peer process: connects to the parent, runs ``echo_loop``."""
    sock = socket.socket()
    _tune(sock, opts)  # before connecting: the window scale is fixed by the handshake
    sock.connect(("127.0.0.1", port))
    if use_tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock)
    echo_loop(sock, opts)
    sock.close()
    return 0


def make_cert(directory: str) -> tuple[str, str]:
    """A self-signed EC P-256 certificate and key (PEM files) in ``directory``: the kind a
    parnet server makes for itself, so the raw TLS baseline runs the same cryptography."""
    from parnet.auth.tls import ensure_server_identity

    cert, key = ensure_server_identity(directory)
    return str(cert), str(key)


def median_ns(samples: list[int]) -> float:
    return float(statistics.median(samples))


class RawPeer:
    """The raw baseline: a child process (the echo peer) connected to this one, plain or TLS."""

    def __init__(self, use_tls: bool, certdir: str | None, opts: RawOpts = RawOpts()) -> None:
        ls = socket.socket()
        _tune(ls, opts)  # the accepted socket inherits the buffer sizes
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        self.opts = opts
        self.child = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--raw-child",
                str(port),
                *(["--raw-tls"] if use_tls else []),
                *opts.argv(),
            ],
            start_new_session=opts.own_session,
        )
        try:
            ls.settimeout(30)
            sock, _ = ls.accept()
            sock.settimeout(None)
            _tune(sock, opts)
            if use_tls:
                assert certdir is not None
                os.makedirs(certdir, mode=0o700, exist_ok=True)
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.load_cert_chain(*make_cert(certdir))
                sock = ctx.wrap_socket(sock, server_side=True)
        except BaseException:
            self.child.kill()
            self.child.wait()
            raise
        finally:
            ls.close()
        self.sock = sock
        self.conn = RawConn(sock, opts)
        self.back = RawBuffers(opts.alloc)

    def roundtrip(self, msg: str = SMALL_MSG) -> int:
        """One small round trip (ns)."""
        t0 = time.perf_counter_ns()
        self.conn.send_msg(msg)
        self.conn.recv_msg(None)
        return time.perf_counter_ns() - t0

    def echo(self, a: np.ndarray, check: bool = False) -> int:
        """One echo of ``a`` (ns), received into this side's buffer."""
        t0 = time.perf_counter_ns()
        self.conn.send_msg(a)
        _, b = self.conn.recv_msg(self.back)
        dt = time.perf_counter_ns() - t0
        if check and not np.array_equal(a, b):  # type: ignore[arg-type]
            raise RuntimeError("raw echo returned different data")
        return dt

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(HDR.pack(K_QUIT, 0, 0))
        try:
            self.child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        self.sock.close()


# --------------------------------------------------------------------------------------
# Where the time goes: CPU time and page faults of every process taking part
# --------------------------------------------------------------------------------------
_TCK = os.sysconf("SC_CLK_TCK")


Sample = tuple[float, float, float, float]  # minor faults, user s, system s, run time s


def proc_usage(pid: int) -> Sample:
    """Minor page faults, user and system CPU seconds (clock ticks; this process: from
    ``getrusage``, finer) and the exact time on a CPU (``/proc/<pid>/task/*/schedstat``, ns)
    of ``pid``, all its threads; zeros for a process that is gone."""
    run = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run += int(f.read().split()[0])
        if pid == os.getpid():
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_minflt, r.ru_utime, r.ru_stime, run / 1e9
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0.0, 0.0, 0.0
    return int(fields[7]), int(fields[11]) / _TCK, int(fields[12]) / _TCK, run / 1e9


@dataclass
class Usage:
    """Summed over the timed iterations of one workload, per side (``client`` is this
    process, ``peers`` the raw child or the parnet workers): a ``Sample`` of differences."""

    ops: int = 0
    client: Sample = (0, 0.0, 0.0, 0.0)
    peers: Sample = (0, 0.0, 0.0, 0.0)

    def add(self, ops: int, client: Sample, peers: Sample) -> None:
        self.ops += ops
        self.client = _plus(self.client, client)
        self.peers = _plus(self.peers, peers)

    def cpu_per_op(self) -> float:
        """Seconds on a CPU (every process, every thread) per iteration."""
        return (self.client[3] + self.peers[3]) / max(self.ops, 1)

    def per_op(self) -> str:
        """'faults c/p, CPU c/p (user+sys c/p)' per iteration (in us below 1 ms of CPU)."""
        n = max(self.ops, 1)
        c, p = self.client, self.peers
        unit, k = ("us", 1e6) if max(c[3], p[3]) / n < 1e-3 else ("ms", 1e3)
        return (
            f"faults {c[0] / n:.0f}/{p[0] / n:.0f}, CPU {unit} {c[3] / n * k:.1f}/{p[3] / n * k:.1f} "
            f"(user+sys {c[1] / n * k:.1f}+{c[2] / n * k:.1f}/{p[1] / n * k:.1f}+{p[2] / n * k:.1f})"
        )


def _plus(a: Sample, b: Sample) -> Sample:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


def _usage_sum(pids: Sequence[int]) -> Sample:
    out: Sample = (0, 0.0, 0.0, 0.0)
    for pid in pids:
        out = _plus(out, proc_usage(pid))
    return out


def _diff(a: Sample, b: Sample) -> Sample:
    return b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]


def interleaved(
    fns: dict[str, Callable[[], int]],
    n: int,
    warm: int,
    block: int,
    peers: dict[str, Sequence[int]] | None = None,
) -> tuple[dict[str, list[int]], dict[str, Usage]]:
    """Runs each ``fn`` (one timed iteration, returns ns) ``warm`` times, then ``n`` timed times,
    alternating between them in blocks of ``block`` (order rotated each round), so that every
    figure sees the same machine conditions. Returns the samples per name, and the usage
    (this process and the processes ``peers[name]``) over each name's timed blocks."""
    names = list(fns)
    peers = peers or {}
    for name in names:
        for _ in range(warm):
            fns[name]()
    out: dict[str, list[int]] = {name: [] for name in names}
    usage = {name: Usage() for name in names}
    me = [os.getpid()]
    done = 0
    rnd = 0
    while done < n:
        k = min(block, n - done)
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            fn = fns[name]
            gc.collect()
            ps = peers.get(name, ())
            c0, p0 = _usage_sum(me), _usage_sum(ps)
            for _ in range(k):
                out[name].append(fn())
            usage[name].add(k, _diff(c0, _usage_sum(me)), _diff(p0, _usage_sum(ps)))
        done += k
        rnd += 1
    return out, usage


def timer_ns(fn: Callable[[], object]) -> Callable[[], int]:
    """``fn`` as one timed iteration for ``interleaved``: runs it, returns its time in ns."""

    def run() -> int:
        t = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t

    return run


def anon_huge_kb(pid: int) -> int | None:
    """``AnonHugePages`` of ``pid`` (kB): memory actually on transparent huge pages."""
    return mem_kb(pid, "AnonHugePages")


# --------------------------------------------------------------------------------------
# parnet servers
# --------------------------------------------------------------------------------------
def port_pair_free(addrs: Sequence[str], port: int) -> bool:
    """Whether ``port`` and ``port + 1`` can be bound on every address in ``addrs``."""
    for addr in addrs:
        for p in (port, port + 1):
            s = socket.socket()
            try:
                s.bind((addr, p))
            except OSError:
                return False
            finally:
                s.close()
    return True


def pick_ports(addrs: Sequence[str] = SERVER_ADDRS, rng: Any = random) -> int:
    """A random even command port in 20000-40000 whose +1 (data) is free too, on every address."""
    for _ in range(200):
        port = rng.randrange(20000, 40000, 2)
        if port_pair_free(addrs, port):
            return port
    raise RuntimeError("no free port pair found")


@contextlib.contextmanager
def bench_servers(
    use_tls: bool,
    prefix: str,
    addrs: Sequence[str] = SERVER_ADDRS,
    pids_out: list[int] | None = None,
) -> Any:
    """Servers on ``addrs`` with a private ``PARNET_HOME`` (a bench user when TLS), stopped
    by pid on exit; yields their ``host:port`` names for ``pconnect``. ``pids_out`` receives
    the daemons' pids."""
    home = tempfile.mkdtemp(prefix=prefix)
    os.environ["PARNET_HOME"] = home
    os.environ["XDG_RUNTIME_DIR"] = home
    from parnet.server.launch import start_background, stop_pid

    if use_tls:
        from parnet.auth.keygen import parallel_generate_srp_data

        parallel_generate_srp_data("bench", password="bench-password-123")
    pids: list[int] = pids_out if pids_out is not None else []
    try:
        port = pick_ports(addrs)
        for addr in addrs:
            pids.append(
                start_background(
                    use_tls=use_tls, cmd_port=port, data_port=port + 1, bind=addr, allow_root=True
                )
            )
        yield [f"{x}:{port}" for x in addrs]
    finally:
        for pid in pids:
            stop_pid(pid)
        shutil.rmtree(home, ignore_errors=True)


def proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) of every process, from /proc/*/stat."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(fields[1]), int(fields[3]), fields[0])
    return out


def children_of(pid: int) -> list[int]:
    """Child pids of ``pid``: from /proc/<pid>/task/*/children, else by scanning /proc/*/stat."""
    kids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.update(int(x) for x in f.read().split())
        return sorted(kids)
    except OSError:
        pass
    return sorted(p for p, (ppid, _, _) in proc_table().items() if ppid == pid)


def mem_kb(pid: int, key: str) -> int | None:
    """``VmRSS`` from /proc/<pid>/status, or ``Pss``/``AnonHugePages`` from smaps_rollup, in kB."""
    path = f"/proc/{pid}/smaps_rollup" if key in ("Pss", "AnonHugePages") else f"/proc/{pid}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------
# results table
# --------------------------------------------------------------------------------------
NOT_AT_LIMIT = "baseline not at the limit"


@dataclass
class Row:
    name: str
    figure: str
    baseline: str = "-"
    ratio: float | None = None
    target: str = "-"
    verdict: str = ""  # "ok", "over", NOT_AT_LIMIT, or "" (no target)
    note: str = ""
    failed: bool = False
    cpu: float | None = None  # CPU time per iteration of all processes, over the baseline's


def verdict(ratio: float, limit: float | None) -> str:
    """How a ratio to the limit reads: below 1.0 the baseline was not the limit."""
    if ratio < 1.0:
        return NOT_AT_LIMIT
    if limit is None:
        return ""
    return "ok" if ratio <= limit else "over"


def fmt_time(ns: float) -> str:
    if ns < 1e6:
        return f"{ns / 1e3:.1f} us"
    return f"{ns / 1e6:.2f} ms"


def fmt_echo(ns: float, size: int) -> str:
    """Echo time and throughput (payload bytes moved both ways per second)."""
    return f"{ns / 1e6:.2f} ms ({2 * size / MB / (ns / 1e9):.0f} MB/s)"


def ratio_row(
    name: str,
    ns: float,
    base_ns: float,
    limit: float | None,
    *,
    size: int | None = None,
    use: tuple[Usage, Usage] | None = None,
    note: str = "",
) -> Row:
    """A row with the ratio of ``ns`` to ``base_ns``; ``use``: the (measured, baseline) usage,
    for the CPU ratio and the note."""
    fig = fmt_echo(ns, size) if size else fmt_time(ns)
    base = fmt_echo(base_ns, size) if size else fmt_time(base_ns)
    r = ns / base_ns
    cpu = None
    if use is not None:
        cpu = use[0].cpu_per_op() / use[1].cpu_per_op() if use[1].cpu_per_op() > 0 else None
        note = (
            note or f"per iteration, client/peers: parnet {use[0].per_op()}; raw {use[1].per_op()}"
        )
    return Row(
        name,
        fig,
        base,
        r,
        "-" if limit is None else f"<= {limit:g}x",
        verdict(r, limit),
        note,
        cpu=cpu,
    )


def failed_row(name: str, e: BaseException) -> Row:
    return Row(name, "FAILED", note=f"{type(e).__name__}: {str(e)[:150]}", failed=True)


def print_table(
    title: str, rows: list[Row], head: tuple[str, ...] = ("workload", "parnet", "baseline")
) -> None:
    cpu = any(r.cpu is not None for r in rows)
    head = (*head, "ratio", *(["CPU ratio"] if cpu else []), "target", "")
    cells = [head] + [
        (
            r.name,
            r.figure,
            r.baseline,
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            *(["-" if r.cpu is None else f"{r.cpu:.2f}x"] if cpu else []),
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(c[k]) for c in cells) for k in range(len(head))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print(line)
    for k, c in enumerate(cells):
        print("  ".join(s.ljust(w) for s, w in zip(c, widths, strict=True)).rstrip())
        if k == 0:
            print(line)
    print(line)
    for r in rows:
        if r.note:
            print(f"  {r.name}: {r.note}")


# --------------------------------------------------------------------------------------
# Raw variants: what the raw figure depends on (memory, recv_into size, socket buffers)
# --------------------------------------------------------------------------------------
GAP_VARIANTS = {
    "numpy (the baseline)": RawOpts(),
    "bytearray (before issue 14)": RawOpts(alloc="bytearray"),
    "numpy, new buffer per receive": RawOpts(alloc="fresh"),
    "numpy, recv_into <= 256 KiB": RawOpts(chunk=256 * 1024),
    "numpy, SO_SNDBUF/SO_RCVBUF 4 MB": RawOpts(sockbuf=4 * MB),
    "numpy, send as parnet (MSG_DONTWAIT + poll)": RawOpts(nbsend=True),
    "numpy, child in the client's session (before issue 14)": RawOpts(own_session=False),
}


def run_gap(reps: Reps, use_tls: bool, home: str) -> list[Row]:
    """The raw echo with each of ``GAP_VARIANTS``, interleaved; ratios to the first."""
    tag = " [tls]" if use_tls else ""
    peers: dict[str, RawPeer] = {}
    rows: list[Row] = []
    try:
        for name, opts in GAP_VARIANTS.items():
            if use_tls and opts.nbsend:
                continue  # a blocking SSLSocket: not the same path as parnet's non-blocking TLS
            peers[name] = RawPeer(use_tls, os.path.join(home, "rawcert"), opts)
        first = next(iter(GAP_VARIANTS))
        for label in reps.extra_sizes:
            size = SIZES[label]
            a = np.random.default_rng(1).random(size // 8)
            for p in peers.values():
                p.echo(a, check=True)
            n = reps.echo8 if size < 50 * MB else reps.echo80
            fns = {name: (lambda p=p, a=a: p.echo(a)) for name, p in peers.items()}
            s, use = interleaved(
                fns, n, reps.warm_bulk, 1, {name: [p.child.pid] for name, p in peers.items()}
            )
            base = median_ns(s[first])
            for name in peers:
                r = ratio_row(
                    f"echo {label}: {name}{tag}",
                    median_ns(s[name]),
                    base,
                    None,
                    size=size,
                    use=(use[name], use[first]),
                    note=f"client/peer {use[name].per_op()}",
                )
                if name == first:
                    r.ratio, r.baseline, r.verdict, r.cpu = None, "-", "", None
                rows.append(r)
        huge = {name: (anon_huge_kb(p.child.pid) or 0) // 1024 for name, p in peers.items()}
        rows.append(
            Row(
                f"AnonHugePages of the echo peers{tag}",
                "",
                note=", ".join(f"{n}: {mb} MB" for n, mb in huge.items())
                + f"; this process: {(anon_huge_kb(os.getpid()) or 0) // 1024} MB",
            )
        )
    except Exception as e:  # noqa: BLE001 - report
        rows.append(failed_row(f"raw variants{tag}", e))
    finally:
        for p in peers.values():
            p.close()
    return rows


# --------------------------------------------------------------------------------------
# parnet workloads, each interleaved with its raw baseline
# --------------------------------------------------------------------------------------
#: Values kept alive by the "kept alive" W2 rows, on each side: one more than the blocks
#: parnet's buffer pool tracks (``parnet.bufpool.MAX_BLOCKS``, 4), so no receive finds one free.
KEEP_ALIVE = 5


def run_suite(
    reps: Reps, use_tls: bool, with_parnet: bool, home: str
) -> tuple[list[Row], dict[str, float]]:
    """Raw baselines (plain or TLS) and, with ``with_parnet``, the parnet workloads on two
    servers started here; each parnet workload runs interleaved with its raw counterpart.

    Returns:
        The parnet rows and the raw medians (ns): ``rtt``, ``8 MB``, ``80 MB``.
    """
    from parnet import pconnect, precv, psend, reval, sclose
    from parnet.server.launch import start_background, stop_pid

    tag = " [tls]" if use_tls else ""
    rows: list[Row] = []
    base: dict[str, float] = {}
    pids: list[int] = []
    workers: list[int] = []
    conns = None
    broken: str | None = None
    raw = RawPeer(use_tls, os.path.join(home, "rawcert"))
    try:
        if with_parnet:
            try:
                port = pick_ports()
                hosts = [f"{a}:{port}" for a in SERVER_ADDRS]
                for addr in SERVER_ADDRS:
                    pids.append(
                        start_background(
                            use_tls=use_tls,
                            cmd_port=port,
                            data_port=port + 1,
                            bind=addr,
                            allow_root=True,
                            log_file=os.path.join(home, f"server-{addr}-{port}.log"),
                        )
                    )
                conns = pconnect(hosts, use_tls=use_tls)
            except Exception as e:  # noqa: BLE001 - report, still measure the raw baselines
                rows.append(failed_row(f"parnet set-up{tag}", e))
                broken = "no network"
        c = conns

        # idle memory, right after pconnect, before any work
        if c is not None:
            time.sleep(0.2)
            for k, (addr, dpid) in enumerate(zip(SERVER_ADDRS, pids, strict=True), start=1):
                kids = children_of(dpid)
                d_rss = mem_kb(dpid, "VmRSS")
                if len(kids) != 1:
                    rows.append(
                        Row(
                            f"idle worker RSS, server {k}{tag}",
                            "?",
                            note=f"expected one worker child of daemon {dpid}, found {kids}",
                        )
                    )
                else:
                    workers.append(kids[0])
                    w_rss = mem_kb(kids[0], "VmRSS") or 0
                    w_pss = mem_kb(kids[0], "Pss")
                    pss = f", PSS {w_pss / 1024:.1f} MB" if w_pss is not None else ""
                    rows.append(
                        Row(
                            f"idle worker RSS, server {k}{tag}",
                            f"{w_rss / 1024:.1f} MB",
                            target="<= 40 MB",
                            verdict="ok" if w_rss <= 40 * 1024 else "over",
                            note=f"worker pid {kids[0]}{pss}",
                        )
                    )
                rows.append(
                    Row(
                        f"daemon RSS, server {k}{tag}",
                        f"{(d_rss or 0) / 1024:.1f} MB",
                        note=f"daemon pid {dpid} ({addr})",
                    )
                )

        def measure(
            name: str,
            raw_fn: Callable[[], int],
            par_fn: Callable[[], int] | None,
            prepare: Callable[[int], None] | None,
            n: int,
            warm: int,
            block: int,
            par_peers: Sequence[int] = (),
        ) -> tuple[float, float | None, tuple[Usage, Usage] | None]:
            """Medians (raw, parnet; parnet None if not run) and the usage (parnet, raw).
            ``prepare(count)`` runs first (e.g. the server loop for ``count`` iterations)."""
            nonlocal broken
            if par_fn is not None and broken is None:
                try:
                    if prepare is not None:
                        prepare(warm + n)
                    s, u = interleaved(
                        {"raw": raw_fn, "parnet": par_fn},
                        n,
                        warm,
                        block,
                        {"raw": [raw.child.pid], "parnet": par_peers},
                    )
                    return median_ns(s["raw"]), median_ns(s["parnet"]), (u["parnet"], u["raw"])
                except Exception as e:  # noqa: BLE001
                    rows.append(failed_row(name, e))
                    broken = name
            elif par_fn is not None:
                rows.append(
                    Row(name, "skipped", note=f"not run: {broken} failed before", failed=True)
                )
            s, _ = interleaved({"raw": raw_fn}, n, warm, block)
            return median_ns(s["raw"]), None, None

        # W1: small round trip through a reval, against the raw small round trip; then with
        # a new command string each time (misses the client's frame cache and the worker's
        # compiled-code cache), against raw round trips of strings just as new
        w1 = w1_new = None
        counter = iter(range(10**7, 10**8))
        if c is not None:
            c1 = c[1]

            def w1() -> int:
                t0 = time.perf_counter_ns()
                reval(SMALL_MSG, c1)
                precv(c1)
                return time.perf_counter_ns() - t0

            def w1_new() -> int:
                cmd = f"psend({next(counter)}, sockets[0])"
                t0 = time.perf_counter_ns()
                reval(cmd, c1)
                precv(c1)
                return time.perf_counter_ns() - t0

        name = f"W1 reval+psend/precv round trip{tag}"
        base["rtt"], par, use = measure(
            name, raw.roundtrip, w1, None, reps.rtt, reps.rtt_warm, 100, workers[:1]
        )
        if par is not None:
            rows.append(ratio_row(name, par, base["rtt"], 1.3, use=use))

        def raw_new() -> int:
            return raw.roundtrip(f"psend({next(counter)}, sockets[0])")

        name = f"W1 with a new command string each time{tag}"
        n_new = reps.rtt // 3
        rtt_new, par, use = measure(
            name, raw_new, w1_new, None, n_new, reps.rtt_warm, 100, workers[:1]
        )
        if par is not None:
            rows.append(ratio_row(name, par, rtt_new, None, use=use))

        # W2: echo client -> server 1 -> client; the server runs a loop of fixed length. Then
        # the same with the last KEEP_ALIVE values kept alive on both sides: every receive
        # then needs new memory (the buffer pool has no free block)
        for keep in (False, True):
            for label, size in SIZES.items():
                if keep and label not in reps.extra_sizes:
                    continue
                a = np.random.default_rng(1).random(size // 8)
                raw.echo(a, check=True)
                n = reps.echo8 if size < 50 * MB else reps.echo80
                w2 = prep2 = None
                if c is not None:
                    kept: collections.deque = collections.deque(maxlen=KEEP_ALIVE if keep else 0)
                    if keep:
                        loop = (
                            f"_kept = []\nfor _ in range({{n}}):\n    _kept.append(precv(sockets[0]))\n"
                            f"    del _kept[:-{KEEP_ALIVE}]\n    psend(_kept[-1], sockets[0])\ndel _kept"
                        )
                    else:
                        loop = "for _ in range({n}):\n    psend(precv(sockets[0]), sockets[0])"

                    def prep2(count: int, a: np.ndarray = a, loop: str = loop) -> None:
                        reval(loop.format(n=count + 1), c[1])
                        psend(a, c[1])
                        if not np.array_equal(a, precv(c[1], timeout=120)):
                            raise RuntimeError("echo returned different data")

                    def w2(a: np.ndarray = a, kept: collections.deque = kept) -> int:
                        t0 = time.perf_counter_ns()
                        psend(a, c[1])
                        v = precv(c[1], timeout=120)
                        dt = time.perf_counter_ns() - t0
                        kept.append(v)
                        return dt

                name = f"W2 echo {label}{', values kept alive' if keep else ''}{tag}"
                b, par, use = measure(
                    name, lambda a=a: raw.echo(a), w2, prep2, n, reps.warm_bulk, 1, workers[:1]
                )
                if not keep:
                    base[label] = b
                if par is not None:
                    limit = None if keep else 1.2 if size < 50 * MB else 1.1
                    rows.append(ratio_row(name, par, b, limit, size=size, use=use))
                if c is not None:
                    kept.clear()

        # W3: 80 MB client -> server 1 -> server 2 -> client, against the raw 80 MB echo
        size = SIZES["80 MB"]
        a3 = np.random.default_rng(2).random(size // 8)
        w3 = prep3 = None
        if c is not None:

            def prep3(count: int) -> None:
                reval(
                    f"for _ in range({count + 1}):\n    psend(precv(sockets[0]), sockets[2])", c[1]
                )
                reval(
                    f"for _ in range({count + 1}):\n    psend(precv(sockets[1]), sockets[0])", c[2]
                )
                psend(a3, c[1])
                if not np.array_equal(a3, precv(c[2], timeout=120)):
                    raise RuntimeError("W3 returned different data")

            def w3() -> int:
                t0 = time.perf_counter_ns()
                psend(a3, c[1])
                precv(c[2], timeout=120)
                return time.perf_counter_ns() - t0

        name = f"W3 80 MB via 2 servers{tag}"
        b80, par, use = measure(
            name, lambda: raw.echo(a3), w3, prep3, reps.echo80, reps.warm_bulk, 1, workers
        )
        if par is not None:
            rows.append(ratio_row(name, par, b80, 1.6, size=size, use=use))
        if workers:
            huge = ", ".join(f"{(anon_huge_kb(w) or 0) // 1024} MB" for w in workers)
            rows.append(
                Row(
                    f"AnonHugePages after the bulk rows{tag}",
                    "",
                    note=f"workers {huge}; raw echo peer {(anon_huge_kb(raw.child.pid) or 0) // 1024} MB; "
                    f"this process {(anon_huge_kb(os.getpid()) or 0) // 1024} MB",
                )
            )

        # W5: pconnect until it returns, sclose between
        if c is not None:
            sclose(c)
            conns = None
            name = f"W5 pconnect to 2 servers{tag}"
            try:
                samples = []
                for _ in range(reps.connects):
                    time.sleep(0.05)  # let the previous network's workers exit
                    t0 = time.perf_counter_ns()
                    conns = pconnect(hosts, use_tls=use_tls)
                    samples.append(time.perf_counter_ns() - t0)
                    sclose(conns)
                    conns = None
                ms = median_ns(samples) / 1e6
                rows.append(
                    Row(
                        name,
                        f"{ms:.1f} ms",
                        target="<= 100 ms",
                        verdict="ok" if ms <= 100 else "over",
                        note=f"min {min(samples) / 1e6:.1f} ms, max {max(samples) / 1e6:.1f} ms "
                        f"over {len(samples)} connects",
                    )
                )
            except Exception as e:  # noqa: BLE001
                rows.append(failed_row(name, e))
    finally:
        if conns is not None:
            with contextlib.suppress(Exception):
                sclose(conns)
        for pid in pids:
            stop_pid(pid)
        raw.close()
    return rows, base


# --------------------------------------------------------------------------------------
def git_state() -> str:
    """The commit of the checkout this runs from, and whether src/ has local changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head or '?'}{' + local changes in src/' if dirty else ''}"


def environment() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, {ssl.OPENSSL_VERSION}, "
        f"{len(os.sched_getaffinity(0))} cores ({cpu}), Linux {platform.release()}"
    )


def print_raw(base_plain: dict[str, float], base_tls: dict[str, float] | None) -> None:
    print(
        "\nRaw baselines (two Python processes, loopback TCP_NODELAY, pickle 5, recv_into preallocated)"
    )
    cols = ["", "plain TCP"] + (["TLS 1.3", "TLS/plain"] if base_tls else [])
    lines = [cols]
    for key, label in (("rtt", "small round trip"), ("8 MB", "echo 8 MB"), ("80 MB", "echo 80 MB")):
        size = SIZES.get(key)

        def fmt(ns: float, s: int | None = size) -> str:
            return fmt_echo(ns, s) if s else fmt_time(ns)

        line = [label, fmt(base_plain[key])]
        if base_tls:
            line += [fmt(base_tls[key]), f"{base_tls[key] / base_plain[key]:.2f}x"]
        lines.append(line)
    widths = [max(len(r[k]) for r in lines) for k in range(len(cols))]
    for r in lines:
        print("  " + "  ".join(s.ljust(w) for s, w in zip(r, widths, strict=True)).rstrip())


def finish(t_start: float, failed: bool, quick: bool) -> int:
    """Prints the total time and the load average, and whether something failed; the exit
    status (1 only for a failure in ``--quick`` mode, the CI smoke test)."""
    print(f"\ntotal time {time.monotonic() - t_start:.1f} s; load average at end: {loadavg()}")
    if failed:
        print("something FAILED (see above)" + ("" if quick else "; exit status 0 (not --quick)"))
    return 1 if failed and quick else 0


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="parnet core benchmark against raw loopback TCP/TLS")
    ap.add_argument(
        "--tls", action="store_true", help="also measure TLS baselines and a parnet TLS run"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions (CI smoke test): exits 1 if anything failed",
    )
    ap.add_argument("--no-gap", action="store_true", help="skip the table of raw variants")
    ap.add_argument(
        "--gap-only",
        action="store_true",
        help="only the table of raw variants, with 4x the repetitions (no servers)",
    )
    ap.add_argument("--raw-child", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--raw-tls", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw-alloc", default="numpy", help=argparse.SUPPRESS)
    ap.add_argument("--raw-chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--raw-sockbuf", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--raw-nbsend", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.raw_child is not None:
        return raw_child_main(
            a.raw_child, a.raw_tls, RawOpts(a.raw_alloc, a.raw_chunk, a.raw_sockbuf, a.raw_nbsend)
        )

    reps = QUICK if a.quick else FULL
    if a.gap_only:
        reps = Reps(**{k: v * 4 if isinstance(v, int) else v for k, v in vars(reps).items()})
    t_start = time.monotonic()
    print(
        f"parnet core benchmark{' (quick)' if a.quick else ''}, commit {git_state()}: {environment()}"
    )
    print(
        f"repetitions: round trips {reps.rtt} (after {reps.rtt_warm} warm-up), echo 8 MB {reps.echo8}, "
        f"80 MB {reps.echo80} (after {reps.warm_bulk} warm-up), pconnect {reps.connects}; figures are medians"
    )
    print(
        f"load average at start: {loadavg()} (other work on the machine skews the absolute figures)"
    )

    home = tempfile.mkdtemp(prefix="parnet-bench-")
    # servers and client read PARNET_HOME; pid files and default logs go under XDG_RUNTIME_DIR
    os.environ["PARNET_HOME"] = home
    os.environ["XDG_RUNTIME_DIR"] = home
    failed = False
    try:
        if a.gap_only:
            gap = run_gap(reps, False, home) + (run_gap(reps, True, home) if a.tls else [])
            print_table(
                "Raw echo variants, interleaved (ratio: to the baseline's memory and sockets; "
                "per iteration of this process/the echo peer)",
                gap,
                ("variant", "echo", "baseline"),
            )
            return 1 if a.quick and any(r.failed for r in gap) else 0
        rows, base_plain = run_suite(reps, False, True, home)
        gap = [] if a.no_gap else run_gap(reps, False, home)
        base_tls: dict[str, float] | None = None
        tls_note = ""
        if a.tls:
            tls_ok = True
            try:
                from parnet import parallel_generate_srp_data

                parallel_generate_srp_data(
                    "bench", password="bench-password-123", directory=os.path.join(home, "srp")
                )
            except Exception as e:  # noqa: BLE001
                tls_ok = False
                tls_note = f"TLS: not available ({type(e).__name__}: {e})"
            tls_rows, base_tls = run_suite(reps, True, tls_ok, home)
            rows += tls_rows
            if not a.no_gap and not a.quick:
                gap += run_gap(reps, True, home)
        print_raw(base_plain, base_tls)
        print_table(
            "parnet (2 servers on 127.0.0.2/127.0.0.3; baseline: the raw figure of the same kind, "
            "measured interleaved with it)",
            rows,
        )
        if gap:
            print_table(
                "Raw echo variants, interleaved (ratio: to the baseline's memory and sockets; "
                "per iteration of this process/the echo peer)",
                gap,
                ("variant", "echo", "baseline"),
            )
        if tls_note:
            print(f"\n{tls_note}")
        failed = bool(tls_note) or any(r.failed for r in rows + gap)
    except Exception:  # noqa: BLE001 - a benchmark reports (and in --quick mode fails below)
        traceback.print_exc()
        failed = True
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return finish(t_start, failed, a.quick)


if __name__ == "__main__":
    sys.exit(main())
