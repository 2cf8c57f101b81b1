"""Local map benchmark: run_chunk's per-element overhead and parcellfun's latency and speedup.

Run from the repository root::

    .venv/bin/python bench/bench_localmap.py [--quick]

Rows:

- ``run_chunk overhead``: a chunk of 2000 ``lambda x: x * 2`` calls through ``run_chunk``,
  minus the same calls in a bare list comprehension (best of many runs); also with an
  ``error_handler`` and with a ``cum_func``.
- ``parcellfun warm``: ``parcellfun(2, lambda x: x * 2, range(2000))`` once the pool is up
  (median); ``cold`` is the first call of the process (starts the pool).
- ``speedup``: 2 x 40 calls that each spin for 5 ms, serial time / ``parcellfun(2, ...)``
  time (ideal: the number of usable cores, at most 2).

Prints one table; asserts nothing; exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from parnet.maps import parcellfun
from parnet.maps.common import ChunkTask, run_chunk
from parnet.maps.localmap import available_cores


def _best(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _spin(seconds: float) -> float:
    end = time.perf_counter() + seconds
    x = 0.0
    while time.perf_counter() < end:
        x += 1.0
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    reps = 30 if ap.parse_args().quick else 300
    rows: list[tuple[str, str]] = []

    def f(x: int) -> int:
        return x * 2

    col = list(range(2000))
    bare = _best(lambda: [f(x) for x in col], reps)
    for label, kw in (("", {}), (" + error_handler", {"error_handler": lambda e, x: 0}),
                      (" + cum_func (incl. its calls)", {"cum_func": lambda a, b: a + b})):
        t = _best(lambda kw=kw: run_chunk(ChunkTask(f, [col], 0, **kw)), reps)
        rows.append((f"run_chunk overhead{label} (2000 calls)",
                     f"{(t - bare) * 1e6:7.1f} us  ({(t - bare) / 2000 * 1e9:.0f} ns/element; "
                     f"calls alone {bare * 1e6:.0f} us)"))

    t = time.perf_counter()
    parcellfun(2, lambda x: x * 2, range(2000))
    rows.append(("parcellfun cold (starts the pool)", f"{(time.perf_counter() - t) * 1e3:7.1f} ms"))
    warm = []
    for _ in range(max(10, reps // 10)):
        t = time.perf_counter()
        parcellfun(2, lambda x: x * 2, range(2000))
        warm.append(time.perf_counter() - t)
    rows.append(("parcellfun(2, x*2, range(2000)) warm",
                 f"{statistics.median(warm) * 1e3:7.2f} ms median, {min(warm) * 1e3:.2f} ms best"))

    n = 80
    t = time.perf_counter()
    for _ in range(n):
        _spin(0.005)
    serial = time.perf_counter() - t
    t = time.perf_counter()
    parcellfun(2, lambda x: _spin(0.005), range(n))
    par = time.perf_counter() - t
    rows.append((f"speedup, {n} calls of 5 ms, nproc=2",
                 f"{serial / par:7.2f} x  (ideal {min(2, available_cores())}; "
                 f"{serial * 1e3:.0f} ms serial, {par * 1e3:.0f} ms parallel)"))

    width = max(len(r[0]) for r in rows)
    print(f"parnet local maps  (python {sys.version.split()[0]}, {available_cores()} cores)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
