"""Message codes: one table, read top to bottom like a protocol description.

Frames whose code is below ``FIRST_PICKLED`` carry raw bytes and are the only ones a link
accepts before authentication; all others carry a pickled payload (``serialize``).

Command link (client <-> worker), after authentication::

    client -> worker  SETUP    {node, netid, hosts, data_ports, cwd, keys, nlocaljobs, ...}
    worker -> client  READY    {nproc, pid, versions}          or SETUP_FAILED (text)
    client -> worker  REVAL    code string
    client -> worker  CALL     (req, func, args, kwargs, nout, isout, reply_on_cmd)
    worker -> client  RESULT   (req, value)
    client -> worker  INSTALL  {name: value}   or INSTALL_FWD (relay over data links)
    client -> worker  SET      (key, value)
    client -> worker  MAP      (map_id, chunk tasks)   worker -> client  MAP_RESULT
    worker -> client  ERROR    report dict (type, message, traceback, pickled original)
    client -> worker  CLOSE
    worker -> client  OUTPUT   bytes printed on the server (stdout, stderr, warnings, logging)
    client -> worker  INTERRUPT (Ctrl-C at the client); worker -> client INTERRUPT when done
    worker -> client  SHUTDOWN reason text (the server is stopping)
    any -> any        PING     heartbeat (dropped by the receiving decoder)
Data link (any node <-> any node)::

    VALUE    one psend value (body + out-of-band buffers)
    NOTICE   worker -> client: u64 count of ERROR/OUTPUT/SHUTDOWN frames sent so far on
             the command link (dropped by the decoder; lets a client wait on the data link
             alone: it looks at the command link when the count is ahead of what it read)
"""

from __future__ import annotations

# raw (pre-authentication) frames
AUTH = 1  # SRP or data-link tag exchange message (raw bytes)
AUTH_FAIL = 2  # short UTF-8 reason; the link closes after it
HELLO = 3  # data link without TLS: no payload beyond the preamble

FIRST_PICKLED = 10
SETUP = 10
READY = 11
SETUP_FAILED = 12
REVAL = 13
CALL = 14
RESULT = 15
INSTALL = 16
SET = 17
MAP = 18
MAP_RESULT = 19
ERROR = 20
CLOSE = 21
OUTPUT = 22
PING = 23
PONG = 24
INTERRUPT = 25  # client -> worker: interrupt; worker -> client: done
SHUTDOWN = 26  # worker -> client: the server is shutting down (text)
NOTICE = 27  # worker -> client, data link: command-link frames announced so far (u64)
VALUE = 30

NAMES = {v: k for k, v in dict(globals()).items() if k.isupper() and isinstance(v, int) and k != "FIRST_PICKLED"}


def versions() -> dict[str, str]:
    """Versions that matter for exchanging pickles and code between nodes (sent in SETUP
    and READY; a difference gives a warning at the client)."""
    import sys

    import cloudpickle
    import numpy as np

    from ..constants import __version__

    return {"parnet": __version__, "python": sys.version.split()[0],
            "cloudpickle": cloudpickle.__version__, "numpy": np.__version__}
