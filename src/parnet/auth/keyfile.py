"""SRP password files: GnuTLS ``tpasswd`` / ``tpasswd.conf`` (servers), ``user_passwd`` (clients).

Theory of operation. ``parnet keygen USER`` (``parallel_generate_srp_data``) writes, under
``$PARNET_HOME/srp``::

    server/passwd        username:base64(v):base64(salt):index     (secret, 0600)
    server/passwd.conf   index:base64(N):base64(g)                 (RFC 5054 groups 2,3,4,5,7)
    client/user_passwd   username:password                         (secret, 0600)

``base64`` is GnuTLS's SRP variant (``sb64``) and ``v = g^x mod N`` with
``x = SHA1(salt | SHA1(user ":" password))``, so these files and the ones GnuTLS ``srptool``
writes are interchangeable. A server loads ``passwd`` and its ``.conf`` once at start
(``load_server_auth``) and refuses to start on anything malformed or unsafe, naming the file,
the line and the fix; it never falls back to running without authentication.

Reading and writing them safely (permissions, atomic replacement) is ``transport.files``;
writing new users' data is ``auth.keygen`` (``parnet keygen``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

from parnet.auth import sb64
from parnet.auth.srp import (
    DEFAULT_GROUP_INDEX,
    GROUP_1024,
    GROUPS,
    VerifierEntry,
    compute_verifier,
)
from parnet.constants import default_srp_dir
from parnet.errors import ConfigError
from parnet.transport.files import publish_file, read_public_file, read_secret_file

__all__ = [
    "ServerAuth",
    "VerifierEntry",
    "load_server_auth",
    "passwd_conf_text",
    "passwd_with_user",
    "read_client_password",
    "verifier_line",
]

#: Longest accepted ``tpasswd`` / ``tpasswd.conf`` line, newline included (GnuTLS reads lines
#: with a 2 KiB ``fgets`` buffer).
MAX_LINE = 2048
#: Salt size of new verifiers (as srptool; ``16 % 3 == 1`` avoids the sb64 quirk).
SALT_SIZE = 16
#: Longest salt accepted in a passwd line (srptool writes 16 bytes).
MAX_SALT = 64


class ServerAuth:
    """What a server needs to answer logins: the users' verifiers and a fake-user secret."""

    def __init__(
        self,
        entries: Mapping[str, VerifierEntry],
        fake_secret: bytes,
        path: Path | None = None,
    ) -> None:
        """Wrap loaded entries.

        Args:
            entries: user name -> entry.
            fake_secret: secret for unknown users' fake salts; stable within the process.
            path: the passwd file they came from (for messages).
        """
        self._entries = dict(entries)
        self.fake_secret = bytes(fake_secret)
        self.path = path

    def lookup(self, username: str) -> VerifierEntry | None:
        """The entry for ``username``, or ``None`` for an unknown user."""
        return self._entries.get(username)

    @property
    def usernames(self) -> list[str]:
        """The known user names, sorted."""
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<ServerAuth {self.path} users={len(self._entries)}>"


# --- tpasswd.conf -------------------------------------------------------------------------------


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def passwd_conf_text() -> str:
    """The ``tpasswd.conf`` text for RFC 5054 groups 2, 3, 4, 5, 7 (as srptool writes it)."""
    return "".join(
        f"{index}:{sb64.encode(_int_bytes(N))}:{sb64.encode(_int_bytes(g))}\n"
        for index, (N, g) in sorted(GROUPS.items())
    )


def _lines(data: bytes, path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, text without the newline) for non-blank lines, checking each."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        if len(raw) + 1 > MAX_LINE:
            raise ConfigError(f"{path}, line {number}: line longer than {MAX_LINE - 1} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}, line {number}: not valid UTF-8") from None
        text = text.rstrip("\r\t ")
        if text:
            yield number, text


def _decode_field(text: str, path: Path, number: int, name: str) -> bytes:
    try:
        value = sb64.decode(text)
    except ValueError as exc:
        raise ConfigError(f"{path}, line {number}: bad SRP base64 in the {name}: {exc}") from None
    if not value:
        raise ConfigError(f"{path}, line {number}: empty {name}")
    return value


def _parse_index(text: str, path: Path, number: int) -> int:
    if not text.isascii() or not text.isdigit() or int(text) == 0:
        raise ConfigError(f"{path}, line {number}: bad group index {text!r}")
    return int(text)


def _parse_conf(data: bytes, path: Path) -> dict[int, tuple[int, int, int]]:
    """index -> (N, g, line number)."""
    groups: dict[int, tuple[int, int, int]] = {}
    for number, text in _lines(data, path):
        parts = text.rsplit(":", 2)
        if len(parts) != 3:
            raise ConfigError(f"{path}, line {number}: expected index:N:g")
        index = _parse_index(parts[0], path, number)
        N = int.from_bytes(_decode_field(parts[1], path, number, "prime N"), "big")
        g = int.from_bytes(_decode_field(parts[2], path, number, "generator g"), "big")
        if index in groups:
            raise ConfigError(
                f"{path}, line {number}: group index {index} repeats line {groups[index][2]}"
            )
        groups[index] = (N, g, number)
    return groups


def _conf_group(
    index: int, conf: Mapping[int, tuple[int, int, int]], conf_path: Path, where: str
) -> None:
    regen = f"regenerate with `parnet keygen` or `srptool --create-conf {conf_path}`"
    if index not in conf:
        raise ConfigError(f"{where}: group index {index} is missing from {conf_path}; {regen}")
    N, g, line = conf[index]
    if index == 1 or (N, g) == GROUP_1024 or N.bit_length() < 1536:
        raise ConfigError(
            f"{where}: group index {index} is a {N.bit_length()}-bit group, too weak; "
            "create the user again with `parnet keygen USER` (2048-bit, index 3)"
        )
    if GROUPS.get(index) != (N, g):
        raise ConfigError(
            f"{where}: group index {index} ({conf_path}, line {line}) is not the RFC 5054 "
            f"group parnet knows for that index; {regen}"
        )


def verifier_line(
    username: str, password: str, salt: bytes, index: int = DEFAULT_GROUP_INDEX
) -> str:
    """The ``tpasswd`` line (no newline) for ``username`` with ``password`` and ``salt``."""
    N, g = GROUPS[index]
    verifier = compute_verifier(username, password, salt, N, g)
    return f"{username}:{sb64.encode(_int_bytes(verifier))}:{sb64.encode(salt)}:{index}"


def passwd_with_user(old: str, username: str, line: str) -> str:
    """The ``tpasswd`` text ``old`` with ``username``'s line replaced by ``line`` (or ``line``
    appended); other lines are kept as they are, blank lines dropped."""
    kept: list[str] = []
    replaced = False
    for text in old.split("\n"):
        if not text.strip():
            continue
        if text.rstrip("\r").rsplit(":", 3)[0] == username:
            if not replaced:
                kept.append(line)
                replaced = True
            continue
        kept.append(text)
    if not replaced:
        kept.append(line)
    return "".join(x + "\n" for x in kept)


# --- the server side ----------------------------------------------------------------------------


def _default_passwd() -> Path:
    return Path(default_srp_dir()) / "server" / "passwd"


def load_server_auth(auth_file: str | os.PathLike[str] | None = None) -> ServerAuth:
    """Load a server's verifiers from a GnuTLS ``tpasswd`` file and its ``.conf``.

    Args:
        auth_file: the passwd file; default ``<default_srp_dir()>/server/passwd``. The group
            file is the same path with ``.conf`` appended.

    Returns:
        The loaded ``ServerAuth``. Its ``fake_secret`` is a random secret kept in its own
        0600 file beside the passwd file (``<passwd>.fakesalt``, made on first load), so
        unknown users' fake salts stay the same across restarts and changes of the passwd
        file, like real users' salts (no user enumeration).

    Raises:
        ConfigError: a missing, unsafe or malformed file (bad base64, bad or missing group
            index, a 1024-bit or unknown group, a duplicate user, an over-long line, a salt
            over 64 bytes, a NUL in a user name, no users at all). The
            message names the file, the line and the fix; the server must not start.
    """
    path = Path(auth_file) if auth_file is not None else _default_passwd()
    conf_path = Path(str(path) + ".conf")
    data = read_secret_file(path, "SRP password file")
    conf = _parse_conf(read_public_file(conf_path, "SRP group file"), conf_path)
    entries: dict[str, VerifierEntry] = {}
    lines: dict[str, int] = {}
    for number, text in _lines(data, path):
        where = f"{path}, line {number}"
        parts = text.rsplit(":", 3)
        if len(parts) != 4 or not parts[0]:
            raise ConfigError(f"{where}: expected username:verifier:salt:index")
        username, v_text, s_text, i_text = parts
        if "\x00" in username:
            raise ConfigError(f"{where}: NUL in the user name")
        index = _parse_index(i_text, path, number)
        verifier = int.from_bytes(_decode_field(v_text, path, number, "verifier"), "big")
        salt = _decode_field(s_text, path, number, "salt")
        if len(salt) > MAX_SALT:
            raise ConfigError(f"{where}: salt of {len(salt)} bytes, more than {MAX_SALT}")
        _conf_group(index, conf, conf_path, where)
        N = GROUPS[index][0]
        if not 1 < verifier < N:
            raise ConfigError(f"{where}: verifier out of range for group {index}")
        if username in entries:
            raise ConfigError(
                f"{where}: user {username!r} repeats line {lines[username]}; "
                "remove one of the lines"
            )
        entries[username] = VerifierEntry(username, verifier, salt, index)
        lines[username] = number
    if not entries:
        raise ConfigError(f"{path}: no users; create one with `parnet keygen USERNAME`")
    return ServerAuth(entries, _fake_user_secret(path), path)


def _fake_user_secret(passwd: Path) -> bytes:
    """The random secret of ``<passwd>.fakesalt`` (0600), made once if missing."""
    path = passwd.with_name(passwd.name + ".fakesalt")
    if not os.path.lexists(path):
        publish_file(path, secrets.token_bytes(32), 0o600)  # a lost race keeps the winner's
    data = read_secret_file(path, "fake-user secret")
    if len(data) != 32:
        raise ConfigError(
            f"{path}: not a parnet fake-user secret (32 bytes); remove it to make a new one"
        )
    return data


# --- the client side ----------------------------------------------------------------------------


def read_client_password(
    password_file: str | os.PathLike[str] | None = None,
) -> tuple[str, str]:
    """Read the client's ``username:password`` file.

    Args:
        password_file: default ``<default_srp_dir()>/client/user_passwd``.

    Returns:
        ``(username, password)``.

    Raises:
        ConfigError: missing, unsafe or malformed file; the message names it and the fix.
    """
    path = (
        Path(password_file)
        if password_file is not None
        else Path(default_srp_dir()) / "client" / "user_passwd"
    )
    data = read_secret_file(path, "SRP client password file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != 1:
        raise ConfigError(f"{path}: expected exactly one line username:password")
    username, sep, password = lines[0].partition(":")
    if not sep or not username or not password:
        raise ConfigError(f"{path}, line 1: expected username:password")
    return username, password
