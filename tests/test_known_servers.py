"""auth/known_servers.py: pins are made once and never silently replaced, a changed certificate
is refused, and `parnet forget-server` removes exactly the pins it names."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from parnet.auth import known_servers as ks
from parnet.errors import ConnectError

A, B = b"\x01" * 32, b"\x02" * 32


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PARNET_HOME of its own (the session's pins are left alone)."""
    h = tmp_path / "home"
    monkeypatch.setenv("PARNET_HOME", str(h))
    return h


def test_first_pin_wins_and_a_changed_certificate_is_refused(home: Path) -> None:
    assert not ks.known_servers_path().exists()
    assert ks.check("h1:20000", A)  # unknown yet: pin it after the login
    ks.pin("h1:20000", A)
    path = ks.known_servers_path()
    assert path == home / "known_servers" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ks.pin("h1:20000", B)  # a pin is never replaced by another login
    assert path.read_text() == f"h1:20000 SHA256:{A.hex()}\n"
    assert ks.check("h1:20000", A) is False
    with pytest.raises(ConnectError, match=f"h1:20000.*SHA256:{B.hex()}.*forget-server h1:20000"):
        ks.check("h1:20000", B)


def test_comments_and_malformed_lines_pin_nothing(home: Path) -> None:
    home.mkdir()
    ks.known_servers_path().write_text(f"# h1:1 SHA256:{A.hex()}\nh2:2\nh3:3 a b\n")
    for where in ("#", "h1:1", "h2:2", "h3:3"):
        assert ks.check(where, B), where


def test_forget_by_host_port_or_by_host(home: Path) -> None:
    assert not ks.forget("h1:1")  # no file yet
    ks.pin("h1:1", A)
    ks.pin("h1:2", A)
    ks.pin(ks.server_key("::1", 3), B)
    ks.pin("h11:1", B)
    assert not ks.forget("h2:1") and not ks.forget("h1:3")  # nothing matches: file unchanged
    assert ks.forget("h1:1")
    assert ks.check("h1:1", B) and not ks.check("h1:2", A)
    assert ks.forget("h1")  # every port of h1, not h11
    assert ks.check("h1:2", B) and not ks.check("h11:1", B)
    assert ks.forget("[::1]")
    assert ks.known_servers_path().read_text() == f"h11:1 SHA256:{B.hex()}\n"
    assert stat.S_IMODE(os.stat(ks.known_servers_path()).st_mode) == 0o600


def test_forget_server_command(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ks.forget_main([]) == 2
    assert "usage: parnet forget-server" in capsys.readouterr().out
    assert ks.forget_main(["--help"]) == 0
    assert str(ks.known_servers_path()) in capsys.readouterr().out
    ks.pin("h1:1", A)
    assert ks.forget_main(["h1:1", "h9:9"]) == 1  # one unknown: exit 1, the other still forgotten
    out = capsys.readouterr()
    assert "forgot the certificate of h1:1" in out.out
    assert "no pinned certificate for h9:9" in out.err
    assert ks.check("h1:1", B)
