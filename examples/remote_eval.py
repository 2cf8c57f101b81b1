"""Remote evaluation: code and variables on the servers, a lambda called there, a remote error."""

from _local_servers import local_servers

from parnet import RemoteError, install_vars, pconnect, precv, reval, rfeval

with local_servers(2) as hosts, pconnect(hosts) as conns:
    # conns[0] is this machine; conns[1], conns[2] are the servers in the order of hosts.
    print(f"connected to {len(conns) - 1} servers")

    # Each server keeps one namespace for this network: names defined by reval stay.
    offset = 100
    install_vars("offset", connections=conns[1:])  # copies our variable to every server
    reval("def shifted(x):\n    return x + offset", conns[1:])
    for k in (1, 2):
        reval(f"psend(shifted({k}), sockets[0])", conns[k])  # at a server, sockets[0] is the client
        print(f"server {k} sends back {precv(conns[k], timeout=30)}")

    # rfeval calls any function at one server: here a lambda, with its arguments.
    print("6 * 7 =", rfeval(lambda a, b: a * b, 6, 7, connection=conns[1]))
    scale = 3
    print("a lambda using our variable:", rfeval(lambda x: scale * x, 14, connection=conns[2]))

    # A failure on a server comes back as RemoteError, with where and why.
    try:
        rfeval(lambda: {}["missing"], connection=conns[2])
    except RemoteError as e:
        print(f"RemoteError from node {e.node}: {e.exc_type}: {e.message}")
