"""Every deliberate parnet error: one base class, and who is at fault shows in the type."""

from __future__ import annotations

from typing import Any


class ParnetError(Exception):
    """Base of every error parnet raises on purpose."""


class ConnectError(ParnetError):
    """Could not connect to (or set up the network with) a server; the message names it."""


class AuthenticationError(ConnectError):
    """Wrong password, unknown user or a failed proof. Never retried automatically."""


class ConfigError(ParnetError):
    """A missing, malformed or unsafe configuration or secret file; the message names it and the fix."""


class ConnectionClosed(ParnetError, OSError):
    """The peer or the network ended the link (also an ``OSError`` so retry code catches it)."""


class ProtocolError(ParnetError):
    """Malformed traffic on a link."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol cannot carry."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed; the link that carried it is closed."""


class RemoteError(ParnetError):
    """User code failed on a server.

    Attributes:
        host: the server's name as given to ``pconnect``.
        node: the server's index in the connections (1-based servers, 0 is the client).
        exc_type: qualified name of the remote exception type.
        message: ``str()`` of the remote exception.
        remote_traceback: the formatted remote traceback.
        original: the remote exception object when it could be sent, else ``None``.
    """

    def __init__(
        self,
        host: str,
        node: int,
        exc_type: str,
        message: str,
        remote_traceback: str = "",
        original: BaseException | None = None,
        more: int = 0,
    ) -> None:
        self.host = host
        self.node = node
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.original = original
        self.more = more
        super().__init__(host, node, exc_type, message)

    def __str__(self) -> str:
        extra = f" (+{self.more} later error(s) on that server)" if self.more else ""
        text = f"on {self.host} (node {self.node}): {self.exc_type}: {self.message}{extra}"
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.host, self.node, self.exc_type, self.message, self.remote_traceback, None, self.more),
        )
