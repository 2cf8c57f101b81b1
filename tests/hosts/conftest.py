"""The namespace bed (tests/netbed.py) for the tests of this folder: one per session."""

from __future__ import annotations

import pytest

import netbed


@pytest.fixture(scope="session")
def bed():
    """Hosts h1-h3 with parnet and h4 without, a client, all reached over ssh by name."""
    why = netbed.unavailable()
    if why:
        pytest.skip(why)
    b = netbed.Bed(hosts=("h1", "h2", "h3", "h4"), without_parnet=("h4",))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture()
def up(bed):
    """h1-h3 running servers (TLS, keys copied by `parnet up --copy-keys`); every cut undone after."""
    r = bed.client.parnet("up", "h1", "h2", "h3", "--copy-keys")
    assert r.returncode == 0, r.stdout + r.stderr
    yield ["h1", "h2", "h3"]
    bed.restore_all()
