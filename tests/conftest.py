"""Shared fixtures: a private PARNET_HOME with test credentials, and real server clusters."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import MODES, PASSWORD, USER, Cluster, tls_available  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def parnet_home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every test runs with its own PARNET_HOME (and runtime dir) holding a test user."""
    home = tmp_path_factory.mktemp("parnet_home")
    os.chmod(home, 0o700)
    os.environ["PARNET_HOME"] = str(home)
    run = home / "run"
    run.mkdir(mode=0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(run)
    if tls_available():
        from parnet.auth.keyfile import parallel_generate_srp_data

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
