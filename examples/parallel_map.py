"""Parallel maps over every server and every core: netcellfun and netarrayfun."""

import numpy as np
from _local_servers import local_servers

from parnet import netarrayfun, netcellfun, pconnect


def collatz_steps(n: int) -> int:
    """Steps of the Collatz sequence from n down to 1 (a function of this script)."""
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


with local_servers(2) as hosts, pconnect(hosts) as conns:
    # Results come back in input order, as a NumPy array (uniform_output=True).
    steps = netcellfun(conns, collatz_steps, range(1, 1001), chunk_size=50)
    print("longest Collatz run below 1001 starts at", int(np.argmax(steps)) + 1)

    # Several iterables, non-scalar results (uniform_output=False gives a list).
    pairs = netcellfun(
        conns, lambda a, b: (a, b * 2), ["x", "y", "z"], [1, 2, 3], uniform_output=False
    )
    print("pairs:", pairs)

    # An error_handler stands in for calls that raise; err.index is 0-based.
    inv = netcellfun(
        conns, lambda x: 1 / x, [1, 2, 0, 4], error_handler=lambda err, x: float("inf")
    )
    print("inverses:", inv.tolist())

    # One accumulated value instead of all results.
    print(
        "sum of squares:",
        netcellfun(conns, lambda x: x * x, range(100), cum_func=lambda acc, x: acc + x),
    )

    # netarrayfun keeps the shape; vectorized=True passes whole chunks as arrays.
    grid = np.arange(12.0).reshape(3, 4)
    print("squared grid:\n", netarrayfun(conns, np.square, grid, vectorized=True, chunk_size=4))
