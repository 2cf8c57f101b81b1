"""parnet: cluster execution for Python, after GNU Octave's ``parallel`` package.

Start ``parnet server`` on a few machines, connect with ``pconnect``, then evaluate code
remotely (``reval``, ``rfeval``), move values directly between any two machines (``psend``,
``precv``), and map functions over all machines and their cores (``netcellfun``,
``netarrayfun``). Authenticated and encrypted by default (TLS 1.3 + SRP-6a).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import (
    install_vars,
    network_get_info,
    network_set,
    pconnect,
    reval,
    rfeval,
    sclose,
)
from .constants import __version__ as __version__
from .errors import (
    AuthenticationError,
    ConnectError,
    ConnectionClosed,
    ParnetError,
    ProtocolError,
    RemoteError,
)
from .network import Connections, NodeInfo, precv, psend, select_sockets

__all__ = [
    "AuthenticationError",
    "ConnectError",
    "ConnectionClosed",
    "Connections",
    "Executor",
    "NodeInfo",
    "ParnetError",
    "ProtocolError",
    "RemoteError",
    "fload",
    "fsave",
    "install_vars",
    "netarrayfun",
    "netcellfun",
    "network_get_info",
    "network_set",
    "parallel_generate_srp_data",
    "pararrayfun",
    "parcellfun",
    "pconnect",
    "precv",
    "pserver",
    "psend",
    "reval",
    "rfeval",
    "sclose",
    "select",
    "select_sockets",
    "up",
    "down",
    "status",
]

if TYPE_CHECKING:  # the lazy names below, for type checkers and the docs (mkdocstrings)
    from .auth.keygen import parallel_generate_srp_data
    from .client.executor import Executor
    from .client.netmap import netarrayfun, netcellfun
    from .deploy import down, status, up
    from .helpers import fload, fsave, select
    from .maps.localmap import pararrayfun, parcellfun
    from .server.launch import pserver

_LAZY = {
    "pserver": ("parnet.server.launch", "pserver"),
    "parallel_generate_srp_data": ("parnet.auth.keygen", "parallel_generate_srp_data"),
    "netcellfun": ("parnet.client.netmap", "netcellfun"),
    "Executor": ("parnet.client.executor", "Executor"),
    "netarrayfun": ("parnet.client.netmap", "netarrayfun"),
    "parcellfun": ("parnet.maps.localmap", "parcellfun"),
    "pararrayfun": ("parnet.maps.localmap", "pararrayfun"),
    "fsave": ("parnet.helpers", "fsave"),
    "up": ("parnet.deploy", "up"),
    "down": ("parnet.deploy", "down"),
    "status": ("parnet.deploy", "status"),
    "fload": ("parnet.helpers", "fload"),
    "select": ("parnet.helpers", "select"),
}


def __getattr__(name: str) -> Any:
    # Modules written in parallel are imported on first use; keeps `import parnet` light.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'parnet' has no attribute {name!r}")
