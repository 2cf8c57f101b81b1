"""``RemoteError[T]`` as the caller sees it: its repr names the type, server, node and message,
and fields the original exception keeps in slots read through to the original."""

from __future__ import annotations

import pickle

import pytest

from parnet import RemoteError
from parnet.errors import remote_error


class SlotError(Exception):
    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        super().__init__(f"failed with {code}")
        self.code = code


def test_repr_names_type_server_node_and_message() -> None:
    err = remote_error(
        "srv1", 2, "ValueError", "bad value", "Traceback ...", ValueError("bad value")
    )
    assert repr(err) == "RemoteError[ValueError]('srv1', 2, 'ValueError', 'bad value')"


def test_slot_fields_read_through_to_the_original() -> None:
    err = remote_error("srv1", 1, "SlotError", "failed with 7", "", SlotError(7))
    assert isinstance(err, SlotError) and isinstance(err, RemoteError)
    assert err.code == 7
    with pytest.raises(AttributeError):
        err.no_such_field  # noqa: B018 - neither here nor on the original
    back = pickle.loads(pickle.dumps(err))  # the original stays behind: nothing to read through
    assert back.original is None and back.args == err.args
    with pytest.raises(AttributeError):
        back.code  # noqa: B018
