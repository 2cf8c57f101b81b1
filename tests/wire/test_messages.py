"""The typed command payloads of ``wire.messages``: the code <-> class table, encode/decode
round trips, and error reports to and from ``RemoteError``."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from parnet.errors import ProtocolError, RemoteError
from parnet.wire import messages as msg

SAMPLES = [
    msg.Setup(
        1,
        ["h1", "h2"],
        [("h1", 1), ("h2", 2)],
        "/tmp",
        {0: b"k" * 32},
        2,
        5.0,
        False,
        3.0,
        {"a": "1"},
    ),
    msg.Ready(4, 1234, {"python": "3.11"}),
    msg.SetupFailed("no route"),
    msg.Call(7, len, ("abc",), {}, None, None, True),
    msg.Result(7, [1, 2]),
    msg.Install({"x": 1}, 0, [2, 3]),
    msg.Install(None, 1, []),
    msg.SetOption("nlocaljobs", 2),
    msg.MapStart(3, {"chunk_size": 1}),
    msg.MapJobs(3, [(0, 2, 0, [[1, 2]])]),
    msg.MapCancel(3),
    msg.MapEnd(3),
    msg.MapResult(3, [((0, 1), "res", 0.5)]),
    msg.Shutdown("stopping"),
    msg.ErrorReport("ValueError", "bad", "tb"),
]


def test_every_payload_class_has_one_code_and_every_sample_is_covered() -> None:
    assert set(msg.CODES) == {type(s) for s in SAMPLES}
    for cls, code in msg.CODES.items():
        assert cls in msg.PAYLOADS[code]
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: type(p).__name__)
def test_encode_decode_round_trip(payload: object) -> None:
    code, body, bufs, _ = msg.encode(payload)
    assert code == msg.CODES[type(payload)]
    assert msg.decode(code, body, [bytearray(b) for b in bufs]) == payload


def test_decode_refuses_a_frame_that_does_not_carry_its_class() -> None:
    _, body, _, _ = msg.encode(msg.Shutdown("x"))
    with pytest.raises(ProtocolError, match="SETUP: malformed Setup"):
        msg.decode(msg.SETUP, body)  # a Shutdown's fields are not a Setup's
    with pytest.raises(ProtocolError, match="CALL carries no payload of its kind"):
        msg.decode(
            msg.CALL, msg.serialize.dumps((1, len, (), {}, None, None, True))[0]
        )  # the old tuple
    with pytest.raises(ProtocolError, match="ERROR carries no payload of its kind"):
        msg.decode(msg.ERROR, msg.serialize.dumps({"type": "KeyError"})[0])


def test_error_report_to_remote_error_keeps_the_original_as_cause() -> None:
    try:
        {}["missing"]
    except KeyError as e:
        rep = msg.ErrorReport.from_exception(e, req=5)
    assert (rep.type, rep.req, rep.interrupted) == ("KeyError", 5, False)
    assert "KeyError" in rep.traceback and rep.pickled is not None
    err = rep.to_remote_error("h1", 1, more=2)
    assert isinstance(err, RemoteError)
    assert (err.host, err.node, err.exc_type, err.more) == ("h1", 1, "KeyError", 2)
    assert isinstance(err.original, KeyError) and err.__cause__ is err.original


def test_error_report_of_an_exception_that_does_not_travel_has_text_only() -> None:
    class Local(Exception):
        def __init__(self) -> None:
            super().__init__("local")
            self.lock = threading.Lock()  # cannot be pickled

    rep = msg.ErrorReport.from_exception(Local())
    assert rep.pickled is None and rep.message == "local" and rep.type.endswith("Local")
    err = rep.to_remote_error("h", 2)
    assert err.original is None and err.__cause__ is None


def test_error_report_of_an_interrupt_says_so() -> None:
    assert msg.ErrorReport.from_exception(KeyboardInterrupt()).interrupted
