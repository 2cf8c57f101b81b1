"""Throwaway parnet servers on this machine, for the examples.

Real use starts ``parnet server`` on each server machine once (see docs/getting-started.md).
The examples instead start their own: TLS servers on 127.0.0.2, 127.0.0.3, ... with random
ports and a temporary ``PARNET_HOME`` holding a fresh random password, stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator

from parnet import ParnetError, parallel_generate_srp_data, pserver


@contextlib.contextmanager
def local_servers(n: int = 2) -> Iterator[list[str]]:
    """Starts ``n`` TLS servers on this machine; yields their ``"address:port"`` names."""
    home = tempfile.mkdtemp(prefix="parnet-example-")
    os.environ["PARNET_HOME"] = home  # keys and the client's password file go here
    parallel_generate_srp_data("example", password="")  # empty: a random password
    allow_root = os.geteuid() == 0  # servers refuse root unless told (CI runs as root)
    ips = [f"127.0.0.{2 + k}" for k in range(n)]
    started: list[tuple[str, int]] = []
    try:
        for attempt in range(10):
            port = random.randrange(20000, 40000, 2)  # data port: port + 1
            try:
                for ip in ips:
                    pserver(cmd_port=port, data_port=port + 1, bind=ip, allow_root=allow_root)
                    started.append((ip, port))
                break
            except ParnetError as e:  # a port taken by someone else: try another pair
                _stop(started)
                if "in use" not in str(e) or attempt == 9:
                    raise
        yield [f"{ip}:{port}" for ip in ips]
    finally:
        _stop(started)
        shutil.rmtree(home, ignore_errors=True)


def _stop(started: list[tuple[str, int]]) -> None:
    while started:
        ip, port = started.pop()
        with contextlib.suppress(ParnetError):
            pserver("kill", cmd_port=port, bind=ip)
