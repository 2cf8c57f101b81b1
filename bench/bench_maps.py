"""Map benchmark (issue 4): W4a tiny calls, W4b slow calls against their ideal time.

Usage: .venv/bin/python bench/bench_maps.py [--tls] [--quick]

W4a  netcellfun of 2000 trivial calls (x * 2) over two servers: default options and
     chunk_size=100; median of repeated maps on a warm network. Printed beside the same
     calls done serially in this process and one raw loopback round trip (the limits).
W4b  16 calls of a 0.5 s sleep on one server with nlocaljobs 2 (ideal 4.0 s), and the
     reference doc's Example, 30 calls of a one-second function on two servers of two
     cores each (ideal 8 s). The overhead over the ideal is the figure.
Targets: W4a <= 5 ms with default options; W4b overhead <= 50 ms. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import RawPeer, bench_servers, loadavg  # noqa: E402


def _double(x: int) -> int:
    return x * 2


def _half_second(x: int) -> int:
    time.sleep(0.5)
    return x


def _one_second(x: int) -> int:
    time.sleep(1)
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", action="store_true", help="servers with TLS + SRP (default: without)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip the 8 s Example")
    a = ap.parse_args(argv)
    from parnet import netcellfun, network_set, pconnect, sclose

    print(f"parnet map benchmark{' (quick)' if a.quick else ''}, TLS {'on' if a.tls else 'off'}; "
          f"load average {loadavg()}")
    with bench_servers(a.tls, "parnet-bench-maps-") as hosts:
        c = pconnect(hosts, use_tls=a.tls)
        reps = 20 if a.quick else 100
        xs = range(2000)

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        serial = statistics.median(timed(lambda: [_double(x) for x in xs]) for _ in range(reps))
        raw = RawPeer(False, None)
        try:
            rtt = statistics.median(raw.roundtrip() for _ in range(2000)) / 1e9
        finally:
            raw.close()
        rows = []
        for label, kw in (("W4a 2000 trivial calls, default options", {}),
                          ("W4a 2000 trivial calls, chunk_size=100", {"chunk_size": 100})):
            t_warm = time.monotonic() + 2.0  # warm network: the first map starts each
            while time.monotonic() < t_warm:  # server's local pool in the background
                netcellfun(c, _double, xs, **kw)
            t = statistics.median(timed(lambda kw=kw: netcellfun(c, _double, xs, **kw)) for _ in range(reps))
            rows.append((label, f"{t * 1e3:.2f} ms", f"serial here {serial * 1e3:.2f} ms, "
                         f"1 raw round trip {rtt * 1e6:.1f} us", "<= 5 ms" if not kw else "-",
                         ("ok" if t <= 0.005 else "over") if not kw else "-"))
        network_set(c, "nlocaljobs", 2)
        netcellfun(c[1], _half_second, range(4))  # warm the pool of server 1
        t = timed(lambda: netcellfun(c[1], _half_second, range(16)))
        rows.append(("W4b 16 x 0.5 s, 1 server, nlocaljobs 2", f"{t:.3f} s", "ideal 4.000 s",
                     "overhead <= 50 ms", f"{(t - 4.0) * 1e3:+.0f} ms " + ("ok" if t - 4.0 <= 0.05 else "over")))
        if not a.quick:
            network_set(c, "nlocaljobs", 0)
            netcellfun(c, _one_second, range(4))  # warm both pools
            t = timed(lambda: netcellfun(c, _one_second, range(1, 31)))
            rows.append(("reference Example: 30 x 1 s, 2 servers x 2 cores", f"{t:.3f} s", "ideal 8.000 s",
                         "overhead <= 50 ms", f"{(t - 8.0) * 1e3:+.0f} ms " + ("ok" if t - 8.0 <= 0.05 else "over")))
        sclose(c)
        w = max(len(r[0]) for r in rows)
        print(f"\n{'workload':{w}}  {'parnet':>10}  {'limit / ideal':40}  {'target':18}  result")
        for r in rows:
            print(f"{r[0]:{w}}  {r[1]:>10}  {r[2]:40}  {r[3]:18}  {r[4]}")
    print(f"\nload average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
