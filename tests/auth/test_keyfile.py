"""keygen output (formats, modes, replace-a-user, stdin) and every load-time refusal."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parnet.auth import keyfile, keygen, sb64, srp
from parnet.errors import ConfigError
from parnet.transport import files

Login = Callable[[srp.SrpClient, srp.SrpServer], tuple[bytes, bytes]]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _login_ok(auth: keyfile.ServerAuth, user: str, password: str, login: Login) -> bool:
    client = srp.SrpClient(user, password, cb=b"", role="cmd", options=b"")
    server = srp.SrpServer(
        auth.lookup, fake_secret=auth.fake_secret, cb=b"", role="cmd", options=b""
    )
    try:
        login(client, server)
    except Exception:
        return False
    return True


# --- keygen -------------------------------------------------------------------------------------


def test_default_layout_and_modes(private_home: Path) -> None:
    d = keygen.parallel_generate_srp_data("alice", password="a fine long password")
    assert d == private_home / "srp"
    for directory in (d, d / "server", d / "client"):
        assert mode(directory) == 0o700
    for secret in (d / "server" / "passwd", d / "client" / "user_passwd"):
        assert mode(secret) == 0o600
    assert (d / "client" / "user_passwd").read_text() == "alice:a fine long password\n"
    assert (d / "server" / "passwd.conf").read_text() == keyfile.passwd_conf_text()
    (line,) = (d / "server" / "passwd").read_text().splitlines()
    user, v_text, s_text, index = line.split(":")
    assert (user, index) == ("alice", "3")
    salt = sb64.decode(s_text)
    assert len(salt) == keyfile.SALT_SIZE
    N, g = srp.GROUPS[3]
    assert int.from_bytes(sb64.decode(v_text), "big") == srp.compute_verifier(
        "alice", "a fine long password", salt, N, g
    )
    assert not list(d.rglob(".*.tmp"))  # no temporary files left behind


def test_load_and_login_with_defaults(private_home: Path, login: Login) -> None:
    keygen.parallel_generate_srp_data("alice", password="a fine long password")
    auth = keyfile.load_server_auth()
    user, password = keyfile.read_client_password()
    assert (user, password) == ("alice", "a fine long password")
    assert _login_ok(auth, user, password, login)


def test_replacing_a_user_keeps_the_others(srp_dir: Path, login: Login) -> None:
    for name in ("alice", "bob", "carol"):
        keygen.parallel_generate_srp_data(name, password=f"{name} old password", directory=srp_dir)
    passwd = srp_dir / "server" / "passwd"
    before = passwd.read_text().splitlines()
    keygen.parallel_generate_srp_data("bob", password="bob new password", directory=srp_dir)
    after = passwd.read_text().splitlines()
    assert [line.split(":")[0] for line in after] == ["alice", "bob", "carol"]
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1] != before[1]
    auth = keyfile.load_server_auth(passwd)
    assert _login_ok(auth, "bob", "bob new password", login)
    assert not _login_ok(auth, "bob", "bob old password", login)
    assert _login_ok(auth, "carol", "carol old password", login)
    assert mode(passwd) == 0o600


def test_random_password_when_empty(srp_dir: Path) -> None:
    keygen.parallel_generate_srp_data("alice", password="", directory=srp_dir)
    user, password = keyfile.read_client_password(srp_dir / "client" / "user_passwd")
    assert user == "alice"
    assert len(password) == 32  # secrets.token_urlsafe(24): 192 bits


def test_short_password_warns(srp_dir: Path) -> None:
    with pytest.warns(UserWarning, match="shorter than 12"):
        keygen.parallel_generate_srp_data("alice", password="short", directory=srp_dir)


def test_no_client_file(srp_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keygen.parallel_generate_srp_data(
        "alice", unattended=False, password="a fine long password", directory=srp_dir
    )
    assert not (srp_dir / "client" / "user_passwd").exists()
    keygen.parallel_generate_srp_data("bob", unattended=False, password="", directory=srp_dir)
    assert "generated password for bob" in capsys.readouterr().err  # else it would be lost


@pytest.mark.parametrize("bad", ["", "a:b", "a\nb", "x" * 300])
def test_bad_usernames(bad: str, srp_dir: Path) -> None:
    with pytest.raises(ValueError):
        keygen.parallel_generate_srp_data(bad, password="a fine long password", directory=srp_dir)


def test_password_with_newline_refused(srp_dir: Path) -> None:
    with pytest.raises(ValueError):
        keygen.parallel_generate_srp_data("a", password="two\nlines", directory=srp_dir)


def test_stdin_one_line_in_process(srp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin, long enough\nnot this\n"))
    keygen.parallel_generate_srp_data("alice", directory=srp_dir)
    assert keyfile.read_client_password(srp_dir / "client" / "user_passwd") == (
        "alice",
        "from stdin, long enough",
    )


@pytest.mark.parametrize(
    ("stdin", "expected"), [("piped password 123\n", "piped password 123"), ("\n", None)]
)
def test_keygen_command_reads_stdin(srp_dir: Path, stdin: str, expected: str | None) -> None:
    """``echo | parnet keygen test`` works unattended (a real pipe, a real process)."""
    code = (
        "import sys; from parnet.auth.keygen import keygen_main; "
        "sys.exit(keygen_main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "tester", "--dir", str(srp_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert str(srp_dir / "server" / "passwd") in result.stdout
    user, password = keyfile.read_client_password(srp_dir / "client" / "user_passwd")
    assert user == "tester"
    if expected is None:
        assert len(password) == 32
    else:
        assert password == expected


def test_keygen_main_usage_and_errors(srp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert keygen.keygen_main([]) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert keygen.keygen_main(["bad:name", "--dir", str(srp_dir)]) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert keygen.keygen_main(["ok", "--no-client-file", "--dir", str(srp_dir)]) == 0
    assert not (srp_dir / "client" / "user_passwd").exists()


def test_keygen_refuses_unsafe_existing_passwd(srp_dir: Path) -> None:
    keygen.parallel_generate_srp_data("alice", password="a fine long password", directory=srp_dir)
    passwd = srp_dir / "server" / "passwd"
    os.chmod(passwd, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        keygen.parallel_generate_srp_data("bob", password="a fine long password", directory=srp_dir)


def test_fake_secret_stable_and_repr_hides_secrets(
    alice_auth: keyfile.ServerAuth, srp_dir: Path
) -> None:
    again = keyfile.load_server_auth(srp_dir / "server" / "passwd")
    assert again.fake_secret == alice_auth.fake_secret and len(again.fake_secret) == 32
    entry = alice_auth.lookup("alice")
    assert entry is not None and str(entry.verifier) not in repr(entry)
    assert alice_auth.lookup("nobody") is None
    assert "alice" not in repr(alice_auth) or "verifier" not in repr(alice_auth)


# --- load_server_auth refusals ------------------------------------------------------------------


@pytest.fixture
def server_files(srp_dir: Path) -> tuple[Path, Path]:
    keygen.parallel_generate_srp_data("alice", password="a fine long password", directory=srp_dir)
    keygen.parallel_generate_srp_data("bob", password="another long password", directory=srp_dir)
    return srp_dir / "server" / "passwd", srp_dir / "server" / "passwd.conf"


def _rewrite(path: Path, text: str) -> None:
    files.write_secret_file(path, text.encode())


def _edit_line(passwd: Path, number: int, field: int, value: str) -> None:
    lines = passwd.read_text().splitlines()
    parts = lines[number - 1].split(":")
    parts[field] = value
    lines[number - 1] = ":".join(parts)
    _rewrite(passwd, "\n".join(lines) + "\n")


N1024_LINE = "1:{}:2\n".format(sb64.encode(srp.GROUP_1024[0].to_bytes(128, "big")))


def _case(name: str, passwd: Path, conf: Path) -> tuple[Path, str]:
    """Break the files in one way; return (the file the message must name, a text it has)."""
    if name == "missing passwd":
        passwd.unlink()
        return passwd, "not found"
    if name == "missing conf":
        conf.unlink()
        return conf, "not found"
    if name == "bad base64 verifier":
        _edit_line(passwd, 2, 1, "abc!def")
        return passwd, "line 2"
    if name == "bad base64 salt":
        _edit_line(passwd, 1, 2, "sa lt")
        return passwd, "line 1"
    if name == "bad base64 in conf":
        _rewrite(conf, conf.read_text().replace(":2\n", ":=\n", 1))
        return conf, "line 1"
    if name == "missing index":
        _edit_line(passwd, 2, 3, "")
        return passwd, "line 2"
    if name == "non-numeric index":
        _edit_line(passwd, 1, 3, "three")
        return passwd, "line 1"
    if name == "index not in conf":
        _edit_line(passwd, 2, 3, "6")
        return passwd, "missing from"
    if name == "1024-bit group":
        _rewrite(conf, N1024_LINE + conf.read_text())
        _edit_line(passwd, 1, 3, "1")
        return passwd, "too weak"
    if name == "tampered group":
        text = conf.read_text().splitlines()
        text[1] = text[1][:-1] + "5"  # index 3 with g = 5
        _rewrite(conf, "\n".join(text) + "\n")
        return passwd, "not the RFC 5054 group"
    if name == "duplicate user":
        lines = passwd.read_text().splitlines()
        _rewrite(passwd, "\n".join([*lines, lines[0]]) + "\n")
        return passwd, "line 3"
    if name == "too few fields":
        _rewrite(passwd, passwd.read_text() + "eve:abc\n")
        return passwd, "line 3"
    if name == "line over 2 KiB":
        _edit_line(passwd, 1, 0, "x" * 2100)
        return passwd, "line 1"
    if name == "verifier zero":
        _edit_line(passwd, 1, 1, "0")
        return passwd, "out of range"
    if name == "world-readable":
        os.chmod(passwd, 0o644)
        return passwd, f"chmod 600 {passwd}"
    if name == "group-readable":
        os.chmod(passwd, 0o640)
        return passwd, "chmod 600"
    if name == "symlink":
        real = passwd.with_name("real_passwd")
        passwd.rename(real)
        passwd.symlink_to(real)
        return passwd, "symbolic link"
    if name == "not a regular file":
        passwd.unlink()
        passwd.mkdir(mode=0o700)
        return passwd, "not a regular file"
    if name == "not owned by euid":
        if os.geteuid() != 0:
            pytest.skip("needs root to chown")
        os.chown(passwd, 12345, -1)
        return passwd, "owned by uid 12345"
    if name == "group-writable directory":
        os.chmod(passwd.parent, 0o770)
        return passwd, "chmod go-w"
    if name == "world-writable directory":
        os.chmod(passwd.parent, 0o777)
        return passwd, "writable by group or others"
    if name == "world-writable conf":
        os.chmod(conf, 0o666)
        return conf, "chmod go-w"
    if name == "no users":
        _rewrite(passwd, "\n")
        return passwd, "parnet keygen"
    if name == "not UTF-8":
        files.write_secret_file(passwd, passwd.read_bytes() + b"\xff\xfe:a:b:3\n")
        return passwd, "UTF-8"
    raise AssertionError(name)


REFUSALS = [
    "no users",
    "missing passwd",
    "missing conf",
    "bad base64 verifier",
    "bad base64 salt",
    "bad base64 in conf",
    "missing index",
    "non-numeric index",
    "index not in conf",
    "1024-bit group",
    "tampered group",
    "duplicate user",
    "too few fields",
    "line over 2 KiB",
    "verifier zero",
    "world-readable",
    "group-readable",
    "symlink",
    "not a regular file",
    "not owned by euid",
    "group-writable directory",
    "world-writable directory",
    "world-writable conf",
    "not UTF-8",
]


@pytest.mark.parametrize("name", REFUSALS)
def test_load_server_auth_refuses(name: str, server_files: tuple[Path, Path]) -> None:
    passwd, conf = server_files
    keyfile.load_server_auth(passwd)  # fine before the damage
    named, text = _case(name, passwd, conf)
    try:
        with pytest.raises(ConfigError) as info:
            keyfile.load_server_auth(passwd)
    finally:
        os.chmod(passwd.parent, 0o700)
    message = str(info.value)
    assert str(named) in message
    assert text in message


def test_username_with_colon_parsed_from_the_right(server_files: tuple[Path, Path]) -> None:
    passwd, _ = server_files
    _edit_line(passwd, 1, 0, "odd")
    lines = passwd.read_text().splitlines()
    lines[0] = "we:ird" + lines[0][3:]
    _rewrite(passwd, "\n".join(lines) + "\n")
    auth = keyfile.load_server_auth(passwd)
    assert auth.lookup("we:ird") is not None


def test_blank_lines_and_crlf_tolerated(server_files: tuple[Path, Path], login: Login) -> None:
    passwd, _ = server_files
    _rewrite(passwd, "\n" + passwd.read_text().replace("\n", "\r\n") + "\n\n")
    auth = keyfile.load_server_auth(passwd)
    assert auth.usernames == ["alice", "bob"]
    assert _login_ok(auth, "alice", "a fine long password", login)


# --- read_client_password -----------------------------------------------------------------------


@pytest.fixture
def client_file(srp_dir: Path) -> Path:
    keygen.parallel_generate_srp_data("alice", password="pass:with:colons ok", directory=srp_dir)
    return srp_dir / "client" / "user_passwd"


def test_read_client_password(client_file: Path) -> None:
    assert keyfile.read_client_password(client_file) == ("alice", "pass:with:colons ok")


@pytest.mark.parametrize(
    ("content", "chmod", "text"),
    [
        ("no colon here\n", 0o600, "username:password"),
        ("a:b\nc:d\n", 0o600, "exactly one line"),
        (":nopass\n", 0o600, "username:password"),
        ("alice:\n", 0o600, "username:password"),
        ("", 0o600, "exactly one line"),
        ("alice:pw\n", 0o604, "chmod 600"),
    ],
)
def test_read_client_password_refuses(
    client_file: Path, content: str, chmod: int, text: str
) -> None:
    files.write_secret_file(client_file, content.encode())
    os.chmod(client_file, chmod)
    with pytest.raises(ConfigError) as info:
        keyfile.read_client_password(client_file)
    assert str(client_file) in str(info.value) and text in str(info.value)


def test_read_client_password_missing(private_home: Path) -> None:
    with pytest.raises(ConfigError, match="user_passwd"):
        keyfile.read_client_password()


def test_write_secret_file_is_atomic_and_private(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("old")
    os.chmod(target, 0o644)
    files.write_secret_file(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


_LINE_CHARS = st.sampled_from(list(sb64.ALPHABET[:20] + ":3\r \u00e9"))


@settings(
    max_examples=80,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.text(_LINE_CHARS, max_size=60), max_size=5))
def test_fuzz_passwd_parser(server_files: tuple[Path, Path], lines: list[str]) -> None:
    """Any passwd content either loads or raises ConfigError, nothing else."""
    passwd, _ = server_files
    files.write_secret_file(passwd, "\n".join(lines).encode())
    try:
        auth = keyfile.load_server_auth(passwd)
    except ConfigError:
        return
    assert len(auth) >= 1


def test_umask_untouched(srp_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        keygen.parallel_generate_srp_data(
            "alice", password="a fine long password", directory=srp_dir
        )
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(old)
