"""parnet between hosts in network namespaces (veth links), beside a raw socket pair between the
same two namespaces in the same run.

Run as root from the repository root::

    .venv/bin/python bench/bench_hosts.py [--tls] [--quick]

It builds the namespace bed of the tests (``tests/netbed.py``: a client namespace and hosts h1,
h2 on a bridge, each host with its own user and sshd), starts the servers with ``parnet up``
(``--no-tls``; with ``--tls`` a second run with TLS + SRP and keys copied by ``--copy-keys``),
and runs, in the client namespace as the client's user:

* W1 small round trip, W2 echo of 8 MB and 80 MB (client <-> h1), W3 80 MB client -> h1 -> h2 ->
  client, each interleaved with the raw peer of ``bench_core`` (pickle 5, ``recv_into`` a
  preallocated buffer) running in h1's namespace as h1's user: the limit of these links;
* W2 again under a ``tc tbf`` limit of 1 Gbit/s on both ends of the client <-> h1 path, against
  the raw echo under the same limit and against the link rate.

Prints tables; asserts nothing; exits 0 (a failure is printed), or 1 with ``--quick`` (CI smoke
test) when something failed. Without root or the tools of the bed it says why and exits 0. Everything it made (namespaces,
users, processes) is removed at the end. See bench/README.md, "Between hosts".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import numpy as np  # noqa: E402

import bench_core as bc  # noqa: E402

TBF_RATE = "1gbit"
LINK_BYTES_PER_S = 125e6  # 1 Gbit/s


# -- in the host namespace: the raw echo peer ----------------------------------------------------
def raw_child_main(addr: str, port: int, use_tls: bool) -> int:
    """``bench_core``'s echo peer, connecting to ``addr:port`` (the client namespace)."""
    sock = socket.create_connection((addr, port), timeout=30)
    sock.settimeout(None)
    bc._tune(sock, bc.RawOpts())
    if use_tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock)
    bc.echo_loop(sock, bc.RawOpts())
    sock.close()
    return 0


class NsRawPeer(bc.RawPeer):
    """The raw baseline over the veth links: the peer is started in the host's namespace by the
    parent (root) once this process has said where it listens."""

    def __init__(self, addr: str, use_tls: bool, certdir: str) -> None:
        ls = socket.socket()
        ls.bind((addr, 0))
        ls.listen(1)
        print(f"RAWPORT {ls.getsockname()[1]} {int(use_tls)}", flush=True)
        ls.settimeout(60)
        try:
            sock, _ = ls.accept()
        finally:
            ls.close()
        sock.settimeout(None)
        self.opts = bc.RawOpts()
        bc._tune(sock, self.opts)
        if use_tls:
            os.makedirs(certdir, mode=0o700, exist_ok=True)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(*bc.make_cert(certdir))
            sock = ctx.wrap_socket(sock, server_side=True)
        self.sock = sock
        self.conn = bc.RawConn(sock, self.opts)
        self.back = bc.RawBuffers(self.opts.alloc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(bc.HDR.pack(bc.K_QUIT, 0, 0))
        self.sock.close()


# -- in the client namespace: the workloads --------------------------------------------------
def client_main(addr: str, use_tls: bool, quick: bool, only_w2: bool, label: str) -> int:
    """Runs the workloads against h1/h2 beside the raw peer; prints one table."""
    from parnet import pconnect, precv, psend, reval, sclose

    reps = bc.QUICK if quick else bc.FULL
    tag = (" [tls]" if use_tls else "") + label
    rows: list[bc.Row] = []
    raw = NsRawPeer(addr, use_tls, tempfile.mkdtemp(prefix="parnet-bench-"))
    c = pconnect(["h1", "h2"], use_tls=use_tls)
    try:

        def run(name: str, raw_fn, par_fn, n: int, warm: int, block: int) -> tuple[float, float]:
            s, _ = bc.interleaved({"raw": raw_fn, "parnet": par_fn}, n, warm, block)
            return bc.median_ns(s["raw"]), bc.median_ns(s["parnet"])

        if not only_w2:

            def w1() -> int:
                t0 = time.perf_counter_ns()
                reval(bc.SMALL_MSG, c[1])
                precv(c[1])
                return time.perf_counter_ns() - t0

            name = f"W1 round trip{tag}"
            try:
                b, p = run(name, raw.roundtrip, w1, reps.rtt, reps.rtt_warm, 100)
                rows.append(bc.ratio_row(name, p, b, 1.3))
            except Exception as e:  # noqa: BLE001
                rows.append(bc.failed_row(name, e))
        for size_label, size in bc.SIZES.items():
            a = np.random.default_rng(1).random(size // 8)
            raw.echo(a, check=True)
            n = reps.echo8 if size < 50 * bc.MB else reps.echo80
            name = f"W2 echo {size_label}{tag}"
            try:
                reval(
                    f"for _ in range({n + reps.warm_bulk + 1}):\n    psend(precv(sockets[0]), sockets[0])",
                    c[1],
                )
                psend(a, c[1])
                if not np.array_equal(a, precv(c[1], timeout=300)):
                    raise RuntimeError("echo returned different data")

                def w2(a: np.ndarray = a) -> int:
                    t0 = time.perf_counter_ns()
                    psend(a, c[1])
                    precv(c[1], timeout=300)
                    return time.perf_counter_ns() - t0

                b, p = run(name, lambda a=a: raw.echo(a), w2, n, reps.warm_bulk, 1)
                row = bc.ratio_row(name, p, b, 1.2 if size < 50 * bc.MB else 1.1, size=size)
                if only_w2:
                    link = 2 * size / LINK_BYTES_PER_S * 1e9
                    row.note = (
                        f"at the link rate ({TBF_RATE}/s each way) the echo takes {link / 1e6:.0f} ms: "
                        f"parnet {link / p:.0%} of it, raw {link / b:.0%}"
                    )
                rows.append(row)
            except Exception as e:  # noqa: BLE001
                rows.append(bc.failed_row(name, e))
        if not only_w2:
            size = bc.SIZES["80 MB"]
            a3 = np.random.default_rng(2).random(size // 8)
            name = f"W3 80 MB c->h1->h2->c{tag}"
            try:
                k = reps.echo80 + reps.warm_bulk + 1
                reval(f"for _ in range({k}):\n    psend(precv(sockets[0]), sockets[2])", c[1])
                reval(f"for _ in range({k}):\n    psend(precv(sockets[1]), sockets[0])", c[2])
                psend(a3, c[1])
                if not np.array_equal(a3, precv(c[2], timeout=300)):
                    raise RuntimeError("W3 returned different data")

                def w3() -> int:
                    t0 = time.perf_counter_ns()
                    psend(a3, c[1])
                    precv(c[2], timeout=300)
                    return time.perf_counter_ns() - t0

                b, p = run(name, lambda: raw.echo(a3), w3, reps.echo80, reps.warm_bulk, 1)
                rows.append(bc.ratio_row(name, p, b, 1.6, size=size))
            except Exception as e:  # noqa: BLE001
                rows.append(bc.failed_row(name, e))
    finally:
        with contextlib.suppress(Exception):
            sclose(c)
        raw.close()
    raw_label = "raw TLS 1.3" if use_tls else "raw TCP"
    bc.print_table(
        f"client ns -> h1{' -> h2' if not only_w2 else ''} over veth + bridge{label} "
        f"(baseline: {raw_label} client ns <-> h1 ns, interleaved)",
        rows,
    )
    return 1 if quick and any(r.failed for r in rows) else 0


# -- as root: the bed and the runs -----------------------------------------------------------
def run_client(
    bed, files: str, use_tls: bool, quick: bool, only_w2: bool = False, label: str = ""
) -> int:
    """One client run: relays its output, starts the raw peer in h1 when asked. Returns the
    client's exit status."""
    h1 = bed.host("h1")
    args = [
        bed.python,
        f"{files}/bench_hosts.py",
        "--client",
        bed.client.addr,
        *(["--tls"] if use_tls else []),
        *(["--quick"] if quick else []),
        *(["--only-w2"] if only_w2 else []),
        "--label",
        label,
    ]
    p = bed.client.popen(args, stdout=subprocess.PIPE)
    peer = None
    try:
        for line in p.stdout:
            if line.startswith("RAWPORT "):
                _, port, tls = line.split()
                # a session of its own, as the servers (started by sshd) have: see bench_core.RawOpts
                peer = h1.popen(
                    [
                        bed.python,
                        f"{files}/bench_hosts.py",
                        "--raw-child",
                        f"{bed.client.addr}:{port}",
                        *(["--raw-tls"] if tls == "1" else []),
                    ],
                    start_new_session=True,
                )
                continue
            print(line, end="", flush=True)
        return p.wait(600)
    finally:
        for proc in (p, peer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="parnet between namespace hosts over veth, against raw sockets"
    )
    ap.add_argument("--tls", action="store_true", help="also a run with TLS (servers and raw peer)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--client", metavar="ADDR", help=argparse.SUPPRESS)
    ap.add_argument("--only-w2", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="", help=argparse.SUPPRESS)
    ap.add_argument("--raw-child", metavar="ADDR:PORT", help=argparse.SUPPRESS)
    ap.add_argument("--raw-tls", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.raw_child:
        addr, port = a.raw_child.rsplit(":", 1)
        return raw_child_main(addr, int(port), a.raw_tls)
    if a.client:
        return client_main(a.client, a.tls, a.quick, a.only_w2, a.label)

    import netbed

    why = netbed.unavailable()
    if why:
        print(f"bench_hosts: {why}")
        return 0
    t_start = time.monotonic()
    print(
        f"parnet between namespace hosts{' (quick)' if a.quick else ''}, commit {bc.git_state()}: "
        f"{bc.environment()}"
    )
    print(f"load average at start: {bc.loadavg()}")
    failed = False
    bed = netbed.Bed(hosts=("h1", "h2"))
    try:
        files = str(bed.dir / "bench")
        os.makedirs(files)
        for f in ("bench_core.py", "bench_hosts.py"):
            shutil.copy(os.path.join(HERE, f), files)
        subprocess.run(["chmod", "-R", "a+rX", files], check=True)
        for use_tls in [False, True] if a.tls else [False]:
            opts = ["--copy-keys"] if use_tls else ["--no-tls"]
            r = bed.client.parnet("up", "h1", "h2", *opts)
            print(r.stdout, end="")
            if r.returncode != 0:
                print(r.stderr)
                failed = True
                continue
            failed |= run_client(bed, files, use_tls, a.quick) != 0
            for n in (bed.client, bed.host("h1")):
                n.run(
                    [
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        "eth0",
                        "root",
                        "tbf",
                        "rate",
                        TBF_RATE,
                        "burst",
                        "256kb",
                        "latency",
                        "100ms",
                    ],
                    as_root=True,
                    check=True,
                )
            try:
                failed |= (
                    run_client(bed, files, use_tls, a.quick, only_w2=True, label=f" tbf {TBF_RATE}")
                    != 0
                )
            finally:
                for n in (bed.client, bed.host("h1")):
                    n.run(["tc", "qdisc", "del", "dev", "eth0", "root"], as_root=True)
            bed.client.parnet("down", "h1", "h2")
    except Exception:  # noqa: BLE001 - a benchmark reports (and in --quick mode fails below)
        traceback.print_exc()
        failed = True
    finally:
        bed.close()
    print(f"\ntotal time {time.monotonic() - t_start:.1f} s; load average at end: {bc.loadavg()}")
    if failed:
        print("something FAILED (see above)")
    return 1 if failed and a.quick else 0


if __name__ == "__main__":
    sys.exit(main())
