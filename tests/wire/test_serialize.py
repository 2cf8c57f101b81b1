"""serialize.dumps / loads: out-of-band buffers, cloudpickle for code, unpicklable values."""

from __future__ import annotations

import functools
import pickle
import socket
import sys
import threading

import numpy as np
import pytest

from parnet.wire.framing import FrameDecoder, frame_bytes
from parnet.wire.serialize import FLAG_CLOUDPICKLE, OOB_MIN, dumps, loads


def over_the_wire(obj: object) -> tuple[object, list[bytearray], int]:
    """dumps -> frame bytes -> FrameDecoder -> loads, as a link would carry it."""
    body, buffers, flags = dumps(obj)
    dec = FrameDecoder(max_frame=1 << 30)
    dec.feed(frame_bytes(30, body, buffers, flags))
    f = dec.next_frame()
    assert f is not None and f.flags == flags
    return loads(f.body, f.buffers), f.buffers, flags


def module_function(x: int) -> int:
    return x * 2 + 1


class ModuleClass:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModuleClass) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


def shares(a: np.ndarray, raw: bytearray | memoryview) -> bool:
    return np.shares_memory(a, np.frombuffer(raw, dtype=np.uint8))


# -- out-of-band buffers ----------------------------------------------------------------


def test_large_array_travels_out_of_band() -> None:
    arr = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    body, buffers, flags = dumps(arr)
    assert flags == 0
    assert len(buffers) == 1 and buffers[0].nbytes == arr.nbytes
    assert len(body) < 1024  # only the pickle opcodes, not the data
    assert shares(arr, buffers[0])  # sent from the array's own memory, not a copy

    received = [bytearray(b) for b in buffers]
    out = loads(body, received)
    assert isinstance(out, np.ndarray) and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    assert shares(out, received[0])  # built on the received bytearray, not a copy
    assert out.flags.writeable


def test_large_array_through_the_decoder_is_zero_copy() -> None:
    arr = np.random.default_rng(0).standard_normal((512, 256))  # 1 MiB, 2-D
    out, buffers, _ = over_the_wire(arr)
    np.testing.assert_array_equal(out, arr)
    assert len(buffers) == 1 and shares(out, buffers[0])


def test_fortran_order_array_out_of_band() -> None:
    arr = np.asfortranarray(np.arange(100_000, dtype=np.int32).reshape(250, 400))
    out, buffers, _ = over_the_wire(arr)
    np.testing.assert_array_equal(out, arr)
    assert len(buffers) == 1


def test_several_arrays_keep_their_order() -> None:
    value = {
        "a": np.full(5000, 1.0),
        "small": np.arange(3),
        "b": np.full(7000, 2, np.int16),
        "n": 7,
    }
    body, buffers, _ = dumps(value)
    assert [b.nbytes for b in buffers] == [40_000, 14_000]  # the small array stays in band
    out = loads(body, [bytearray(b) for b in buffers])
    assert out.keys() == value.keys() and out["n"] == 7
    for k in ("a", "small", "b"):
        np.testing.assert_array_equal(out[k], value[k])


def test_small_array_in_band() -> None:
    arr = np.arange(10, dtype=np.int64)
    body, buffers, flags = dumps(arr)
    assert buffers == [] and flags == 0
    np.testing.assert_array_equal(loads(body), arr)


@pytest.mark.parametrize("nbytes,oob", [(OOB_MIN - 1, False), (OOB_MIN, True)])
def test_oob_threshold(nbytes: int, oob: bool) -> None:
    arr = np.arange(nbytes, dtype=np.uint8)
    body, buffers, _ = dumps(arr)
    assert bool(buffers) == oob
    np.testing.assert_array_equal(loads(body, [bytearray(b) for b in buffers]), arr)


def test_bytearray_in_band_pickle_buffer_out_of_band() -> None:
    """As serialize.py documents: CPython pickles a bytearray in band; wrapping it in a
    ``pickle.PickleBuffer`` sends it out of band, and loads hands back the received buffer."""
    data = bytearray(b"x" * 100_000)
    body, buffers, _ = dumps(data)
    assert buffers == [] and loads(body) == data

    body, buffers, _ = dumps(pickle.PickleBuffer(data))
    assert len(buffers) == 1 and len(body) < 1024
    received = [bytearray(b) for b in buffers]
    out = loads(body, received)
    assert out == data and out is received[0]


def test_plain_values_round_trip() -> None:
    value = [1, 2.5, "text", b"bytes" * 1000, None, (1, 2), {3}, {"k": [True]}, ModuleClass(4)]
    out, _, flags = over_the_wire(value)
    assert out == value and flags == 0


# -- code: pickle by reference, cloudpickle by value ------------------------------------


def test_module_function_by_reference() -> None:
    body, buffers, flags = dumps(module_function)
    assert flags == 0 and buffers == []
    assert loads(body) is module_function


def test_builtin_and_partial_by_reference() -> None:
    out, _, flags = over_the_wire(functools.partial(pow, 2))
    assert flags == 0 and out(10) == 1024


def test_lambda_via_cloudpickle() -> None:
    body, _, flags = dumps(lambda x: x * 3)
    assert flags & FLAG_CLOUDPICKLE
    assert loads(body)(5) == 15


def test_closure_capturing_locals_via_cloudpickle() -> None:
    offset = 10
    scale = {"k": 3}

    def inner(x: int) -> int:
        return x * scale["k"] + offset

    out, _, flags = over_the_wire(inner)
    assert flags & FLAG_CLOUDPICKLE
    assert out(2) == 16


def test_closure_capturing_a_large_array_keeps_it_out_of_band() -> None:
    table = np.arange(1 << 16, dtype=np.float64)  # 512 KiB

    def lookup(i: int) -> float:
        return float(table[i])

    out, buffers, flags = over_the_wire(lookup)
    assert flags & FLAG_CLOUDPICKLE
    assert len(buffers) == 1 and bytes(buffers[0]) == table.tobytes()
    assert out(12345) == 12345.0


def test_lambda_next_to_a_large_array_leaves_no_stale_buffers() -> None:
    """The C pickler records the array's buffer, then fails on the lambda; cloudpickle redoes it."""
    arr = np.arange(10_000, dtype=np.float64)
    body, buffers, flags = dumps([arr, lambda: 42])
    assert flags & FLAG_CLOUDPICKLE
    assert len(buffers) == 1  # not two: the failed attempt's buffer was dropped
    out = loads(body, [bytearray(b) for b in buffers])
    np.testing.assert_array_equal(out[0], arr)
    assert out[1]() == 42


def test_main_function_travels_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A function pickle can name in ``__main__`` must still go by value: the peer's
    ``__main__`` is a different program."""

    def parnet_test_main_fn(x: int) -> int:
        return x - 1

    parnet_test_main_fn.__module__ = "__main__"
    parnet_test_main_fn.__qualname__ = "parnet_test_main_fn"
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "parnet_test_main_fn", parnet_test_main_fn, raising=False)
    assert b"__main__" in pickle.dumps(parnet_test_main_fn, protocol=5)  # plain pickle: by name

    body, _, flags = dumps(parnet_test_main_fn)
    assert flags & FLAG_CLOUDPICKLE
    monkeypatch.delattr(main, "parnet_test_main_fn")  # as on the other side
    out = loads(body)
    assert out is not parnet_test_main_fn and out(10) == 9


# -- unpicklable values -----------------------------------------------------------------


def _unpicklable_cases() -> dict[str, object]:
    return {"lock": threading.Lock(), "lock in list": [np.arange(5000), threading.Lock()]}


@pytest.mark.parametrize("name", list(_unpicklable_cases()))
def test_unpicklable_value_raises(name: str) -> None:
    value = _unpicklable_cases()[name]
    with pytest.raises((TypeError, pickle.PicklingError)):
        dumps(value)
    # no state carried over into the next call
    arr = np.arange(20_000, dtype=np.float64)
    body, buffers, flags = dumps(arr)
    assert flags == 0 and len(buffers) == 1
    np.testing.assert_array_equal(loads(body, [bytearray(b) for b in buffers]), arr)


def test_open_socket_is_unpicklable() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises((TypeError, pickle.PicklingError)):
        dumps({"conn": a})
