"""Remote failures as their own types: ``RemoteError[T]`` (unit tests of ``parnet.errors``
and, against real servers, rfeval / reval / netcellfun)."""

from __future__ import annotations

import errno
import linecache
import pickle

import cloudpickle
import pytest

from parnet import (
    ConnectionClosed,
    Connections,
    RemoteError,
    netcellfun,
    precv,
    reval,
    rfeval,
    sclose,
)
from parnet.errors import remote_error
from parnet.tracebacks import fill_source


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


@pytest.mark.parametrize(
    "orig",
    [
        KeyError("k"),
        ValueError("v"),
        ZeroDivisionError("z"),
        OddInit(1, 2, code=7),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
        SyntaxError("s", ("f", 1, 2, "x y", 1, 3)),
        LookupError("l"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_mixed_in_type(orig: BaseException) -> None:
    err = _make(orig)
    assert isinstance(err, RemoteError) and isinstance(err, type(orig))
    assert type(err).__name__ == f"RemoteError[{type(orig).__name__}]"
    assert err.args == orig.args and err.original is orig
    assert (err.host, err.node, err.exc_type, err.message) == (
        "srv",
        1,
        type(orig).__name__,
        str(orig),
    )
    assert str(err).startswith(f"on srv (node 1): {type(orig).__name__}: ")
    assert type(_make(orig)) is type(err)  # one class per type
    back = pickle.loads(cloudpickle.dumps(err))
    assert type(back) is type(err) and back.args == orig.args and back.original is None
    assert (back.host, back.node, back.exc_type, back.remote_traceback) == (
        "srv",
        1,
        type(orig).__name__,
        "Traceback ...",
    )


def test_oserror_fields_and_attributes() -> None:
    err = _make(FileNotFoundError(errno.ENOENT, "no such file", "/x"))
    assert isinstance(err, FileNotFoundError) and isinstance(err, OSError)
    assert (err.errno, err.strerror, err.filename) == (errno.ENOENT, "no such file", "/x")
    back = pickle.loads(pickle.dumps(err))
    assert (back.errno, back.filename) == (errno.ENOENT, "/x") and isinstance(
        back, FileNotFoundError
    )
    odd = _make(OddInit(1, 2, code=7))
    assert odd.code == 7 and pickle.loads(pickle.dumps(odd)).code == 7


@pytest.mark.parametrize(
    "orig",
    [
        KeyboardInterrupt(),
        SystemExit(3),
        GeneratorExit(),
        StopIteration(5),
        StopAsyncIteration(),
        ExceptionGroup("g", [ValueError()]),
        NewWithArg(1),
        ConnectionClosed("gone"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_not_mixed_in(orig: BaseException) -> None:
    err = _make(orig)
    assert type(err) is RemoteError and err.original is orig
    assert not isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit))
    assert type(pickle.loads(pickle.dumps(err))) is RemoteError


def test_type_found_by_name_without_original() -> None:
    err = remote_error("srv", 2, "KeyError", "'k'", "", None)
    assert isinstance(err, KeyError) and err.args == ("'k'",)
    import json  # noqa: F401 - the type is looked up among imported modules only

    assert isinstance(
        remote_error("srv", 2, "json.decoder.JSONDecodeError", "m", "", None), ValueError
    )
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


# -- remote tracebacks ----------------------------------------------------------------------


def _client_only_function() -> object:
    """A function whose source exists only in this process's linecache, as a notebook cell's."""
    path = "/nonexistent-parnet-client-dir/cell_17.py"
    src = "def cell_fn(d):\n    total = 0\n    return d['no such key'] + total\n"
    linecache.cache[path] = (len(src), None, src.splitlines(True), path)
    ns: dict = {}
    exec(compile(src, path, "exec"), ns)
    return ns["cell_fn"]


def test_remote_traceback_shows_client_source(conns: Connections) -> None:
    fn = _client_only_function()
    with pytest.raises(KeyError) as ei:
        rfeval(fn, {}, connection=conns[1])
    tb = ei.value.remote_traceback
    assert 'File "/nonexistent-parnet-client-dir/cell_17.py", line 3, in cell_fn' in tb
    assert "    return d['no such key'] + total\n" in tb
    assert "<dynamic-code>" not in tb and "parnet" not in tb.replace("parnet-client", "")
    with pytest.raises(KeyError) as mi:
        netcellfun(conns[1:], fn, [{}])
    assert "    return d['no such key'] + total\n" in mi.value.remote_traceback


def test_remote_traceback_drops_parnet_frames(conns: Connections) -> None:
    with pytest.raises(IndexError) as ei:
        reval("psend(1, sockets[7])", conns[1], wait=True)
    tb = ei.value.remote_traceback
    assert tb.startswith('Traceback (most recent call last):\n  File "<reval-')
    assert "psend(1, sockets[7])" in tb and "site-packages" not in tb and "/parnet/" not in tb
    with pytest.raises(SyntaxError) as si:
        reval("x = 1\ny = 1 +* 2", conns[2], wait=True)
    lines = si.value.remote_traceback.splitlines()
    assert lines[0].startswith('  File "<reval-') and lines[0].endswith(", line 2")
    assert len(lines) == 4 and lines[1] == "    y = 1 +* 2" and lines[2].strip() == "^"
    assert lines[3] == "SyntaxError: invalid syntax"


def test_fill_source_only_where_missing() -> None:
    path = "/nonexistent-parnet-client-dir/mod.py"
    linecache.cache[path] = (10, None, ["a = 1\n", "b = a / 0\n"], path)
    text = (
        f'Traceback (most recent call last):\n  File "{path}", line 2, in <module>\n'
        f'  File "/srv/lib.py", line 5, in g\n    server_line()\nZeroDivisionError: x\n'
    )
    out = fill_source(text)
    assert out == text.replace("in <module>\n", "in <module>\n    b = a / 0\n")
    assert fill_source(out) == out


def test_code_by_value_keeps_its_file_and_is_marked(tmp_path) -> None:
    """A server does not show its own file's lines for code that came from the client (the
    file of that name there is not the client's); it keeps the client's file name."""
    from parnet.tracebacks import format_remote
    from parnet.wire.serialize import cloud_dumps, is_client_code

    path = tmp_path / "same_name.py"
    path.write_text("# the server's file of that name\n\nserver_line = 1\n")
    ns: dict = {}
    exec(compile("def boom():\n\n    return 1 / 0\n", str(path), "exec"), ns)
    here = ns["boom"]
    there = pickle.loads(cloud_dumps(here))
    assert there.__code__.co_filename == str(path) and is_client_code(there.__code__)
    assert not is_client_code(here.__code__)
    try:
        there()
    except ZeroDivisionError as e:
        text = format_remote(e)
    assert f'File "{path}", line 3, in boom\nZeroDivisionError' in text.replace("\n  ", "\n")
    assert (
        "server_line" not in text and "test_errors.py" in text
    )  # this test's frame is no parnet's


def test_concurrent_rfeval_each_gets_its_own_outcome(cluster) -> None:
    """rfeval from several threads on one server: a failing call raises in its own thread
    only; the others get their results (none hangs, none gets another's failure)."""
    import threading
    import time as _time

    def work(i: int) -> int:
        _time.sleep(0.05 * (i % 3))
        if i % 4 == 1:
            raise KeyError(i)
        return i * 10

    conns = cluster.connect()
    outcome: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            outcome[i] = rfeval(work, i, connection=conns[1])
        except KeyError as e:
            outcome[i] = ("KeyError", e.args)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    deadline = _time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - _time.monotonic()))
    hung = sorted(i for i, t in enumerate(threads) if t.is_alive())
    if hung:
        conns.network.close()  # not sclose: a hung thread holds the read lock
    else:
        sclose(conns)
    assert not hung, f"hung: {hung}; outcomes {outcome}"
    assert outcome == {i: ("KeyError", (i,)) if i % 4 == 1 else i * 10 for i in range(8)}
