"""Shared fixtures: a private PARNET_HOME with test credentials, and real server clusters."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import MODES, PASSWORD, USER, Cluster  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def parnet_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every test runs with its own PARNET_HOME (and runtime dir) holding a test user."""
    home = tmp_path_factory.mktemp("parnet_home")
    os.chmod(home, 0o700)
    os.environ["PARNET_HOME"] = str(home)
    run = home / "run"
    run.mkdir(mode=0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(run)
    from parnet.auth.keygen import parallel_generate_srp_data

    parallel_generate_srp_data(USER, password=PASSWORD)
    return str(home)


@pytest.fixture(scope="module", params=MODES, ids=lambda t: "tls" if t else "plain")
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """Two servers for a whole module, in each mode (TLS off and on)."""
    c = Cluster(2, request.param)
    yield c
    c.stop()


@pytest.fixture()
def conns(cluster: Cluster):
    """A fresh network on the module's cluster, closed after the test."""
    c = cluster.connect()
    yield c
    from parnet import sclose

    sclose(c)


@pytest.fixture(params=MODES, ids=lambda t: "tls" if t else "plain")
def fresh_cluster(request: pytest.FixtureRequest) -> Cluster:
    """Two servers for one test (for tests that kill or stop them)."""
    c = Cluster(2, request.param, first_ip=4)
    yield c
    c.stop()


_WORKER_SIGNAL = re.compile(r"worker (\d+) exited \(signal (\d+)\)")


def _server_logs() -> dict[str, int]:
    """Every server log of this test session, with its size now."""
    from parnet.server.daemon import runtime_dir

    return {str(p): p.stat().st_size for p in Path(runtime_dir()).glob("server-*.log")}


@pytest.fixture(autouse=True)
def no_worker_crashes(request: pytest.FixtureRequest):
    """Fails a test during which a server logged a worker that died by a signal, unless the
    test is marked ``kills_workers`` (it kills or crashes them on purpose)."""
    before = _server_logs()
    yield
    if request.node.get_closest_marker("kills_workers"):
        return
    crashes = []
    for path in _server_logs():
        with open(path, "rb") as f:
            f.seek(before.get(path, 0))
            new = f.read().decode(errors="replace")
        crashes += [f"{os.path.basename(path)}: {m.group(0)}" for m in _WORKER_SIGNAL.finditer(new)]
    assert not crashes, "a server worker died by a signal: " + "; ".join(crashes)
