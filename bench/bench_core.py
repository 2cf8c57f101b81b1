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
import contextlib
import gc
import os
import pickle
import platform
import random
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


FULL = Reps(rtt=3000, rtt_warm=300, echo8=30, echo80=7, warm_bulk=2, connects=15)
QUICK = Reps(rtt=400, rtt_warm=50, echo8=6, echo80=3, warm_bulk=1, connects=4)


# --------------------------------------------------------------------------------------
# Raw baseline: framing shared by the parent (client) and the child (echo peer)
# --------------------------------------------------------------------------------------
# header: kind u8 (0 message, 1 quit), body length u32, out-of-band buffer length u64
HDR = struct.Struct("!BIQ")
K_MSG, K_QUIT = 0, 1
_SCRATCH = 256 * 1024


class RawConn:
    """A blocking socket with a read-ahead scratch buffer: a small frame costs one ``recv``,
    a large out-of-band buffer is read straight into the caller's preallocated memory."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
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
        while off < target.nbytes:
            got = self.sock.recv_into(target[off:])
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
        if bufs:
            self.sock.sendall(bufs[0])

    def recv_msg(self, into: memoryview | None) -> tuple[int, object]:
        """The next frame: (kind, value); a buffer is read into ``into`` (preallocated)."""
        kind, blen, buflen = HDR.unpack(self.read_exact(HDR.size))
        if kind == K_QUIT:
            return kind, None
        body = self.read_exact(blen)
        bufs = []
        if buflen:
            assert into is not None and into.nbytes >= buflen, "preallocated buffer too small"
            target = into[:buflen]
            self.read_into(target)
            bufs.append(target)
        return kind, pickle.loads(body, buffers=bufs)


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def raw_child_main(port: int, use_tls: bool) -> int:
    """The echo peer: connects to the parent, answers every message until told to quit.

    A str (the small message) is answered with the int 1, like W1's ``psend(1, ...)``;
    anything else (an array, received into the preallocated buffer) is sent back as is.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    _nodelay(sock)
    if use_tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock)
    conn = RawConn(sock)
    buf = memoryview(bytearray(max(SIZES.values()) + 4096))
    while True:
        kind, val = conn.recv_msg(buf)
        if kind == K_QUIT:
            break
        conn.send_msg(1 if isinstance(val, str) else val)
    sock.close()
    return 0


def make_cert(directory: str) -> tuple[str, str]:
    """A self-signed EC P-256 certificate and key (PEM files) in ``directory``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
    cpath, kpath = os.path.join(directory, "bench.crt"), os.path.join(directory, "bench.key")
    with open(cpath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kpath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cpath, kpath


def median_ns(samples: list[int]) -> float:
    return float(statistics.median(samples))


class RawPeer:
    """The raw baseline: a child process (the echo peer) connected to this one, plain or TLS."""

    def __init__(self, use_tls: bool, certdir: str | None) -> None:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        self.child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-child", str(port),
                                       *(["--raw-tls"] if use_tls else [])])
        try:
            ls.settimeout(30)
            sock, _ = ls.accept()
            sock.settimeout(None)
            _nodelay(sock)
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
        self.conn = RawConn(sock)
        self.back = memoryview(bytearray(max(SIZES.values()) + 4096))

    def roundtrip(self) -> int:
        """One small round trip (ns)."""
        t0 = time.perf_counter_ns()
        self.conn.send_msg(SMALL_MSG)
        self.conn.recv_msg(None)
        return time.perf_counter_ns() - t0

    def echo(self, a: np.ndarray, check: bool = False) -> int:
        """One echo of ``a`` (ns), received into the preallocated buffer."""
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


def interleaved(fns: dict[str, Callable[[], int]], n: int, warm: int, block: int) -> dict[str, list[int]]:
    """Runs each ``fn`` (one timed iteration, returns ns) ``warm`` times, then ``n`` timed times,
    alternating between them in blocks of ``block`` (order rotated each round), so that every
    figure sees the same machine conditions. Returns the samples per name."""
    names = list(fns)
    for name in names:
        for _ in range(warm):
            fns[name]()
    out: dict[str, list[int]] = {name: [] for name in names}
    done = 0
    rnd = 0
    while done < n:
        k = min(block, n - done)
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            fn = fns[name]
            gc.collect()
            for _ in range(k):
                out[name].append(fn())
        done += k
        rnd += 1
    return out


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
def bench_servers(use_tls: bool, prefix: str, addrs: Sequence[str] = SERVER_ADDRS) -> Any:
    """Servers on ``addrs`` with a private ``PARNET_HOME`` (a bench user when TLS), stopped
    by pid on exit; yields their ``host:port`` names for ``pconnect``."""
    home = tempfile.mkdtemp(prefix=prefix)
    os.environ["PARNET_HOME"] = home
    os.environ["XDG_RUNTIME_DIR"] = home
    from parnet.server.launch import start_background, stop_pid

    if use_tls:
        from parnet.auth.keyfile import parallel_generate_srp_data

        parallel_generate_srp_data("bench", password="bench-password-123")
    pids: list[int] = []
    try:
        port = pick_ports(addrs)
        for addr in addrs:
            pids.append(start_background(use_tls=use_tls, cmd_port=port, data_port=port + 1, bind=addr,
                                         allow_root=True))
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
    """``VmRSS`` from /proc/<pid>/status, or ``Pss`` from smaps_rollup, in kB."""
    path = f"/proc/{pid}/smaps_rollup" if key == "Pss" else f"/proc/{pid}/status"
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
@dataclass
class Row:
    name: str
    figure: str
    baseline: str = "-"
    ratio: float | None = None
    target: str = "-"
    ok: bool | None = None
    note: str = ""


def fmt_time(ns: float) -> str:
    if ns < 1e6:
        return f"{ns / 1e3:.1f} us"
    return f"{ns / 1e6:.2f} ms"


def fmt_echo(ns: float, size: int) -> str:
    """Echo time and throughput (payload bytes moved both ways per second)."""
    return f"{ns / 1e6:.2f} ms ({2 * size / MB / (ns / 1e9):.0f} MB/s)"


def ratio_row(name: str, ns: float, base_ns: float | None, limit: float, *, size: int | None = None) -> Row:
    fig = fmt_echo(ns, size) if size else fmt_time(ns)
    if base_ns is None:
        return Row(name, fig, "n/a", None, f"<= {limit:g}x", None)
    base = fmt_echo(base_ns, size) if size else fmt_time(base_ns)
    r = ns / base_ns
    return Row(name, fig, base, r, f"<= {limit:g}x", r <= limit)


def failed_row(name: str, e: BaseException) -> Row:
    return Row(name, "FAILED", note=f"{type(e).__name__}: {str(e)[:150]}")


def print_table(title: str, rows: list[Row]) -> None:
    head = ("workload", "parnet", "baseline", "ratio", "target", "")
    cells = [head] + [(r.name, r.figure, r.baseline, "-" if r.ratio is None else f"{r.ratio:.2f}x",
                       r.target, {True: "ok", False: "over", None: ""}[r.ok]) for r in rows]
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
# parnet workloads, each interleaved with its raw baseline
# --------------------------------------------------------------------------------------
def run_suite(reps: Reps, use_tls: bool, with_parnet: bool, home: str) -> tuple[list[Row], dict[str, float]]:
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
    conns = None
    broken: str | None = None
    raw = RawPeer(use_tls, os.path.join(home, "rawcert"))
    try:
        if with_parnet:
            try:
                port = pick_ports()
                hosts = [f"{a}:{port}" for a in SERVER_ADDRS]
                for addr in SERVER_ADDRS:
                    pids.append(start_background(use_tls=use_tls, cmd_port=port, data_port=port + 1, bind=addr,
                                                 allow_root=True,
                                                 log_file=os.path.join(home, f"server-{addr}-{port}.log")))
                conns = pconnect(hosts, use_tls=use_tls)
            except Exception as e:  # noqa: BLE001 - report, still measure the raw baselines
                rows.append(failed_row(f"parnet set-up{tag}", e))
                broken = "no network"
        c = conns

        # idle memory, right after pconnect, before any work
        if c is not None:
            time.sleep(0.2)
            for k, (addr, dpid) in enumerate(zip(SERVER_ADDRS, pids, strict=True), start=1):
                workers = children_of(dpid)
                d_rss = mem_kb(dpid, "VmRSS")
                if len(workers) != 1:
                    rows.append(Row(f"idle worker RSS, server {k}{tag}", "?",
                                    note=f"expected one worker child of daemon {dpid}, found {workers}"))
                else:
                    w_rss = mem_kb(workers[0], "VmRSS") or 0
                    w_pss = mem_kb(workers[0], "Pss")
                    pss = f", PSS {w_pss / 1024:.1f} MB" if w_pss is not None else ""
                    rows.append(Row(f"idle worker RSS, server {k}{tag}", f"{w_rss / 1024:.1f} MB",
                                    target="<= 40 MB", ok=w_rss <= 40 * 1024, note=f"worker pid {workers[0]}{pss}"))
                rows.append(Row(f"daemon RSS, server {k}{tag}", f"{(d_rss or 0) / 1024:.1f} MB",
                                note=f"daemon pid {dpid} ({addr})"))

        def measure(name: str, raw_fn: Callable[[], int], par_fn: Callable[[], int] | None,
                    prepare: Callable[[int], None] | None, n: int, warm: int, block: int) -> tuple[float, float | None]:
            """Medians (raw, parnet); parnet None if not run. ``prepare(count)`` runs first
            (e.g. the server loop for ``count`` iterations)."""
            nonlocal broken
            if par_fn is not None and broken is None:
                try:
                    if prepare is not None:
                        prepare(warm + n)
                    s = interleaved({"raw": raw_fn, "parnet": par_fn}, n, warm, block)
                    return median_ns(s["raw"]), median_ns(s["parnet"])
                except Exception as e:  # noqa: BLE001
                    rows.append(failed_row(name, e))
                    broken = name
            elif par_fn is not None:
                rows.append(Row(name, "skipped", note=f"not run: {broken} failed before"))
            s = interleaved({"raw": raw_fn}, n, warm, block)
            return median_ns(s["raw"]), None

        # W1: small round trip through a reval, against the raw small round trip
        w1 = None
        if c is not None:
            c1 = c[1]

            def w1() -> int:
                t0 = time.perf_counter_ns()
                reval(SMALL_MSG, c1)
                precv(c1)
                return time.perf_counter_ns() - t0

        name = f"W1 reval+psend/precv round trip{tag}"
        base["rtt"], par = measure(name, raw.roundtrip, w1, None, reps.rtt, reps.rtt_warm, 100)
        if par is not None:
            rows.append(ratio_row(name, par, base["rtt"], 1.3))

        # W2: echo client -> server 1 -> client; the server runs a loop of fixed length
        for label, size in SIZES.items():
            a = np.random.default_rng(1).random(size // 8)
            raw.echo(a, check=True)
            n = reps.echo8 if size < 50 * MB else reps.echo80
            w2 = prep2 = None
            if c is not None:

                def prep2(count: int, a: np.ndarray = a) -> None:
                    reval(f"for _ in range({count + 1}):\n    psend(precv(sockets[0]), sockets[0])", c[1])
                    psend(a, c[1])
                    if not np.array_equal(a, precv(c[1], timeout=120)):
                        raise RuntimeError("echo returned different data")

                def w2(a: np.ndarray = a) -> int:
                    t0 = time.perf_counter_ns()
                    psend(a, c[1])
                    precv(c[1], timeout=120)
                    return time.perf_counter_ns() - t0

            name = f"W2 echo {label}{tag}"
            base[label], par = measure(name, lambda a=a: raw.echo(a), w2, prep2, n, reps.warm_bulk, 1)
            if par is not None:
                rows.append(ratio_row(name, par, base[label], 1.2 if size < 50 * MB else 1.1, size=size))

        # W3: 80 MB client -> server 1 -> server 2 -> client, against the raw 80 MB echo
        size = SIZES["80 MB"]
        a3 = np.random.default_rng(2).random(size // 8)
        w3 = prep3 = None
        if c is not None:

            def prep3(count: int) -> None:
                reval(f"for _ in range({count + 1}):\n    psend(precv(sockets[0]), sockets[2])", c[1])
                reval(f"for _ in range({count + 1}):\n    psend(precv(sockets[1]), sockets[0])", c[2])
                psend(a3, c[1])
                if not np.array_equal(a3, precv(c[2], timeout=120)):
                    raise RuntimeError("W3 returned different data")

            def w3() -> int:
                t0 = time.perf_counter_ns()
                psend(a3, c[1])
                precv(c[2], timeout=120)
                return time.perf_counter_ns() - t0

        name = f"W3 80 MB via 2 servers{tag}"
        b80, par = measure(name, lambda: raw.echo(a3), w3, prep3, reps.echo80, reps.warm_bulk, 1)
        if par is not None:
            rows.append(ratio_row(name, par, b80, 1.6, size=size))

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
                rows.append(Row(name, f"{ms:.1f} ms", target="<= 100 ms", ok=ms <= 100,
                                note=f"min {min(samples) / 1e6:.1f} ms, max {max(samples) / 1e6:.1f} ms "
                                     f"over {len(samples)} connects"))
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
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
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
    return (f"python {platform.python_version()}, numpy {np.__version__}, {ssl.OPENSSL_VERSION}, "
            f"{len(os.sched_getaffinity(0))} cores ({cpu}), Linux {platform.release()}")


def print_raw(base_plain: dict[str, float], base_tls: dict[str, float] | None) -> None:
    print("\nRaw baselines (two Python processes, loopback TCP_NODELAY, pickle 5, recv_into preallocated)")
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


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="parnet core benchmark against raw loopback TCP/TLS")
    ap.add_argument("--tls", action="store_true", help="also measure TLS baselines and a parnet TLS run")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke test, < 30 s)")
    ap.add_argument("--raw-child", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--raw-tls", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.raw_child is not None:
        return raw_child_main(a.raw_child, a.raw_tls)

    reps = QUICK if a.quick else FULL
    t_start = time.monotonic()
    print(f"parnet core benchmark{' (quick)' if a.quick else ''}, commit {git_state()}: {environment()}")
    print(f"repetitions: round trips {reps.rtt} (after {reps.rtt_warm} warm-up), echo 8 MB {reps.echo8}, "
          f"80 MB {reps.echo80} (after {reps.warm_bulk} warm-up), pconnect {reps.connects}; figures are medians")
    print(f"load average at start: {loadavg()} (other work on the machine skews the absolute figures)")

    home = tempfile.mkdtemp(prefix="parnet-bench-")
    # servers and client read PARNET_HOME; pid files and default logs go under XDG_RUNTIME_DIR
    os.environ["PARNET_HOME"] = home
    os.environ["XDG_RUNTIME_DIR"] = home
    try:
        rows, base_plain = run_suite(reps, False, True, home)
        base_tls: dict[str, float] | None = None
        tls_note = ""
        if a.tls:
            tls_ok = True
            try:
                from parnet.auth.keyfile import parallel_generate_srp_data

                parallel_generate_srp_data("bench", password="bench-password-123",
                                           directory=os.path.join(home, "srp"))
            except Exception as e:  # noqa: BLE001
                tls_ok = False
                tls_note = f"TLS: not available yet ({type(e).__name__}: {e})"
            tls_rows, base_tls = run_suite(reps, True, tls_ok, home)
            rows += tls_rows
        print_raw(base_plain, base_tls)
        print_table("parnet (2 servers on 127.0.0.2/127.0.0.3; baseline: the raw figure of the same kind, "
                    "measured interleaved with it)", rows)
        if tls_note:
            print(f"\n{tls_note}")
    except Exception:  # noqa: BLE001 - a benchmark reports, it does not fail
        traceback.print_exc()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"\ntotal time {time.monotonic() - t_start:.1f} s; load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
