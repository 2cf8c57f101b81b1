"""The joblib backend "parnet" between real servers, and scikit-learn on it."""

from __future__ import annotations

import os
import sys

import cloudpickle
import joblib
import pytest

import parnet.joblib  # noqa: F401 - registers the backend
from parnet import RemoteError, network_set, rfeval

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # servers cannot import this module


def _server_pids(cluster) -> set[int]:
    """The server workers of ``cluster`` and every process below them (their pools)."""
    from helpers import descendants

    return {p for pid in cluster.pids for p in descendants(pid)}


def test_parallel_order_n_jobs_and_server_processes(conns, cluster) -> None:
    network_set(conns, "nlocaljobs", 2)
    with joblib.parallel_config(backend="parnet", connections=conns):
        assert joblib.effective_n_jobs(-1) == 4  # every local process of both servers
        assert joblib.effective_n_jobs(-2) == 3
        assert joblib.effective_n_jobs(3) == 3
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(divmod)(x, 7) for x in range(100))
        assert out == [divmod(x, 7) for x in range(100)]
        pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getpid)() for _ in range(40))
    assert os.getpid() not in pids
    assert set(pids) <= _server_pids(cluster)
    assert rfeval(lambda: 1, connection=conns[1]) == 1  # the network stays open


def test_generator_and_auto_batching(conns) -> None:
    with joblib.parallel_config(backend="parnet", connections=conns):
        par = joblib.Parallel(n_jobs=-1, return_as="generator")
        gen = par(joblib.delayed(abs)(-x) for x in range(3000))
        assert not isinstance(gen, list)
        assert list(gen) == list(range(3000))
        # tiny tasks: joblib's auto-batching grew the batches (fewer, larger calls)
        assert par._backend.compute_batch_size() > 1


def test_task_error_and_network_usable(conns) -> None:
    def f(x):
        if x == 13:
            raise KeyError("thirteen")
        return x

    with joblib.parallel_config(backend="parnet", connections=conns):
        with pytest.raises(RemoteError, match="thirteen") as ei:
            joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in range(50))
        assert ei.value.exc_type == "KeyError"
        assert joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in range(5)) == list(range(5))


def test_needs_connections() -> None:
    with joblib.parallel_config(backend="parnet"), pytest.raises(ValueError, match="connections"):
        joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(x) for x in range(3))
    with pytest.raises(TypeError, match="Connections"):
        parnet.joblib.ParnetBackend(connections="server1")


def test_grid_search_same_result_and_runs_on_servers(conns, cluster, tmp_path) -> None:
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    marks = str(tmp_path)

    class PidSVC(SVC):
        """An SVC whose fit leaves the pid of the process it ran in."""

        def fit(self, X, y, sample_weight=None):
            open(os.path.join(marks, str(os.getpid())), "a").close()
            return super().fit(X, y, sample_weight=sample_weight)

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10, 100], "gamma": [0.001, 0.01, 0.1, 1]}
    local = GridSearchCV(SVC(), grid, n_jobs=1).fit(X, y)
    with joblib.parallel_config(backend="parnet", connections=conns):
        remote = GridSearchCV(PidSVC(), grid, n_jobs=-1, refit=False).fit(X, y)
    assert remote.best_params_ == local.best_params_
    assert remote.best_score_ == pytest.approx(local.best_score_, abs=1e-12)
    pids = {int(p) for p in os.listdir(marks)}
    assert pids and os.getpid() not in pids
    assert pids <= _server_pids(cluster)
