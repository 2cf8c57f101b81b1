"""parnet in a Jupyter notebook, end to end: a real ipykernel run by nbclient against real TLS
servers. The repr of ``Connections``, remote output in the cell that caused it (while the
cell waits and while it idles), ``tqdm.auto`` progress widgets, a kernel interrupt of a
running map that leaves the network usable, and the Executor."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import MODES, Cluster, wait_until

pytestmark = pytest.mark.skipif(True not in MODES, reason="TLS layer not available")


@pytest.fixture(scope="module")
def tls_cluster():
    c = Cluster(2, True, first_ip=6)
    yield c
    c.stop()


def _cells(hosts: list[str], marks: str) -> list[str]:
    return [
        # 0: connect; the repr names each node and its state
        f"import os, time\n"
        f"from parnet import Executor, netcellfun, pconnect, reval, rfeval, sclose\n"
        f"c = pconnect({hosts!r})\n"
        f"c",
        # 1: output printed by a call the cell waits for
        "rfeval(lambda: print('printed-by-rfeval', flush=True), connection=c[1])",
        # 2: output of a command that returns at once, printed while the client is idle
        #    (read by the background pump); the cell waits until the client has read it
        "told = c.network.nodes[2].told\n"
        "reval(\"print('printed-while-idle', flush=True)\", c[2])\n"
        "deadline = time.monotonic() + 30\n"
        "while c.network.nodes[2].told == told and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)",
        # 3: a progress bar is a widget in a notebook (tqdm.auto)
        "netcellfun(c, abs, range(50), verbose=1).tolist() == list(range(50))",
        # 4: a long map, interrupted by the test (kernel interrupt)
        f"def slow(x):\n"
        f"    open(os.path.join({marks!r}, str(x)), 'w').close()\n"
        f"    time.sleep(60)\n"
        f"    return x\n"
        f"netcellfun(c, slow, range(8))",
        # 5: the network is still usable, and so is the Executor
        "with Executor(c) as ex:\n"
        "    ok = list(ex.map(lambda x: x + 1, range(10))) == list(range(1, 11))\n"
        "ok and netcellfun(c, lambda x: x * 2, range(10)).tolist() == list(range(0, 20, 2))",
        # 6
        "c",
        "sclose(c)",
    ]


def _text(outputs: list) -> str:
    out = []
    for o in outputs:
        if o.get("output_type") == "stream":
            out.append(o["text"])
        elif "data" in o:
            out.append(o["data"].get("text/plain", ""))
        elif o.get("output_type") == "error":
            out.append(f"{o['ename']}: {o['evalue']}")
    return "".join(out)


def test_notebook_end_to_end(tls_cluster, tmp_path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in _cells(tls_cluster.hosts, str(marks))]
    nb.cells[4].metadata["tags"] = ["raises-exception"]
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            client.execute()
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failure.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(
            lambda: len(os.listdir(marks)) >= 2 or not t.is_alive(), 120, "the long map to run"
        )
        assert t.is_alive(), f"the notebook ended early: {failure}"
        started = time.monotonic()
        asyncio.run(client.km.interrupt_kernel())
        t.join(120)
        assert not t.is_alive()
    finally:
        if t.is_alive():  # leave no kernel behind
            asyncio.run(client.km.shutdown_kernel(now=True))
            t.join(30)
    assert not failure, failure
    cells = nb.cells
    first = _text(cells[0].outputs)
    assert "<Connections" in first and "[0] local" in first
    for k, host in enumerate(tls_cluster.hosts, start=1):
        assert f"[{k}] {host} open" in first
    assert "printed-by-rfeval" in _text(cells[1].outputs)
    assert "printed-while-idle" in _text(cells[2].outputs)
    assert not any("printed" in _text(cells[i].outputs) for i in (0, 3, 4, 5, 6))  # nowhere else
    widgets = [
        o
        for o in cells[3].outputs
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert widgets, f"no progress widget: {cells[3].outputs}"
    assert "True" in _text(cells[3].outputs)
    err = [o for o in cells[4].outputs if o.get("output_type") == "error"]
    assert err and err[0]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 60  # the map stopped; its 60 s calls did not finish
    assert "True" in _text(cells[5].outputs)
    assert " open" in _text(cells[6].outputs)
