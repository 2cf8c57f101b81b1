"""Serialization of values: pickle protocol 5 with out-of-band buffers, cloudpickle for code.

Unpickling runs code. Nothing received from a peer is unpickled before that link has
authenticated (the link layer enforces it; pre-authentication frames carry raw bytes).

``dumps`` tries the C pickler first (fast, and by reference for importable functions) and
falls back to cloudpickle when that fails or when the pickle refers to ``__main__`` (such
functions and classes do not exist on the other side, so they must travel by value).
Buffers of at least ``OOB_MIN`` bytes that pickle offers through ``buffer_callback`` (NumPy
arrays, ``pickle.PickleBuffer`` objects; not plain ``bytes``/``bytearray``, which CPython
pickles in band) are kept out of band: they are written to the socket from the original memory and
read into their own preallocated buffers, without further copies.
"""

from __future__ import annotations

import io
import pickle
import types
import weakref
from collections import ChainMap
from collections.abc import Sequence
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

OOB_MIN = 1024
#: Types whose pickle never holds buffers or code (the fast path of small messages).
PLAIN = frozenset({int, float, bool, str, type(None), complex})
FLAG_CLOUDPICKLE = 0x01


def dumps(obj: Any) -> tuple[bytes, list[memoryview], int]:
    """Serializes ``obj``.

    Returns:
        ``(body, buffers, flags)``: the pickle stream, the out-of-band buffers, and the
        frame flags to send with them.

    Raises:
        Whatever pickling raises (``pickle.PicklingError``, ``TypeError``, ...) when neither
        pickle nor cloudpickle can serialize the value; the caller reports it on that call.
    """
    if type(obj) in PLAIN:  # the hot path of small messages: nothing out of band, no code
        return pickle.dumps(obj, protocol=5), [], 0
    buffers: list[memoryview] = []

    def keep(pb: pickle.PickleBuffer) -> bool:
        mv = pb.raw()
        if mv.nbytes < OOB_MIN:
            return True  # in band
        buffers.append(mv)
        return False

    try:
        body = pickle.dumps(obj, protocol=5, buffer_callback=keep)
        if b"__main__" not in body:
            return body, buffers, 0
    except (pickle.PicklingError, AttributeError, TypeError):
        pass
    buffers.clear()
    body = cloud_dumps(obj, buffer_callback=keep)
    return body, buffers, FLAG_CLOUDPICKLE


# -- code sent by value keeps its file name, and is known as the client's where it lands ----
#: Code objects that arrived by value from another node (their source is not this node's).
_client_code: weakref.WeakValueDictionary[int, types.CodeType] = (
    weakref.WeakValueDictionary()
)  # by id:
# code objects compare equal by value, and a server's own code may equal one that came by value


def _code_reduce(co: types.CodeType) -> tuple[Any, ...]:
    # cloudpickle names every such code "<dynamic-code>"; keep the real file name, so the
    # client can show the source lines of its own functions in a remote traceback.
    _, args = _cp._code_reduce(co)
    fields = list(args)
    fields[fields.index("<dynamic-code>")] = co.co_filename
    return _make_code, (tuple(fields),)


def _make_code(args: tuple[Any, ...]) -> types.CodeType:
    co = types.CodeType(*args)
    _client_code[id(co)] = co
    return co


def is_client_code(co: types.CodeType) -> bool:
    """Whether ``co`` came by value from another node (ultimately from the client)."""
    return _client_code.get(id(co)) is co


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no types
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


def cloud_dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    """``cloudpickle.dumps(obj, protocol=5)``, except that code keeps its file name (see
    ``is_client_code``)."""
    with io.BytesIO() as f:
        _Pickler(f, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return f.getvalue()


def loads(body: bytes | bytearray | memoryview, buffers: Sequence[Any] = ()) -> Any:
    """Reconstructs a value from ``dumps`` output (only ever for authenticated peers)."""
    return pickle.loads(body, buffers=buffers)
