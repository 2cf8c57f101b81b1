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

    When the remote exception's type exists here and can be subclassed, the error raised is
    an instance of a subclass of both ``RemoteError`` and that type (``RemoteError[KeyError]``,
    made once per type by ``remote_error``), so ``except KeyError`` catches a remote
    ``KeyError``; its ``args`` and attributes are the original's.

    Attributes:
        host: the server's name as given to ``pconnect``.
        node: the server's index in the connections (1-based servers, 0 is the client).
        exc_type: qualified name of the remote exception type.
        message: ``str()`` of the remote exception.
        remote_traceback: the formatted remote traceback.
        original: the remote exception object when it could be sent, else ``None``.
        index: for a failed element of a network map, its 0-based position, else ``None``.
    """

    index: int | None = None

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
        # Not super().__init__: in a RemoteError[T] the next class is T, whose __init__
        # may want other arguments.
        BaseException.__init__(self, host, node, exc_type, message)

    def __str__(self) -> str:
        extra = f" (+{self.more} later error(s) on that server)" if self.more else ""
        text = f"on {self.host} (node {self.node}): {self.exc_type}: {self.message}{extra}"
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # The original exception is not sent along (it may not travel); a RemoteError[T]
        # is made again from T, with its args and attributes.
        cause = getattr(type(self), "_cause", None)
        state = {k: v for k, v in self.__dict__.items() if k not in _OWN_FIELDS}
        if isinstance(self, OSError):
            state.update(errno=self.errno, strerror=self.strerror, filename=self.filename)
        return (
            _rebuild_remote_error,
            (
                cause,
                self.host,
                self.node,
                self.exc_type,
                self.message,
                self.remote_traceback,
                self.more,
                self.args,
            ),
            state or None,
        )


_OWN_FIELDS = frozenset(
    ("host", "node", "exc_type", "message", "remote_traceback", "original", "more")
)
_mixed: dict[type, type | None] = {}  # remote exception type -> RemoteError[type] (None: cannot)
_MIXED_MAX = 512


def _mixed_class(t: type) -> type | None:
    """``RemoteError[t]``: a subclass of both ``RemoteError`` and ``t``, made once per type;
    ``None`` when ``t`` must not or cannot be mixed in."""
    if t in _mixed:
        return _mixed[t]
    cls: type | None = None
    # Only ordinary errors: a KeyboardInterrupt/SystemExit/GeneratorExit at a server must not
    # look like one here, nor a StopIteration (it would end the caller's loop silently);
    # exception groups construct differently; a remote parnet error (a server's own link
    # closed) is not this client's, so it stays a plain RemoteError.
    if (
        isinstance(t, type)
        and issubclass(t, Exception)
        and not issubclass(t, (ParnetError, BaseExceptionGroup, StopIteration, StopAsyncIteration))
    ):
        try:
            cls = type(
                f"RemoteError[{t.__qualname__}]",
                (RemoteError, t),
                {
                    "__module__": __name__,
                    "__repr__": _mixed_repr,
                    "__getattr__": _delegate,
                    "_cause": t,
                },
            )
            cls(
                "h", 1, "T", "m"
            )  # some types cannot be made this way (a __new__ wanting arguments)
        except Exception:  # noqa: BLE001 - any failure means: use a plain RemoteError
            cls = None
    if len(_mixed) < _MIXED_MAX:
        _mixed[t] = cls
    return cls


def _mixed_repr(self: RemoteError) -> str:
    return f"{type(self).__name__}({self.host!r}, {self.node}, {self.exc_type!r}, {self.message!r})"


def _delegate(self: RemoteError, name: str) -> Any:
    # Attributes the original exception has (a custom error's fields) read through.
    original = self.__dict__.get("original")
    if original is None or name.startswith("__"):
        raise AttributeError(name)
    return getattr(original, name)


def _rebuild_remote_error(
    cause: type | None,
    host: str,
    node: int,
    exc_type: str,
    message: str,
    remote_traceback: str,
    more: int,
    args: tuple | None = None,
) -> RemoteError:
    err = remote_error(host, node, exc_type, message, remote_traceback, None, more, cause=cause)
    if args is not None:
        err.args = args
    return err


def _type_by_name(name: str) -> type | None:
    """The exception type called ``name`` (a builtin, or ``module.Qual`` of an already
    imported module: nothing is imported for it), else None."""
    import builtins
    import sys

    if "." not in name:
        obj: Any = getattr(builtins, name, None)
    else:
        mod, _, qual = name.rpartition(".")
        obj = sys.modules.get(mod)
        while obj is None and "." in mod:  # a nested class: module.Outer.Inner
            mod, _, head = mod.rpartition(".")
            qual = f"{head}.{qual}"
            obj = sys.modules.get(mod)
        for part in qual.split("."):
            obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def remote_error(
    host: str,
    node: int,
    exc_type: str,
    message: str,
    remote_traceback: str = "",
    original: BaseException | None = None,
    more: int = 0,
    *,
    cause: type | None = None,
) -> RemoteError:
    """The ``RemoteError`` for a failure at a server: a ``RemoteError[T]`` when the remote
    type ``T`` (of ``original``, else ``cause``, else looked up by ``exc_type``) exists here
    and can be mixed in; a plain ``RemoteError`` otherwise. Raise it ``from original``."""
    if remote_traceback:
        from .tracebacks import fill_source

        remote_traceback = fill_source(remote_traceback)
    t = type(original) if original is not None else cause or _type_by_name(exc_type)
    cls = _mixed_class(t) if t is not None else None
    if cls is None:
        return RemoteError(host, node, exc_type, message, remote_traceback, original, more)
    try:
        err = cls(host, node, exc_type, message, remote_traceback, original, more)
        if original is not None:
            err.args = original.args
            if isinstance(original, OSError):
                err.errno, err.strerror, err.filename = (
                    original.errno,
                    original.strerror,
                    original.filename,
                )
            for k, v in getattr(original, "__dict__", {}).items():
                if k not in _OWN_FIELDS and not k.startswith("__"):
                    err.__dict__.setdefault(k, v)
        else:
            err.args = (message,)
    except Exception:  # noqa: BLE001 - an odd type: the plain error still says everything
        return RemoteError(host, node, exc_type, message, remote_traceback, original, more)
    return err


def remote_message(e: BaseException) -> str:
    """``str(e)`` as a server reports it: a missing module says where it must be."""
    text = str(e)
    if isinstance(e, ModuleNotFoundError):
        text += (
            " (on this server: the module must exist here, importable from the working "
            "directory or sys.path, or be sent by value with "
            "cloudpickle.register_pickle_by_value(module) at the client)"
        )
    return text
