"""Protocol constants, ports and size limits (one place, no scattered literals)."""

from __future__ import annotations

import os

__version__ = "0.1.0"

CMD_PORT = 12502
DATA_PORT = 12501

#: Plaintext preamble magic and protocol version; a mismatch is a clear ConnectError.
MAGIC = b"PARNET"
PROTOCOL_VERSION = 2

#: Largest frame accepted after authentication (bytes, all parts); PARNET_MAX_FRAME overrides.
MAX_FRAME = int(os.environ.get("PARNET_MAX_FRAME", str(16 << 30)))
#: Largest frame accepted before authentication (SECURITY.md: about 4 KiB).
MAX_PREAUTH_FRAME = 4096
#: Most out-of-band buffers in one frame.
MAX_BUFFERS = 65535

#: Seconds from accept to the end of authentication (covers the TLS handshake).
AUTH_DEADLINE = float(os.environ.get("PARNET_AUTH_DEADLINE", "10"))
#: Concurrent connections that have not finished authenticating: total, and per source address.
MAX_PENDING = 32
MAX_PENDING_PER_IP = 8
LISTEN_BACKLOG = 128


def parnet_home() -> str:
    """``$PARNET_HOME``, default ``~/.config/parnet``."""
    return os.environ.get("PARNET_HOME") or os.path.join(os.path.expanduser("~"), ".config", "parnet")


def default_srp_dir() -> str:
    """Where keygen writes and servers/clients look for SRP data: ``$PARNET_HOME/srp``."""
    return os.path.join(parnet_home(), "srp")
