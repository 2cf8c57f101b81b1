"""The joblib backend ``"parnet"``: joblib (and scikit-learn's ``n_jobs``) on a parnet network.

``import parnet.joblib`` registers it; then:

    with joblib.parallel_config(backend="parnet", connections=conns):
        joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)
        GridSearchCV(estimator, grid, n_jobs=-1).fit(X, y)

Each joblib batch is one call of a ``parnet.Executor`` over the servers of ``conns``; batch
sizes follow joblib's auto-batching (from the measured batch durations). ``n_jobs=-1``
means every local process of every server (the sum of their ``nlocaljobs``); ``-2`` one
less, and so on. ``return_as="generator"`` works. An error in a task, or Ctrl-C, cancels
the queued batches and interrupts the running ones. Needs the optional ``joblib`` extra
(``pip install parnet[joblib]``).
"""

from __future__ import annotations

import weakref
from typing import Any

from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase
from joblib.parallel import register_parallel_backend

from .client.api import rfeval
from .client.executor import Executor
from .network import Connections, Network

__all__ = ["ParnetBackend"]


def _nothing() -> None:
    """Called at a server: loading it there imports ``parnet.joblib``, and so joblib."""


_ready: weakref.WeakKeyDictionary[Network, set[int]] = weakref.WeakKeyDictionary()


def _import_joblib_on(conns: Connections) -> None:
    """Imports joblib on each server once per network, before any batch arrives there.

    A batch is a ``joblib.parallel.BatchedCalls``: unpickling it imports joblib, whose
    modules import each other in a cycle. That is fine in one thread, but a server runs its
    first call in its worker process while other threads there may import too; done first
    and alone (a call that waits), the import cannot meet another one halfway.
    """
    net = conns.network
    done = _ready.setdefault(net, set())
    for k in conns.indices:
        if k != 0 and k not in done and net.nodes[k].open:
            rfeval(_nothing, connection=net.single(k))  # unpickling it imports this module
            done.add(k)


class ParnetBackend(AutoBatchingMixin, ParallelBackendBase):
    """The joblib backend ``"parnet"`` (see the module docstring).

    Args:
        connections: the network (or a subset of its servers) to run on; required.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    uses_threads = False
    supports_sharedmem = False
    default_n_jobs = -1

    def __init__(
        self,
        connections: Connections | None = None,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **kwargs
        )
        if connections is not None and not isinstance(connections, Connections):
            raise TypeError(
                f"parnet joblib backend: connections must be a Connections object, "
                f"got {type(connections).__name__}"
            )
        self.connections = connections
        self._executor: Executor | None = None

    def _conns(self) -> Connections:
        if self.connections is None:
            raise ValueError(
                'the "parnet" joblib backend needs the network: '
                'joblib.parallel_config(backend="parnet", connections=conns)'
            )
        return self.connections

    def _slots(self) -> int:
        net = self._conns().network
        ks = [k for k in self._conns().indices if k != 0 and net.nodes[k].open]
        return max(1, sum(net.nodes[k].nlocaljobs or net.nodes[k].nproc or 1 for k in ks))

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` < 0: every local process of every server, plus 1 + ``n_jobs``."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(1, self._slots() + 1 + n_jobs)
        return n_jobs

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: Any = None,
        require: Any = None,
        **backend_kwargs: Any,
    ) -> int:
        """Starts the executor for one ``Parallel`` call; returns its number of workers."""
        self.parallel = parallel
        n = self.effective_n_jobs(n_jobs)
        if self._executor is None:
            _import_joblib_on(self._conns())
            self._executor = Executor(self._conns(), max_workers=n)
        else:
            self._executor._stream.max_workers = n
        return n

    def submit(self, func: Any, callback: Any = None) -> Any:
        """Runs one batch on a server; returns its future."""
        assert self._executor is not None, "configure() first"
        fut = self._executor.submit(func)
        if callback is not None:
            fut.add_done_callback(callback)
        return fut

    def retrieve_result_callback(self, out: Any) -> Any:
        """The batch's results (raises the batch's error)."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed or Ctrl-C: cancel what is queued, interrupt what runs."""
        ex = self._executor
        if ex is None:
            return
        ex.interrupt()
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        """Ends the executor (the network stays open)."""
        ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)


register_parallel_backend("parnet", ParnetBackend)
