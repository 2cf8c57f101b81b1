"""Liveness across namespace hosts (API.md, "Liveness"): a server holding the GIL for 4
heartbeats is alive and its results arrive; a host whose cable is pulled is reported within
the heartbeat, on an idle link (TCP keepalive) and with data in flight (TCP_INFO). The
measured times are printed (``pytest -s``)."""

from __future__ import annotations

import json
import subprocess
import time

from helpers import children, wait_until

HB = 3  # heartbeat, seconds

GIL = f"""
import json, time
from parnet import pconnect, rfeval, netcellfun, network_get_info, sclose
hold = lambda s: __import__("ctypes").PyDLL(None).sleep(s)  # libc sleep keeps the GIL
c = pconnect(["h1", "h2", "h3"], heartbeat={HB})
t = time.monotonic()
r = rfeval(hold, {4 * HB}, connection=c[1])
t_call = time.monotonic() - t
t = time.monotonic()
m = [int(v) for v in netcellfun(c, lambda x: hold({4 * HB}) + x, [1, 2, 3])]
t_map = time.monotonic() - t
print(json.dumps({{"call": r, "call_s": t_call, "map": m, "map_s": t_map,
                  "open": [i.open for i in network_get_info(c)[1:]]}}))
sclose(c)
"""


def test_gil_held_for_4_heartbeats_across_hosts(bed, up) -> None:
    r = bed.client.python_code(GIL, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(r.stdout.splitlines()[-1])
    assert d["call"] == 0 and d["map"] == [1, 2, 3] and d["open"] == [True, True, True], d
    assert d["call_s"] >= 4 * HB and d["map_s"] >= 4 * HB, d  # the GIL really was held
    print(
        f"GIL held {4 * HB} s with heartbeat {HB} s: call {d['call_s']:.1f} s, map {d['map_s']:.1f} s, "
        "no node declared dead"
    )


# The client waits on h1 while the test cuts h1's cable; it prints when the wait ended
# (CLOCK_MONOTONIC is the machine's, the same in every namespace). "idle": nothing in flight
# (keepalive finds it); "busy": a stream of values to h1, which reads them (unacknowledged data).
CUT = f"""
import itertools, json, sys, threading, time
import numpy as np
from parnet import pconnect, psend, precv, reval, network_get_info
how = sys.argv[1]
c = pconnect(["h1", "h2", "h3"], heartbeat={HB})
if how == "busy":
    reval("while True: precv(sockets[0])", c[1])
    flowing = threading.Event()
    def stream():
        x = np.ones(2**18)
        try:
            for k in itertools.count():
                psend(x, c[1])
                if k == 20:
                    flowing.set()
        except Exception:
            pass
    threading.Thread(target=stream, daemon=True).start()
    flowing.wait(60)
print("waiting", flush=True)
try:
    precv(c[1], timeout=60)
    out = {{"error": None}}
except Exception as e:
    out = {{"error": f"{{type(e).__name__}}: {{e}}", "at": time.monotonic()}}
out["open"] = [i.open for i in network_get_info(c)[1:]]
print(json.dumps(out), flush=True)
"""


def _cut_reported(bed, how: str) -> float:
    h1 = bed.host("h1")
    daemons = h1.server_pids()
    assert daemons
    wait_until(
        lambda: not any(children(d) for d in daemons), 30, "no worker left on h1 from before"
    )
    p = bed.client.popen(
        [bed.python, "-c", CUT, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert p.stdout.readline().strip() == "waiting", p.stderr.read()
        bed.cut("h1")
        t_cut = time.monotonic()
        line = p.stdout.readline()
        assert line, p.stderr.read()
        d = json.loads(line)
        assert d["error"] and d["error"].startswith("ConnectionClosed") and "h1" in d["error"], d
        assert d["open"] == [False, True, True], d
        took = d["at"] - t_cut
        # the worker on h1 notices that its client's machine is gone too, and exits
        wait_until(lambda: not any(children(d) for d in daemons), 5 * HB, "h1's worker to exit")
        return took
    finally:
        bed.restore("h1")
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cut_cable_reported_within_the_heartbeat(bed, up) -> None:
    idle = _cut_reported(bed, "idle")
    busy = _cut_reported(bed, "busy")
    print(
        f"cable pulled, heartbeat {HB} s: reported after {idle:.2f} s (idle link), "
        f"{busy:.2f} s (data in flight)"
    )
    assert idle <= HB + 0.5 and busy <= HB + 0.5, (idle, busy)
