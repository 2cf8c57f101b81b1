"""Map benchmark: W4a tiny calls, W4b slow calls, each with its ratio to the ideal time.

Usage: .venv/bin/python bench/bench_maps.py [--tls] [--quick]

W4a  netcellfun of 2000 trivial calls (x * 2) over two servers: default options and
     chunk_size=100, on a warm network. Ideal: one raw loopback round trip (plain or TLS as
     the servers; each sample the median of 20 in a row) plus the calls done serially in
     this process, halved (two servers). Maps, raw round trips and serial runs are
     interleaved in blocks; medians.
W4b  16 calls of a 0.5 s sleep on one server with nlocaljobs 2 (ideal 4.0 s), and the
     reference doc's Example, 30 calls of a one-second function on two servers of two
     cores each (ideal 8 s). Each run opens a fresh network: its first map is the *cold*
     figure (it starts the servers' local pools, as a user's first map does), a second map
     on the same network the *warm* one. Medians of several runs.

``--quick`` (CI smoke test) shortens the calls of W4b tenfold (0.05 s and 0.1 s) and takes
fewer runs; it exits 1 if anything failed. Nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import (  # noqa: E402
    NOT_AT_LIMIT,
    RawPeer,
    Row,
    bench_servers,
    failed_row,
    finish,
    interleaved,
    loadavg,
    print_table,
    timer_ns,
)


def _double(x: int) -> int:
    return x * 2


def _sleep(x: float) -> float:
    time.sleep(x)
    return x


def _timed_s(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ideal_row(
    name: str, t: float, ideal: float, target_s: float | None, target: str, note: str
) -> Row:
    """A row with its ratio to the ideal time; ``target_s``: the largest time that is ok."""
    r = t / ideal

    def fmt(s: float) -> str:
        return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"

    v = NOT_AT_LIMIT if r < 1.0 else "" if target_s is None else "ok" if t <= target_s else "over"
    return Row(name, fmt(t), f"ideal {fmt(ideal)}", r, target, v, note)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", action="store_true", help="servers with TLS + SRP (default: without)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="calls of W4b 10x shorter, fewer runs (CI smoke test): exits 1 if anything failed",
    )
    a = ap.parse_args(argv)
    from parnet import netcellfun, network_set, pconnect, sclose

    scale = 0.1 if a.quick else 1.0
    runs = 2 if a.quick else 3
    reps = 20 if a.quick else 100
    rows: list[Row] = []
    failed = False
    t_start = time.monotonic()
    print(
        f"parnet map benchmark{' (quick)' if a.quick else ''}, TLS {'on' if a.tls else 'off'}; "
        f"load average {loadavg()}"
    )
    try:
        with bench_servers(a.tls, "parnet-bench-maps-") as hosts:
            home = os.environ["PARNET_HOME"]  # bench_servers' private directory
            # W4a: warm network, interleaved with raw round trips and serial runs
            xs = range(2000)
            c = pconnect(hosts, use_tls=a.tls)
            raw = RawPeer(a.tls, os.path.join(home, "rawcert"))

            def raw_rtt() -> int:
                """The median of 20 raw round trips in a row: one wake-up of a descheduled peer
                on a busy machine does not make the figure."""
                return int(statistics.median(raw.roundtrip() for _ in range(20)))

            try:
                for label, kw in (
                    ("W4a 2000 trivial calls, default options", {}),
                    ("W4a 2000 trivial calls, chunk_size=100", {"chunk_size": 100}),
                ):
                    name = label + (" [tls]" if a.tls else "")
                    try:
                        t_warm = time.monotonic() + (
                            0.5 if a.quick else 2.0
                        )  # the first map starts
                        while (
                            time.monotonic() < t_warm
                        ):  # each server's local pool in the background
                            netcellfun(c, _double, xs, **kw)
                        s, _ = interleaved(
                            {
                                "map": timer_ns(lambda kw=kw: netcellfun(c, _double, xs, **kw)),
                                "raw": raw_rtt,
                                "serial": timer_ns(lambda: [_double(x) for x in xs]),
                            },
                            reps,
                            2,
                            5,
                        )
                        t, rtt, ser = (
                            statistics.median(s[k]) / 1e9 for k in ("map", "raw", "serial")
                        )
                        rows.append(
                            ideal_row(
                                name,
                                t,
                                rtt + ser / 2,
                                0.003 if not kw else None,
                                "<= 3 ms" if not kw else "-",
                                f"ideal = 1 raw round trip {rtt * 1e6:.1f} us + serial {ser * 1e3:.3f} ms"
                                f" / 2 servers; best map {min(s['map']) / 1e6:.2f} ms",
                            )
                        )
                    except Exception as e:  # noqa: BLE001
                        rows.append(failed_row(name, e))
            finally:
                raw.close()
                sclose(c)

            # W4b and the Example: cold (first map on a fresh network) and warm (the second)
            for label, servers, nlocal, n, dur, ideal in (
                (
                    "W4b 16 x {d} s, 1 server, nlocaljobs 2",
                    [1],
                    2,
                    16,
                    0.5 * scale,
                    8 * 0.5 * scale,
                ),
                (
                    "reference Example: 30 x {d} s, 2 servers x 2 cores",
                    [1, 2],
                    0,
                    30,
                    1.0 * scale,
                    8 * 1.0 * scale,
                ),
            ):
                name = label.format(d=f"{dur:g}")
                tag = " [tls]" if a.tls else ""
                try:
                    cold: list[float] = []
                    warm: list[float] = []
                    for _ in range(runs):
                        with pconnect(hosts, use_tls=a.tls) as net:
                            if nlocal:
                                network_set(net, "nlocaljobs", nlocal)
                            target = net[servers[0]] if len(servers) == 1 else net
                            vals = [dur] * n
                            for out in (cold, warm):
                                t = _timed_s(
                                    lambda target=target, vals=vals: netcellfun(
                                        target, _sleep, vals
                                    )
                                )
                                out.append(t)
                    for kind, ts in (("cold", cold), ("warm", warm)):
                        t = statistics.median(ts)
                        rows.append(
                            ideal_row(
                                f"{name}, {kind}{tag}",
                                t,
                                ideal,
                                ideal + 0.05,
                                "overhead <= 50 ms",
                                f"overhead {(t - ideal) * 1e3:+.0f} ms; runs "
                                + ", ".join(f"{x:.3f}" for x in ts)
                                + " s",
                            )
                        )
                except Exception as e:  # noqa: BLE001
                    rows.append(failed_row(name + tag, e))
            print_table(
                "netcellfun on 2 servers on 127.0.0.2/127.0.0.3 (medians; ratio: to the ideal time)",
                rows,
            )
        failed = any(r.failed for r in rows)
    except Exception:  # noqa: BLE001 - a benchmark reports (and in --quick mode fails below)
        traceback.print_exc()
        failed = True
    return finish(t_start, failed, a.quick)


if __name__ == "__main__":
    sys.exit(main())
