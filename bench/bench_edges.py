"""Edge benchmark (issue 13): many servers, fresh networks, a server's own echo loop.

Usage: .venv/bin/python bench/bench_edges.py [--tls] [--quick]

Sixteen servers on 127.0.0.2-17 (one port pair). Each row prints beside its reference,
measured in the same run:

E1  the first ``netcellfun`` of 5000 trivial calls on a fresh 16-server network; reference:
    the first such map on a fresh 2-server network (the first two of the sixteen). Fresh
    networks of 16 and 2 alternate; medians. Target <= 150 ms.
E2  a steady map of 5000 trivial calls on 16 servers; reference: the same on 2 servers (two
    open networks, maps interleaved in blocks; medians; CPU ratio from schedstat). Target
    <= 3x.
E3  ``pconnect`` to 2 servers right after a 16-server network that ran a map closed;
    reference: ``pconnect`` to 2 servers after a 2-server network closed. Target <= 0.3 s.
W1b a small value echoed through a server's ``precv``/``psend`` loop; reference: W1
    (``reval`` + ``precv``), interleaved on one network. Target <= 1.3x.

``--quick`` (CI smoke test: under about 30 s) takes few runs; it exits 1 if anything
failed. Nothing is asserted about speed. The load average is printed at start and end: on a
shared machine, compare the CPU ratios before the wall-clock ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import (  # noqa: E402
    SMALL_MSG,
    Row,
    bench_servers,
    children_of,
    failed_row,
    finish,
    interleaved,
    loadavg,
    print_table,
    ratio_row,
    timer_ns,
)

ADDRS16 = tuple(f"127.0.0.{k}" for k in range(2, 18))
N_CALLS = 5000


def _double(x: int) -> int:
    return x * 2


def _fmt(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.3f} s"


def _abs_row(
    name: str, t: float, ref: float, ref_label: str, limit_s: float, runs: list[float]
) -> Row:
    ok = "ok" if t <= limit_s else "over"
    return Row(
        name,
        _fmt(t),
        f"{ref_label} {_fmt(ref)}",
        t / ref,
        f"<= {_fmt(limit_s)}",
        ok,
        "runs " + ", ".join(f"{x * 1e3:.0f}" for x in runs) + " ms",
    )


def fresh_rows(hosts16: list[str], tls: bool, runs: int) -> list[Row]:
    """E1 and E3: fresh networks of 16 and 2 servers, alternating."""
    from parnet import netcellfun, pconnect, sclose

    xs = range(N_CALLS)
    first = {16: [], 2: []}  # type: dict[int, list[float]]
    after = {16: [], 2: []}  # type: dict[int, list[float]]  # connect-2 time after a network of k closed
    for _ in range(runs):
        for k in (16, 2):
            c = pconnect(hosts16[:k], use_tls=tls)
            t = time.perf_counter()
            netcellfun(c, _double, xs)
            first[k].append(time.perf_counter() - t)
            sclose(c)
            t = time.perf_counter()
            c2 = pconnect(hosts16[:2], use_tls=tls)
            after[k].append(time.perf_counter() - t)
            sclose(c2)
    tag = " [tls]" if tls else ""
    f16, f2 = statistics.median(first[16]), statistics.median(first[2])
    a16, a2 = statistics.median(after[16]), statistics.median(after[2])
    return [
        _abs_row(
            f"E1 first netcellfun, {N_CALLS} trivial calls, fresh 16-server network{tag}",
            f16,
            f2,
            "2 servers",
            0.150,
            first[16],
        ),
        _abs_row(
            f"E3 pconnect 2 servers right after a 16-server network closed{tag}",
            a16,
            a2,
            "after 2",
            0.300,
            after[16],
        ),
    ]


def steady_row(hosts16: list[str], tls: bool, reps: int, pids16: list[int]) -> Row:
    """E2: warm networks of 16 and 2 servers, maps interleaved."""
    from parnet import netcellfun, pconnect, sclose

    xs = range(N_CALLS)
    c16 = pconnect(hosts16, use_tls=tls)
    c2 = pconnect(hosts16[:2], use_tls=tls)
    try:
        workers = [w for d in pids16 for w in children_of(d)]  # both networks' workers
        s, use = interleaved(
            {
                "16": timer_ns(lambda: netcellfun(c16, _double, xs)),
                "2": timer_ns(lambda: netcellfun(c2, _double, xs)),
            },
            reps,
            3,
            5,
            {"16": workers, "2": workers},
        )
    finally:
        sclose(c16)
        sclose(c2)
    name = (
        f"E2 steady map, {N_CALLS} trivial calls, 16 servers / 2 servers{' [tls]' if tls else ''}"
    )
    return ratio_row(
        name,
        statistics.median(s["16"]),
        statistics.median(s["2"]),
        3.0,
        use=(use["16"], use["2"]),
        note=f"16: {use['16'].per_op()}; 2: {use['2'].per_op()}",
    )


def w1b_row(hosts16: list[str], tls: bool, reps: int, pids16: list[int]) -> Row:
    """W1b: echo through a server's precv/psend loop against W1 (reval + precv)."""
    from parnet import pconnect, precv, psend, reval, sclose

    c = pconnect(hosts16[:1], use_tls=tls)
    try:
        c1 = c[1]
        total = reps + 10 + 1
        reval(f"for _ in range({total}):\n    psend(precv(sockets[0]), sockets[0])", c1)
        psend(1, c1)
        precv(c1)

        def w1b() -> int:
            t0 = time.perf_counter_ns()
            psend(1, c1)
            precv(c1)
            return time.perf_counter_ns() - t0

        # W1's reval would queue behind the loop: run W1 on a second network to the same server
        c_w1 = pconnect(hosts16[:1], use_tls=tls)
        try:
            w1c = c_w1[1]
            workers = children_of(pids16[0])  # the workers of both networks

            def w1() -> int:
                t0 = time.perf_counter_ns()
                reval(SMALL_MSG, w1c)
                precv(w1c)
                return time.perf_counter_ns() - t0

            s, use = interleaved(
                {"w1b": w1b, "w1": w1}, reps, 10, 100, {"w1b": workers, "w1": workers}
            )
        finally:
            sclose(c_w1)
    finally:
        sclose(c)
    name = f"W1b echo through a server's precv/psend loop / W1{' [tls]' if tls else ''}"
    return ratio_row(
        name,
        statistics.median(s["w1b"]),
        statistics.median(s["w1"]),
        1.3,
        use=(use["w1b"], use["w1"]),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", action="store_true", help="servers with TLS + SRP (default: without)")
    ap.add_argument(
        "--quick", action="store_true", help="few runs (CI smoke test): exits 1 if anything failed"
    )
    ap.add_argument("--only", default="", help="comma-separated row groups: fresh, steady, w1b")
    a = ap.parse_args(argv)
    only = set(filter(None, a.only.split(","))) or {"fresh", "steady", "w1b"}
    runs, reps, reps_w1 = (1, 6, 200) if a.quick else (5, 40, 3000)
    rows: list[Row] = []
    failed = False
    t_start = time.monotonic()
    print(
        f"parnet edge benchmark{' (quick)' if a.quick else ''}, TLS {'on' if a.tls else 'off'}; "
        f"load average {loadavg()}"
    )
    try:
        pids: list[int] = []
        with bench_servers(a.tls, "parnet-bench-edges-", ADDRS16, pids) as hosts:
            for group, fn in (
                ("fresh", lambda: fresh_rows(hosts, a.tls, runs)),
                ("steady", lambda: [steady_row(hosts, a.tls, reps, pids)]),
                ("w1b", lambda: [w1b_row(hosts, a.tls, reps_w1, pids)]),
            ):
                if group not in only:
                    continue
                try:
                    rows.extend(fn())
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append(failed_row(group, e))
        print_table(
            "16 servers on 127.0.0.2-17 (medians; ratio: to the reference in the same run)",
            rows,
            ("workload", "parnet", "reference"),
        )
        failed = any(r.failed for r in rows)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        failed = True
    return finish(t_start, failed, a.quick)


if __name__ == "__main__":
    sys.exit(main())
