"""The client side: connecting (``pconnect``), commands to servers (``reval``, ``rfeval``,
``install_vars``, ``network_set``), closing (``sclose``) and network maps (``netmap``)."""

from .api import (
    install_vars,
    network_get_info,
    network_set,
    parse_host,
    pconnect,
    reval,
    rfeval,
    sclose,
)

__all__ = [
    "install_vars",
    "network_get_info",
    "network_set",
    "parse_host",
    "pconnect",
    "reval",
    "rfeval",
    "sclose",
]
