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

import pickle
from typing import Any

import cloudpickle

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
    body = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep)
    return body, buffers, FLAG_CLOUDPICKLE


def loads(body: bytes | bytearray | memoryview, buffers: list[bytearray] | tuple = ()) -> Any:
    """Reconstructs a value from ``dumps`` output (only ever for authenticated peers)."""
    return pickle.loads(body, buffers=buffers)
