"""Executor benchmark (issue 12): per-call overhead and tiny-call throughput beside netcellfun.

Usage: .venv/bin/python bench/bench_executor.py [--tls] [--quick]

E1  one call at a time (submit + result) of a trivial function: the Executor's round trip,
    beside rfeval's (the same work without futures) -> ratio.
E2  N trivial calls submitted at once, then waited for: calls/s, beside netcellfun of the
    same N calls (batched) and N rfeval calls one after the other -> ratios.
E3  8 calls of a 0.4 s sleep on 2 servers x nlocaljobs 2: ideal 0.8 s (one at a time per
    server would be 1.6 s).
E4  scikit-learn GridSearchCV (SVC on digits, 3 x 3 grid, 5 folds = 45 fits; --quick: 1 x 2
    grid, 2 folds = 4 fits) with n_jobs=1
    in this process, with joblib's own loky backend (2 processes here), then n_jobs=-1 on
    the "parnet" joblib backend with 1 and 2 servers (nlocaljobs 2 each; all servers share
    this machine's cores); needs the joblib extra (skipped without it).
Two servers on 127.0.0.2/3, warm network and pools; medians of repeated runs. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import wait

sys.path.insert(0, os.path.dirname(__file__))
from bench_core import bench_servers, loadavg  # noqa: E402


def _double(x: int) -> int:
    return x * 2


def _sleep(x: float) -> float:
    time.sleep(x)
    return x


def grid_search(c, quick: bool = False) -> tuple[float, float, float, float] | None:
    """E4: seconds for n_jobs=1 here, joblib's own loky backend with 2 processes here, and
    n_jobs=-1 on 1 and on 2 servers (same result)."""
    try:
        import joblib
        from sklearn.datasets import load_digits
        from sklearn.model_selection import GridSearchCV
        from sklearn.svm import SVC

        import parnet.joblib  # noqa: F401
    except ImportError:
        return None
    X, y = load_digits(return_X_y=True)
    grid = (
        {"C": [1], "gamma": [0.001, 0.01]}
        if quick
        else {"C": [0.1, 1, 10], "gamma": [0.0001, 0.001, 0.01]}
    )

    def fit(**kw) -> tuple[float, object]:
        t = time.perf_counter()
        g = GridSearchCV(SVC(), grid, refit=False, cv=2 if quick else 5, **kw).fit(X, y)
        return time.perf_counter() - t, (g.best_params_, g.best_score_)

    local, want = fit(n_jobs=1)
    with joblib.parallel_config(backend="loky"):
        fit(n_jobs=2)
        loky, _ = fit(n_jobs=2)
    out = [local, loky]
    for sub in (c[1:2], c[1:]):
        with joblib.parallel_config(backend="parnet", connections=sub):
            fit(n_jobs=-1)  # warm: pools up, sklearn imported on the servers
            dt, got = fit(n_jobs=-1)
        assert got == want, (got, want)
        out.append(dt)
    return out[0], out[1], out[2], out[3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", action="store_true", help="servers with TLS + SRP (default: without)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = ap.parse_args(argv)
    from parnet import Executor, netcellfun, network_set, pconnect, rfeval, sclose

    reps = 3 if a.quick else 7
    n_tiny = 2000 if a.quick else 5000
    print(
        f"parnet Executor benchmark{' (quick)' if a.quick else ''}, TLS {'on' if a.tls else 'off'}; "
        f"load average {loadavg()}"
    )
    with bench_servers(a.tls, "parnet-bench-exec-") as hosts:
        c = pconnect(hosts, use_tls=a.tls)
        network_set(c, "nlocaljobs", 2)
        with Executor(c) as ex:
            # warm up: pools started, functions cached, stream back in its fast mode
            wait([ex.submit(_sleep, 0.05) for _ in range(8)])
            for _ in range(3):
                wait([ex.submit(_double, i) for i in range(500)])

            def one_exec() -> float:
                t = time.perf_counter()
                for i in range(200):
                    ex.submit(_double, i).result()
                return (time.perf_counter() - t) / 200

            def one_rfeval() -> float:
                t = time.perf_counter()
                for i in range(200):
                    rfeval(_double, i, connection=c[1 + i % 2])
                return (time.perf_counter() - t) / 200

            def many_exec() -> float:
                t = time.perf_counter()
                fs = [ex.submit(_double, i) for i in range(n_tiny)]
                wait(fs)
                dt = time.perf_counter() - t
                assert fs[-1].result() == 2 * (n_tiny - 1)
                return dt

            def many_netcellfun() -> float:
                t = time.perf_counter()
                netcellfun(c, _double, range(n_tiny))
                return time.perf_counter() - t

            def sleeps() -> float:
                t = time.perf_counter()
                wait([ex.submit(_sleep, 0.4) for _ in range(8)])
                return time.perf_counter() - t

            e1 = statistics.median(one_exec() for _ in range(reps))
            r1 = statistics.median(one_rfeval() for _ in range(reps))
            e2 = statistics.median(many_exec() for _ in range(reps))
            n2 = statistics.median(many_netcellfun() for _ in range(reps))
            r2 = r1 * n_tiny
            wait([ex.submit(_sleep, 0.05) for _ in range(8)])  # back to the pool mode
            e3 = statistics.median(sleeps() for _ in range(reps))
        e4 = grid_search(c, a.quick)
        sclose(c)
    print(
        f"E1 one call at a time      Executor {e1 * 1e6:8.0f} us/call   rfeval {r1 * 1e6:8.0f} us/call"
        f"   ratio {e1 / r1:5.2f}x"
    )
    print(
        f"E2 {n_tiny} calls at once    Executor {n_tiny / e2:8.0f} calls/s "
        f"({e2 / n_tiny * 1e6:.1f} us/call)   netcellfun {n_tiny / n2:8.0f} calls/s   "
        f"Executor/netcellfun time {e2 / n2:6.1f}x   rfeval in a row {n_tiny / r2:6.0f} calls/s "
        f"({r2 / e2:.1f}x slower than Executor)"
    )
    print(
        f"E3 8 x 0.4 s on 2 x 2      Executor {e3:6.3f} s   ideal 0.800 s   overhead {(e3 - 0.8) * 1e3:5.0f} ms"
        f"   (serial per server: 1.600 s)"
    )
    if e4:
        local, loky, one, two = e4
        print(
            f"E4 GridSearchCV {4 if a.quick else 45:2d} fits    n_jobs=1 here {local:6.2f} s   loky n_jobs=2 here {loky:6.2f} s   "
            f"parnet 1 server {one:6.2f} s ({local / one:.2f}x)   parnet 2 servers {two:6.2f} s "
            f"({local / two:.2f}x)   (speed-up over n_jobs=1)"
        )
    else:
        print("E4 skipped: joblib / scikit-learn not installed (pip install parnet[joblib])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
