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
#: Seconds from accept to a complete 32-byte preamble (and, with TLS, from the daemon's
#: answer to the first bytes of the TLS handshake); no worker exists before that.
PREAMBLE_DEADLINE = float(os.environ.get("PARNET_PREAMBLE_DEADLINE", "1.5"))
#: Connections waiting for their preamble, per port: in all, and per source address. A
#: newcomer beyond either budget evicts an older connection instead of being refused.
MAX_PENDING = 32
MAX_PENDING_PER_IP = 8
#: Failed logins per minute on a server (all sources together) before every login is
#: delayed (as one source's are after its first failure): rotating addresses does not help.
GLOBAL_FAILURES = int(os.environ.get("PARNET_GLOBAL_FAILURES", "64"))
#: Workers whose client has not authenticated yet (beyond: the oldest is stopped, or "busy").
MAX_UNAUTH_WORKERS = 32
#: Workers forked per second before authentication (a token bucket of this size).
FORKS_PER_SECOND = 32
#: Random early drop (OpenSSH's MaxStartups), per port: accepts per second from which a
#: newcomer is dropped at random, and at which it is dropped with the highest probability.
DROP_START_RATE = 300
DROP_FULL_RATE = 1500
DROP_MAX_PROBABILITY = 0.9
#: Refusals are logged one per line up to this many per source in each window, then counted
#: and summed up at the window's end ("refused N connections from X in the last 10 s").
LOG_WINDOW = float(os.environ.get("PARNET_LOG_WINDOW", "10"))
LOG_LINES_PER_SOURCE = 3
#: Server log rotation: size of one file, and how many old files to keep.
LOG_MAX_BYTES = 8 << 20
LOG_BACKUPS = 3
LISTEN_BACKLOG = 128


def parnet_home() -> str:
    """``$PARNET_HOME``, default ``~/.config/parnet``."""
    return os.environ.get("PARNET_HOME") or os.path.join(
        os.path.expanduser("~"), ".config", "parnet"
    )


def default_srp_dir() -> str:
    """Where keygen writes and servers/clients look for SRP data: ``$PARNET_HOME/srp``."""
    return os.path.join(parnet_home(), "srp")
