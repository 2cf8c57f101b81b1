"""Certificates pinned on first use at the client, like ssh's ``known_hosts``.

``$PARNET_HOME/known_servers`` (0600) has one line per server, ``HOST:PORT SHA256:<hex>``: the
SHA-256 of the certificate that server presented (the ``tls-server-end-point`` binding). The
first successful login to a server adds its line; later connections must see the same
certificate, else ``ConnectError`` says so before the login starts (a server reached through a
redirect to another machine, or whose identity was made anew). To accept a new certificate,
run ``parnet forget-server HOST:PORT`` (or delete the line) and connect again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..constants import parnet_home
from ..errors import ConnectError

__all__ = ["check", "forget", "known_servers_path", "pin", "server_key"]

_lock = threading.Lock()  # pconnect logs in to its servers from several threads


def known_servers_path() -> Path:
    """``$PARNET_HOME/known_servers``."""
    return Path(parnet_home()) / "known_servers"


def server_key(host: str, port: int) -> str:
    """How a server is named in the file: ``HOST:PORT`` (``[ADDR]:PORT`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read() -> dict[str, str]:
    try:
        fd = os.open(known_servers_path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        pins = {}
        for line in f:
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                pins[parts[0]] = parts[1]
        return pins


def _fingerprint(cb: bytes) -> str:
    return "SHA256:" + cb.hex()


def check(where: str, cb: bytes) -> bool:
    """Checks the certificate hash ``cb`` of server ``where`` (``HOST:PORT``) against its pin.

    Returns:
        True if ``where`` has no pin yet (``pin`` it after a successful login).

    Raises:
        ConnectError: the pin differs, with both fingerprints and how to update the pin.
    """
    with _lock:
        pinned = _read().get(where)
    if pinned is None:
        return True
    if pinned != _fingerprint(cb):
        raise ConnectError(
            f"{where}: the server's certificate has changed: {known_servers_path()} pins {pinned}, "
            f"the server presented {_fingerprint(cb)}. Someone may be redirecting the connection to "
            f"another machine; if the server's identity was renewed on purpose, run "
            f"`parnet forget-server {where}` (or delete its line) and connect again"
        )
    return False


def pin(where: str, cb: bytes) -> None:
    """Records ``cb`` as the certificate hash of ``where`` (after a successful login)."""
    path = known_servers_path()
    with _lock:
        if where in _read():
            return
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, f"{where} {_fingerprint(cb)}\n".encode())
        finally:
            os.close(fd)


def forget(where: str) -> bool:
    """Removes the pin of ``where`` (``HOST:PORT``, or ``HOST`` for every port); True if any."""
    from ..transport.files import write_secret_file

    path = known_servers_path()
    with _lock:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        except FileNotFoundError:
            return False

        def match(line: str) -> bool:
            name = line.split(" ", 1)[0]
            return name == where or name.rsplit(":", 1)[0] == where

        keep = [ln for ln in lines if not match(ln)]
        if len(keep) == len(lines):
            return False
        write_secret_file(path, "".join(keep).encode())
        return True


def forget_main(argv: list[str]) -> int:
    """``parnet forget-server HOST[:PORT] ...``: drops pinned certificates."""
    import sys

    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: parnet forget-server HOST[:PORT] ...\n"
            f"Removes the pinned certificates of these servers from {known_servers_path()}."
        )
        return 0 if argv else 2
    code = 0
    for where in argv:
        if forget(where):
            print(f"forgot the certificate of {where}")
        else:
            print(f"parnet forget-server: no pinned certificate for {where}", file=sys.stderr)
            code = 1
    return code
