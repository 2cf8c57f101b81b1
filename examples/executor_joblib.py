"""parnet.Executor (concurrent.futures) and the joblib backend "parnet" (scikit-learn's n_jobs)."""

import time
from concurrent.futures import as_completed

from _local_servers import local_servers

from parnet import Executor, network_set, pconnect

with local_servers(2) as hosts, pconnect(hosts) as conns:
    network_set(conns, "nlocaljobs", 2)  # two calls at once on each server

    with Executor(conns) as ex:
        futures = {ex.submit(pow, 2, n): n for n in range(10)}
        print("powers of two:", sorted(f.result() for f in as_completed(futures)))
        print("squares:", list(ex.map(lambda x: x * x, range(8), chunksize=4)))
        failed = ex.submit(lambda: {}["missing"])
        err = failed.exception()
        print(
            "a failed call: RemoteError",
            err.exc_type,
            "caught by except KeyError:",
            isinstance(err, KeyError),
        )
        list(ex.map(time.sleep, [0.05] * 8))  # the servers' process pools start on first use
        t = time.perf_counter()
        list(ex.map(time.sleep, [0.4] * 8))
        print(f"8 calls of 0.4 s on 2 servers x 2: {time.perf_counter() - t:.1f} s")

    try:
        import joblib
        from sklearn.datasets import load_iris
        from sklearn.model_selection import GridSearchCV
        from sklearn.svm import SVC

        import parnet.joblib  # noqa: F401 - registers the backend "parnet"
    except ImportError:
        print('joblib part skipped: pip install ".[joblib]"')
    else:
        X, y = load_iris(return_X_y=True)
        grid = {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]}
        with joblib.parallel_config(backend="parnet", connections=conns):
            search = GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)
        print("best parameters:", search.best_params_)
