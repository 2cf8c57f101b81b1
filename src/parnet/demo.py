"""``parnet demo``: two real TLS servers on this machine, the doc examples, a timed map."""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time


def _one_second(x: int) -> int:
    time.sleep(1)
    return x


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns the exit status."""
    ap = argparse.ArgumentParser(prog="parnet demo", description=__doc__)
    ap.add_argument(
        "--calls", type=int, default=30, help="calls of the one-second function (default 30)"
    )
    ap.add_argument("--port", type=int, default=12502, help="command port (data port: port - 1)")
    a = ap.parse_args(argv)

    home = tempfile.mkdtemp(prefix="parnet-demo-")
    os.environ["PARNET_HOME"] = home
    from . import (
        netcellfun,
        network_get_info,
        parallel_generate_srp_data,
        pconnect,
        precv,
        psend,
        reval,
        sclose,
    )
    from .errors import ParnetError
    from .server.launch import start_background, stop_pid

    print(f"parnet demo: throwaway credentials in {home}")
    parallel_generate_srp_data("demo", password="")  # empty: a random password
    allow_root = os.geteuid() == 0
    if allow_root:
        print("  (running as root: the demo servers get --allow-root)")
    ips = ["127.0.0.2", "127.0.0.3"]
    pids: list[int] = []
    port = a.port
    try:
        for attempt in range(5):
            try:
                for ip in ips:
                    pids.append(
                        start_background(
                            use_tls=True,
                            cmd_port=port,
                            data_port=port - 1,
                            bind=ip,
                            allow_root=allow_root,
                        )
                    )
                break
            except ParnetError as e:
                for pid in pids:
                    stop_pid(pid)
                pids.clear()
                if "in use" not in str(e) or attempt == 4:
                    raise
                port = random.randrange(20000, 40000, 2)
                print(f"  ports taken; trying {port}/{port - 1}")
        hosts = [f"{ip}:{port}" for ip in ips]
        print(f"started 2 servers (TLS 1.3 + SRP): {', '.join(hosts)}  pids {pids}")
        t = time.perf_counter()
        conns = pconnect(hosts)
        print(
            f"pconnect: full mesh of 3 nodes, authenticated, in {(time.perf_counter() - t) * 1e3:.0f} ms"
        )
        print(conns)

        print("\n1) data through all machines (the pconnect example of the reference doc):")
        print("   reval('psend(precv(sockets[1]), sockets[0])', conns[2])")
        print("   reval('psend(precv(sockets[0]), sockets[2])', conns[1])")
        print("   psend('some data', conns[1]); precv(conns[2])")
        reval("psend(precv(sockets[1]), sockets[0])", conns[2])
        reval("psend(precv(sockets[0]), sockets[2])", conns[1])
        psend("some data", conns[1])
        print(f"   -> {precv(conns[2], timeout=30)!r}   (client -> server 1 -> server 2 -> client)")

        info = network_get_info(conns)
        cores = sum(i.nproc for i in info[1:])
        n = a.calls
        ideal = math.ceil(n / cores) * 1.0
        print(f"\n2) the reference Example: netcellfun over {n} calls of a one-second function,")
        print(
            f"   on 2 servers x their cores ({cores} local processes in all): ideal {ideal:.0f} s"
        )
        t = time.perf_counter()
        res = netcellfun(conns, _one_second, range(1, n + 1), verbose=1)
        took = time.perf_counter() - t
        ok = res.tolist() == list(range(1, n + 1))
        print(
            f"   results {'in order and correct' if ok else 'WRONG'}: {res[:5].tolist()} ... {res[-3:].tolist()}"
        )
        print(
            f"   took {took:.2f} s against the ideal {ideal:.0f} s: overhead {(took - ideal) * 1e3:.0f} ms"
        )
        print(
            f"   (Octave's parallel package takes about 110 s for 2000 trivial calls; try "
            f"netcellfun(conns, lambda x: x * 2, range(2000)) -> "
            f"{_time_trivial(conns, netcellfun):.1f} ms here)"
        )
        sclose(conns)
        print("\nclosed the network; stopping the servers")
        return 0 if ok else 1
    except ParnetError as e:
        print(f"parnet demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        for pid in pids:
            stop_pid(pid)


def _time_trivial(conns, netcellfun) -> float:
    netcellfun(conns, lambda x: x * 2, range(2000))
    t = time.perf_counter()
    netcellfun(conns, lambda x: x * 2, range(2000))
    return (time.perf_counter() - t) * 1e3
