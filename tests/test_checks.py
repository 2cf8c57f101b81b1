"""checks.py: the argument checks every call and the server's command line share."""

from __future__ import annotations

import pytest

from parnet import checks


def test_port_accepts_ints_and_numeric_text() -> None:
    assert checks.port(20000, "p") == 20000
    assert checks.port(" 65535\n", "p") == 65535  # from a command line or a host:port string
    assert checks.port(1, "p") == 1


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        ("http", ValueError, "where: port 'http' is not a number"),
        (0, ValueError, "where: port 0 is out of range (1-65535)"),
        ("65536", ValueError, "where: port 65536 is out of range"),
        (20000.0, TypeError, "where: the port must be an int, got float"),
        (True, TypeError, "where: the port must be an int, got bool"),
        (None, TypeError, "got NoneType"),
    ],
)
def test_port_refusals_name_the_argument(value: object, error: type, text: str) -> None:
    with pytest.raises(error) as info:
        checks.port(value, "where")
    assert text in str(info.value)


def test_seconds() -> None:
    assert checks.seconds(None, "t") is None
    assert checks.seconds(0, "t") == 0.0 and isinstance(checks.seconds(2, "t"), float)
    assert checks.seconds(-1, "t", negative_ok=True) == -1.0
    with pytest.raises(TypeError, match=r"t must be a number of seconds, got None"):
        checks.seconds(None, "t", none_ok=False)
    with pytest.raises(TypeError, match="or None, got True"):
        checks.seconds(True, "t")
    with pytest.raises(ValueError, match="t must be > 0, got 0"):
        checks.seconds(0, "t", zero_ok=False)
    with pytest.raises(ValueError, match="t must be >= 0, got -0.5"):
        checks.seconds(-0.5, "t")
    with pytest.raises(ValueError, match="t must be a number, got nan"):
        checks.seconds(float("nan"), "t", negative_ok=True)


def test_function() -> None:
    assert checks.function(len, "f") is len
    with pytest.raises(TypeError, match="f must be callable, got str 'abc'"):
        checks.function("abc", "f")
