"""Local map benchmark: run_chunk's per-element overhead; parcellfun against serial calls and
``concurrent.futures.ProcessPoolExecutor`` in the same run.

Run from the repository root::

    .venv/bin/python bench/bench_localmap.py [--quick]

Rows:

- ``run_chunk overhead``: a chunk of 2000 ``x * 2`` calls through ``run_chunk``, minus the
  same calls in a bare list comprehension (best of many runs); also with an
  ``error_handler`` and with a ``cum_func``.
- ``2000 trivial calls, warm``: ``parcellfun(2, f, range(2000))`` once its pool is up, against
  ``ProcessPoolExecutor(2).map(f, range(2000), chunksize=250)`` on a started executor (the
  chunk size ``multiprocessing.Pool.map`` would choose) and the serial list comprehension;
  the three interleaved in blocks, medians.
- ``2000 trivial calls, cold``: the first ``parcellfun`` of the process (starts the pool),
  against creating a ``ProcessPoolExecutor(2)`` and its first map (median of 3).
- ``80 calls of 5 ms``: CPU-bound calls (a busy loop), serial, ``parcellfun(2, ...)`` and the
  executor's map with ``chunksize=10``, interleaved; ideal speedup = usable cores (at most 2).

Ratios: parcellfun's time over the executor's (and the executor's over serial). Prints one
table; asserts nothing. Exits 0, or 1 in ``--quick`` mode (CI smoke test) if anything failed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import interleaved, loadavg, timer_ns  # noqa: E402
from parnet import parcellfun  # noqa: E402
from parnet.maps.common import ChunkTask, run_chunk  # noqa: E402
from parnet.maps.localmap import available_cores  # noqa: E402

N = 2000
SPIN_S = 0.005


def _double(x: int) -> int:
    return x * 2


def _spin(x: int) -> int:
    end = time.perf_counter() + SPIN_S
    while time.perf_counter() < end:
        pass
    return x


def _best(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ms(ns: float) -> str:
    return f"{ns / 1e6:8.2f} ms"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions (CI smoke test): exits 1 on a failure",
    )
    quick = ap.parse_args(argv).quick
    reps = 30 if quick else 300
    nproc = 2
    rows: list[tuple[str, str]] = []
    t_start = time.monotonic()
    print(
        f"parnet local maps{' (quick)' if quick else ''}  (python {sys.version.split()[0]}, "
        f"{available_cores()} usable cores); load average {loadavg()}"
    )
    try:
        col = list(range(N))
        bare = _best(lambda: [_double(x) for x in col], reps)
        for label, kw in (
            ("", {}),
            (" + error_handler", {"error_handler": lambda e, x: 0}),
            (" + cum_func (incl. its calls)", {"cum_func": lambda a, b: a + b}),
        ):
            t = _best(lambda kw=kw: run_chunk(ChunkTask(_double, [col], 0, **kw)), reps)
            rows.append(
                (
                    f"run_chunk overhead{label} ({N} calls)",
                    f"{(t - bare) * 1e6:7.1f} us  ({(t - bare) / N * 1e9:.0f} ns/element; "
                    f"calls alone {bare * 1e6:.0f} us)",
                )
            )

        # cold: the first parcellfun of this process, then fresh executors
        t = time.perf_counter_ns()
        parcellfun(nproc, _double, range(N))
        cold_par = time.perf_counter_ns() - t
        cold_ppe = []
        for _ in range(3):
            t = time.perf_counter_ns()
            ex = ProcessPoolExecutor(nproc)
            list(ex.map(_double, range(N), chunksize=N // (4 * nproc)))
            cold_ppe.append(time.perf_counter_ns() - t)
            ex.shutdown()
        cp = statistics.median(cold_ppe)
        rows.append(
            (
                f"{N} trivial calls, cold: parcellfun (starts its pool)",
                f"{_ms(cold_par)}  {cold_par / cp:.2f}x the executor's",
            )
        )
        rows.append((f"{N} trivial calls, cold: new ProcessPoolExecutor({nproc}) + map", _ms(cp)))

        with ProcessPoolExecutor(nproc) as ex:
            list(ex.map(_double, range(N), chunksize=N // (4 * nproc)))  # start its processes
            s, _ = interleaved(
                {
                    "parcellfun": timer_ns(lambda: parcellfun(nproc, _double, range(N))),
                    "executor": timer_ns(
                        lambda: list(ex.map(_double, range(N), chunksize=N // (4 * nproc)))
                    ),
                    "serial": timer_ns(lambda: [_double(x) for x in range(N)]),
                },
                max(10, reps // 3),
                3,
                5,
            )
            par, ppe, ser = (statistics.median(s[k]) for k in ("parcellfun", "executor", "serial"))
            rows.append(
                (
                    f"{N} trivial calls, warm: parcellfun({nproc}, ...)",
                    f"{_ms(par)}  {par / ppe:.2f}x the executor's (best {min(s['parcellfun']) / 1e6:.2f} ms)",
                )
            )
            rows.append(
                (
                    f"{N} trivial calls, warm: executor map, chunksize={N // (4 * nproc)}",
                    f"{_ms(ppe)}  {ppe / ser:.0f}x serial",
                )
            )
            rows.append((f"{N} trivial calls, serial", _ms(ser)))

            n = 80
            s, _ = interleaved(
                {
                    "parcellfun": timer_ns(lambda: parcellfun(nproc, _spin, range(n))),
                    "executor": timer_ns(lambda: list(ex.map(_spin, range(n), chunksize=10))),
                    "serial": timer_ns(lambda: [_spin(x) for x in range(n)]),
                },
                3 if quick else 10,
                1,
                1,
            )
            par, ppe, ser = (statistics.median(s[k]) for k in ("parcellfun", "executor", "serial"))
            ideal = min(nproc, available_cores())
            rows.append(
                (
                    f"{n} calls of {SPIN_S * 1e3:g} ms: parcellfun({nproc}, ...)",
                    f"{_ms(par)}  speedup {ser / par:.2f}x (ideal {ideal}), {par / ppe:.2f}x the executor's",
                )
            )
            rows.append(
                (
                    f"{n} calls of {SPIN_S * 1e3:g} ms: executor map, chunksize=10",
                    f"{_ms(ppe)}  speedup {ser / ppe:.2f}x",
                )
            )
            rows.append((f"{n} calls of {SPIN_S * 1e3:g} ms: serial", _ms(ser)))
    except Exception:  # noqa: BLE001 - a benchmark reports (and in --quick mode fails below)
        traceback.print_exc()
        print("something FAILED (see above)")
        return 1 if quick else 0
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"total time {time.monotonic() - t_start:.1f} s; load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
