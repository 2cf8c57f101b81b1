"""rfeval with lambdas on several servers at once: start each call, then collect the results."""

import time

from _local_servers import local_servers

from parnet import pconnect, precv, rfeval

with local_servers(2) as hosts, pconnect(hosts) as conns:
    slow_square = lambda x: (time.sleep(0.5), x * x)[1]  # noqa: E731 - a lambda on purpose

    # wait=False returns at once; the result is read later with precv, in call order.
    t = time.perf_counter()
    for k, x in ((1, 3), (2, 4)):
        rfeval(slow_square, x, connection=conns[k], wait=False)
    results = [precv(conns[k], timeout=30) for k in (1, 2)]
    took = time.perf_counter() - t
    print("results:", results)
    print(f"took {took:.2f} s for two calls of 0.5 s each: they ran at the same time")

    # nout/isout: the function returns a tuple; pick some of its items.
    print(
        "divmod, quotient only:",
        rfeval(divmod, 17, 5, nout=2, isout=[True, False], connection=conns[1]),
    )
