"""`parnet demo` when its ports are taken: it moves to other ports, runs to the end, and stops
the servers it started (by pid) whatever happens."""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys

from helpers import free_port_pair, pid_alive, stop_pid


def test_demo_moves_to_free_ports_and_stops_its_servers(tmp_path) -> None:
    port = free_port_pair()
    pids: list[int] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", port - 1))  # the first server's data port
        taken.listen()
        try:
            r = subprocess.run(
                [sys.executable, "-m", "parnet", "demo", "--calls", "2", "--port", str(port)],
                capture_output=True,
                text=True,
                env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
                timeout=240,
            )
            m = re.search(r"pids (\[[0-9, ]+\])", r.stdout)
            pids = ast.literal_eval(m.group(1)) if m else []
            assert r.returncode == 0, r.stdout + r.stderr
            moved = re.search(r"ports taken; trying (\d+)/(\d+)", r.stdout)
            assert moved and int(moved.group(2)) == int(moved.group(1)) - 1, r.stdout
            assert f"127.0.0.2:{moved.group(1)}, 127.0.0.3:{moved.group(1)}" in r.stdout
            assert "results in order and correct" in r.stdout
            assert len(pids) == 2 and not any(pid_alive(p) for p in pids), pids
            assert taken.getsockname() == ("127.0.0.2", port - 1)  # left alone
        finally:
            for p in pids:
                if pid_alive(p):
                    stop_pid(p)
