"""Data between any two machines: a value relayed client -> server 1 -> server 2 -> client.

Every server is connected to the client and to every other server, so values move
directly between servers: the client sends nothing of the second hop.
"""

import numpy as np
from _local_servers import local_servers

from parnet import pconnect, precv, psend, reval

with local_servers(2) as hosts, pconnect(hosts) as conns:
    # The reference example of Octave's pconnect, with 0-based indices. At a server,
    # ``sockets`` is the same network as ``conns``; sockets[0] is the client.
    reval("psend(precv(sockets[1]), sockets[0])", conns[2])  # server 2: from server 1 to the client
    reval("psend(precv(sockets[0]), sockets[2])", conns[1])  # server 1: from the client to server 2
    psend("some data", conns[1])
    print("relayed:", precv(conns[2], timeout=30))

    # A large NumPy array made on server 1 goes straight to server 2, which sends a summary.
    reval("psend(np.arange(1_000_000, dtype=np.float64), sockets[2])", conns[1])
    reval("a = precv(sockets[1]); psend((a.shape, float(a.sum())), sockets[0])", conns[2])
    shape, total = precv(conns[2], timeout=30)
    print(f"server 2 received an array of shape {shape}, sum {total:.0f}")
    assert total == np.arange(1_000_000, dtype=np.float64).sum()
