"""Remote failures as their own types: ``RemoteError[T]`` (unit tests of ``parnet.errors``
and, against real servers, rfeval / reval / netcellfun)."""

from __future__ import annotations

import errno
import pickle

import cloudpickle
import pytest

from parnet import ConnectionClosed, Connections, RemoteError, netcellfun, precv, reval, rfeval
from parnet.errors import remote_error


class OddInit(Exception):
    """An exception whose __init__ wants other arguments than RemoteError's."""

    def __init__(self, a: int, b: int, *, code: int) -> None:
        super().__init__(a, b)
        self.code = code


class NewWithArg(Exception):
    def __new__(cls, x: int) -> NewWithArg:
        return super().__new__(cls, x)


def _make(orig: BaseException) -> RemoteError:
    return remote_error("srv", 1, type(orig).__name__, str(orig), "Traceback ...", orig)


@pytest.mark.parametrize("orig", [KeyError("k"), ValueError("v"), ZeroDivisionError("z"),
                                  OddInit(1, 2, code=7), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
                                  SyntaxError("s", ("f", 1, 2, "x y", 1, 3)), StopIteration(5)],
                         ids=lambda e: type(e).__name__)
def test_mixed_in_type(orig: BaseException) -> None:
    err = _make(orig)
    assert isinstance(err, RemoteError) and isinstance(err, type(orig))
    assert type(err).__name__ == f"RemoteError[{type(orig).__name__}]"
    assert err.args == orig.args and err.original is orig
    assert (err.host, err.node, err.exc_type, err.message) == ("srv", 1, type(orig).__name__, str(orig))
    assert str(err).startswith(f"on srv (node 1): {type(orig).__name__}: ")
    assert type(_make(orig)) is type(err)  # one class per type
    back = pickle.loads(cloudpickle.dumps(err))
    assert type(back) is type(err) and back.args == orig.args and back.original is None
    assert (back.host, back.node, back.exc_type, back.remote_traceback) == ("srv", 1, type(orig).__name__,
                                                                         "Traceback ...")


def test_oserror_fields_and_attributes() -> None:
    err = _make(FileNotFoundError(errno.ENOENT, "no such file", "/x"))
    assert isinstance(err, FileNotFoundError) and isinstance(err, OSError)
    assert (err.errno, err.strerror, err.filename) == (errno.ENOENT, "no such file", "/x")
    back = pickle.loads(pickle.dumps(err))
    assert (back.errno, back.filename) == (errno.ENOENT, "/x") and isinstance(back, FileNotFoundError)
    odd = _make(OddInit(1, 2, code=7))
    assert odd.code == 7 and pickle.loads(pickle.dumps(odd)).code == 7


@pytest.mark.parametrize("orig", [KeyboardInterrupt(), SystemExit(3), GeneratorExit(),
                                  ExceptionGroup("g", [ValueError()]), NewWithArg(1),
                                  ConnectionClosed("gone")],
                         ids=lambda e: type(e).__name__)
def test_not_mixed_in(orig: BaseException) -> None:
    err = _make(orig)
    assert type(err) is RemoteError and err.original is orig
    assert not isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit))
    assert type(pickle.loads(pickle.dumps(err))) is RemoteError


def test_type_found_by_name_without_original() -> None:
    err = remote_error("srv", 2, "KeyError", "'k'", "", None)
    assert isinstance(err, KeyError) and err.args == ("'k'",)
    import json  # noqa: F401 - the type is looked up among imported modules only

    assert isinstance(remote_error("srv", 2, "json.decoder.JSONDecodeError", "m", "", None), ValueError)
    assert type(remote_error("srv", 2, "no_such_module_xyz.Err", "m", "", None)) is RemoteError
    assert type(remote_error("srv", 2, "MadeUpError", "m", "", None)) is RemoteError


def test_except_remote_types(conns: Connections) -> None:
    class Odd(Exception):  # defined here: it travels by value (cloudpickle)
        def __init__(self, a: int, code: int) -> None:
            super().__init__(a, code)
            self.code = code

    def lookup(d: dict, key: str) -> object:
        return d[key]

    def odd_at_2(x: int) -> int:
        if x == 2:
            raise Odd(x, 7)
        return x

    with pytest.raises(KeyError) as ei:
        rfeval(lookup, {}, "missing", connection=conns[1])
    err = ei.value
    assert isinstance(err, RemoteError) and err.node == 1 and err.args == ("missing",)
    assert isinstance(err.__cause__, KeyError) and not isinstance(err.__cause__, RemoteError)
    reval("open('/nonexistent-dir-parnet/x')", conns[2])
    with pytest.raises(FileNotFoundError) as fi:
        rfeval(int, "1", connection=conns[2])  # the earlier failure surfaces here
    assert fi.value.errno == errno.ENOENT and fi.value.node == 2
    with pytest.raises(Odd) as oi:
        netcellfun(conns[1:], odd_at_2, [1, 2, 3])
    assert oi.value.code == 7 and isinstance(oi.value, RemoteError) and oi.value.index == 1


def test_reval_wait_raises_its_own_failure(conns: Connections) -> None:
    reval("x = 41", conns[1:], wait=True)  # returns once run: no failure
    with pytest.raises(ZeroDivisionError) as ei:
        reval("y = x + 1\nz = y / 0", conns, wait=True)  # node 0 is skipped
    assert ei.value.node in (1, 2) and "y / 0" in ei.value.remote_traceback
    other = 3 - ei.value.node
    with pytest.raises(ZeroDivisionError) as e2:  # the other server's failure is the next one
        reval("pass", conns[other], wait=True)
    assert e2.value.node == other
    with pytest.raises(SyntaxError):
        reval("1 +* 2", conns[1], wait=True)
    reval("psend(y, sockets[0])", conns[1], wait=True)  # nothing left pending, namespace intact
    assert precv(conns[1], timeout=20) == 42
