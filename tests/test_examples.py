"""The scripts in examples/ run as a user runs them, each starting and stopping its own servers.

Each example is a subprocess with a private runtime directory (``XDG_RUNTIME_DIR``), where
the servers it starts write their pid files: after it exits, any server still alive there
is stopped by its pid and fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import pid_alive, stop_pid

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: Each example and lines its standard output must contain.
EXPECTED = {
    "remote_eval.py": [
        "connected to 2 servers",
        "server 1 sends back 101",
        "server 2 sends back 102",
        "6 * 7 = 42",
        "a lambda using our variable: 42",
        "RemoteError from node 2: KeyError: 'missing'",
    ],
    "mesh_relay.py": [
        "relayed: some data",
        "server 2 received an array of shape (1000000,), sum 499999500000",
    ],
    "parallel_map.py": [
        "longest Collatz run below 1001 starts at 871",
        "pairs: [('x', 2), ('y', 4), ('z', 6)]",
        "inverses: [1.0, 0.5, inf, 0.25]",
        "sum of squares: 328350",
        " [ 64.  81. 100. 121.]]",
    ],
    "executor_joblib.py": [
        "powers of two: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]",
        "squares: [0, 1, 4, 9, 16, 25, 36, 49]",
        "a failed call: RemoteError KeyError caught by except KeyError: True",
        "8 calls of 0.4 s on 2 servers x 2:",
        "best parameters: {'C': 1, 'gamma': 0.1}",
    ],
    "rfeval_parallel.py": [
        "results: [9, 16]",
        "divmod, quotient only: [3]",
    ],
}


def test_every_example_is_checked() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert scripts == sorted(EXPECTED)


def _live_servers(run_dir: Path) -> list[int]:
    """Pids of parnet servers that still run, from the pid files in ``run_dir``."""
    pids = []
    for f in (run_dir / "parnet").glob("server-*.pid"):
        try:
            pid = int(f.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"parnet" in cmdline and pid_alive(pid):
            pids.append(pid)
    return pids


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(run_dir))
    env.pop("PARNET_HOME", None)  # the example makes its own
    try:
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / name)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=100,
        )
    finally:
        left = _live_servers(run_dir)
        for pid in left:
            stop_pid(pid)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    for line in EXPECTED[name]:
        assert line in proc.stdout, f"{name}: {line!r} missing from its output:\n{proc.stdout}"
    assert not left, f"{name} left servers running (pids {left})"
    assert (run_dir / "parnet").is_dir(), "the example's servers did not use the runtime directory"
