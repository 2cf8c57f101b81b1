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

Secret files are checked like ssh's StrictModes: opened with ``O_NOFOLLOW``, then ``fstat``:
a regular file owned by the effective uid, ``mode & 0o077 == 0``, in a directory that is not
writable by group or others (and owned by us or root). They are written into an
``O_CREAT | O_EXCL`` temporary file created with mode 0600 (never looser, whatever the umask;
the umask itself is left alone because it is process-wide), fsynced, then ``os.replace``d over
the target, so a crash never leaves a half-written file and a reader never sees one.
Directories are made 0700.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from parnet.auth import sb64
from parnet.auth.srp import (
    DEFAULT_GROUP_INDEX,
    GROUP_1024,
    GROUPS,
    compute_verifier,
)
from parnet.constants import default_srp_dir
from parnet.errors import ConfigError

__all__ = [
    "ServerAuth",
    "VerifierEntry",
    "check_secret_file",
    "keygen_main",
    "load_server_auth",
    "make_private_dir",
    "parallel_generate_srp_data",
    "passwd_conf_text",
    "read_client_password",
    "read_secret_file",
    "write_secret_file",
]

#: Longest accepted ``tpasswd`` / ``tpasswd.conf`` line, newline included (GnuTLS reads lines
#: with a 2 KiB ``fgets`` buffer).
MAX_LINE = 2048
#: Largest secret or conf file read (a passwd line is under 2 KiB; this allows thousands).
MAX_FILE = 16 << 20
#: Salt size written by keygen (as srptool; ``16 % 3 == 1`` avoids the sb64 quirk).
SALT_SIZE = 16
#: Typed passwords shorter than this get a warning.
MIN_PASSWORD_WARN = 12


@dataclass(frozen=True)
class VerifierEntry:
    """One user's line of a ``tpasswd`` file.

    Attributes:
        username: the user name.
        verifier: v = g^x mod N.
        salt: the salt s.
        index: the group's index in ``tpasswd.conf`` (a key of ``srp.GROUPS``).
    """

    username: str
    verifier: int = field(repr=False)
    salt: bytes = field(repr=False)
    index: int


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


# --- safe reading and writing -------------------------------------------------------------------


def _fix_hint(path: Path) -> str:
    return f"chmod 600 {path}"


def _check_dir(directory: Path, for_file: Path) -> None:
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(f"{for_file}: cannot stat its directory {directory}: {exc}") from exc
    if st.st_mode & 0o022:
        raise ConfigError(
            f"{for_file}: its directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); fix: chmod go-w {directory}"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"{for_file}: its directory {directory} is owned by uid {st.st_uid}, not by you "
            f"(uid {os.geteuid()}) or root; move the file to a directory you own"
        )


def _open_checked(path: Path, what: str, *, secret: bool) -> int:
    """Open ``path`` read-only without following a symlink and check it; return the fd."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block us; checked below
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(
                f"{path}: {what} is a symbolic link; refusing it (replace the link by the file)"
            ) from None
        raise ConfigError(f"{path}: cannot open {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: {what} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if secret:
            if st.st_uid != os.geteuid():
                raise ConfigError(
                    f"{path}: {what} is owned by uid {st.st_uid}, not by you "
                    f"(uid {os.geteuid()}); fix: chown {os.geteuid()} {path}"
                )
            if mode & 0o077:
                raise ConfigError(
                    f"{path}: {what} is accessible by group or others (mode {mode:04o}); "
                    f"fix: {_fix_hint(path)}"
                )
        else:
            if st.st_uid not in (os.geteuid(), 0):
                raise ConfigError(f"{path}: {what} is owned by uid {st.st_uid}, not by you or root")
            if mode & 0o022:
                raise ConfigError(
                    f"{path}: {what} is writable by group or others (mode {mode:04o}); "
                    f"fix: chmod go-w {path}"
                )
        if st.st_size > MAX_FILE:
            raise ConfigError(f"{path}: {what} is too large ({st.st_size} bytes)")
        _check_dir(path.parent, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_fd(fd: int, path: Path) -> bytes:
    chunks = []
    total = 0
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_FILE:
                raise ConfigError(f"{path}: file too large")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def check_secret_file(path: str | os.PathLike[str], what: str = "secret file") -> None:
    """Raise ``ConfigError`` (with the fix) unless ``path`` is a safe secret file."""
    os.close(_open_checked(Path(path), what, secret=True))


def read_secret_file(path: str | os.PathLike[str], what: str = "secret file") -> bytes:
    """Read a secret file after the StrictModes-like checks.

    Args:
        path: the file.
        what: how to call it in error messages.

    Returns:
        Its contents.

    Raises:
        ConfigError: missing, a symlink, not a regular file, not owned by the effective uid,
            accessible by group or others, or in a group/other-writable directory. The
            message names the file and the fix.
    """
    p = Path(path)
    return _read_fd(_open_checked(p, what, secret=True), p)


def _read_public_file(path: Path, what: str) -> bytes:
    return _read_fd(_open_checked(path, what, secret=False), path)


def make_private_dir(directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` and missing parents with mode 0700; tighten it if ours and looser.

    Modes are explicit (``mkdir`` then ``chmod``) rather than a temporary ``umask 077``: the
    umask is process-wide, and changing it from a threaded server would race with other
    threads.
    """
    target = Path(directory)
    missing = []
    for d in (target, *target.parents):
        if os.path.isdir(d):
            break
        missing.append(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)
    st = os.stat(target)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(target, 0o700)


def write_temp_file(path: Path, data: bytes, mode: int) -> Path:
    """Writes ``data`` to a new ``O_EXCL | O_NOFOLLOW`` temporary file next to ``path``,
    created with ``mode`` and ``fchmod``ed to exactly that, fsynced; returns its path
    (the caller replaces or links it into place, and removes it on failure)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def write_secret_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``, created with ``mode`` (0600 by default).

    Writes an ``O_CREAT | O_EXCL | O_NOFOLLOW`` temporary file next to it, created with
    ``mode`` (so never more open than that, whatever the umask) and ``fchmod``ed to exactly
    ``mode``, fsyncs it, ``os.replace``s it over ``path`` and fsyncs the directory.
    """
    p = Path(path)
    tmp = write_temp_file(p, data, mode)
    try:
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(p.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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


# --- the server side ----------------------------------------------------------------------------


def _default_passwd() -> Path:
    return Path(default_srp_dir()) / "server" / "passwd"


def load_server_auth(auth_file: str | os.PathLike[str] | None = None) -> ServerAuth:
    """Load a server's verifiers from a GnuTLS ``tpasswd`` file and its ``.conf``.

    Args:
        auth_file: the passwd file; default ``<default_srp_dir()>/server/passwd``. The group
            file is the same path with ``.conf`` appended.

    Returns:
        The loaded ``ServerAuth``. Its ``fake_secret`` is derived from the passwd file's
        contents, so unknown users' fake salts stay the same across restarts until the file
        changes.

    Raises:
        ConfigError: a missing, unsafe or malformed file (bad base64, bad or missing group
            index, a 1024-bit or unknown group, a duplicate user, an over-long line, no users
            at all). The
            message names the file, the line and the fix; the server must not start.
    """
    path = Path(auth_file) if auth_file is not None else _default_passwd()
    conf_path = Path(str(path) + ".conf")
    data = read_secret_file(path, "SRP password file")
    conf = _parse_conf(_read_public_file(conf_path, "SRP group file"), conf_path)
    entries: dict[str, VerifierEntry] = {}
    lines: dict[str, int] = {}
    for number, text in _lines(data, path):
        where = f"{path}, line {number}"
        parts = text.rsplit(":", 3)
        if len(parts) != 4 or not parts[0]:
            raise ConfigError(f"{where}: expected username:verifier:salt:index")
        username, v_text, s_text, i_text = parts
        index = _parse_index(i_text, path, number)
        verifier = int.from_bytes(_decode_field(v_text, path, number, "verifier"), "big")
        salt = _decode_field(s_text, path, number, "salt")
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
    fake_secret = hmac.new(
        hashlib.sha256(data).digest(), b"parnet fake-user secret", hashlib.sha256
    ).digest()
    return ServerAuth(entries, fake_secret, path)


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


# --- keygen -------------------------------------------------------------------------------------


def _check_username(username: str) -> None:
    if not username or not username.strip():
        raise ValueError("the user name must not be empty")
    if any(c in username for c in ":\n\r\x00"):
        raise ValueError("the user name must not contain ':', newlines or NUL")
    if len(username.encode("utf-8")) > 256:
        raise ValueError("the user name is too long (at most 256 UTF-8 bytes)")


def _ask_password(username: str) -> str:
    """Prompt at a terminal, or read one line when stdin is not a terminal ('' = random)."""
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        import getpass

        first = getpass.getpass(f"Password for {username} (empty: random): ")
        if first:
            again = getpass.getpass("Repeat the password: ")
            if again != first:
                raise ValueError("the passwords do not match")
        return first
    if stdin is None:
        return ""
    line = stdin.readline()
    return line.rstrip("\n").rstrip("\r")


def parallel_generate_srp_data(
    username: str,
    *,
    unattended: bool = True,
    password: str | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> Path:
    """Write SRP verifier data for ``username`` (``parnet keygen``).

    Writes ``<dir>/server/passwd`` (the user's line replaced, others kept),
    ``<dir>/server/passwd.conf`` (RFC 5054 groups) and, if ``unattended``,
    ``<dir>/client/user_passwd``. Secret files are 0600 and directories 0700.

    Args:
        username: the user name (no ':', newline or NUL).
        unattended: also write the client's password file, so clients log in without a
            prompt. With ``False`` and a random password, the password is printed on stderr
            (it would otherwise be lost).
        password: the password; ``None`` prompts at a terminal, or reads one line from
            standard input when it is not a terminal. Empty means a random one
            (``secrets.token_urlsafe(24)``). A chosen password shorter than 12 characters
            gets a warning.
        directory: default ``$PARNET_HOME/srp``.

    Returns:
        The directory written to.

    Raises:
        ValueError: a bad user name or password, or mismatched typed passwords.
        ConfigError: an existing passwd file is unsafe (fix it as the message says).
    """
    _check_username(username)
    if password is None:
        password = _ask_password(username)
    generated = not password
    if generated:
        password = secrets.token_urlsafe(24)
    elif any(c in password for c in "\n\r\x00"):
        raise ValueError("the password must not contain newlines or NUL")
    elif len(password) < MIN_PASSWORD_WARN:
        warnings.warn(
            f"the password for {username!r} is shorter than {MIN_PASSWORD_WARN} characters; "
            "an empty password makes a strong random one",
            UserWarning,
            stacklevel=2,
        )

    base = Path(directory) if directory is not None else Path(default_srp_dir())
    server_dir = base / "server"
    make_private_dir(base)
    make_private_dir(server_dir)
    passwd = server_dir / "passwd"

    N, g = GROUPS[DEFAULT_GROUP_INDEX]
    salt = secrets.token_bytes(SALT_SIZE)
    verifier = compute_verifier(username, password, salt, N, g)
    new_line = (
        f"{username}:{sb64.encode(_int_bytes(verifier))}:{sb64.encode(salt)}:{DEFAULT_GROUP_INDEX}"
    )

    kept: list[str] = []
    replaced = False
    if os.path.lexists(passwd):
        old = read_secret_file(passwd, "SRP password file").decode("utf-8", "surrogateescape")
        for line in old.split("\n"):
            if not line.strip():
                continue
            if line.rstrip("\r").rsplit(":", 3)[0] == username:
                if not replaced:
                    kept.append(new_line)
                    replaced = True
                continue
            kept.append(line)
    if not replaced:
        kept.append(new_line)
    text = "".join(line + "\n" for line in kept)
    write_secret_file(passwd, text.encode("utf-8", "surrogateescape"))

    conf = server_dir / "passwd.conf"
    conf_text = passwd_conf_text().encode()
    current = None
    with contextlib.suppress(OSError, ConfigError):
        current = _read_public_file(conf, "SRP group file")
    if current != conf_text:
        write_secret_file(conf, conf_text)

    if unattended:
        client_dir = base / "client"
        make_private_dir(client_dir)
        write_secret_file(client_dir / "user_passwd", f"{username}:{password}\n".encode())
    elif generated:
        print(f"parnet: generated password for {username}: {password}", file=sys.stderr)
    return base


def keygen_main(argv: list[str]) -> int:
    """``parnet keygen USERNAME [--no-client-file] [--dir D]``.

    Args:
        argv: the arguments after ``keygen``.

    Returns:
        The exit status: 0 on success, 1 on an error (printed on stderr), 2 on bad usage.
    """
    parser = argparse.ArgumentParser(
        prog="parnet keygen",
        description=(
            "Write SRP verifier data for a user: server/passwd and server/passwd.conf "
            "(GnuTLS srptool format) and client/user_passwd. Prompts for a password "
            "(empty: random); reads one line from standard input when it is not a terminal."
        ),
    )
    parser.add_argument("username", metavar="USERNAME")
    parser.add_argument(
        "--no-client-file",
        action="store_true",
        help="do not write client/user_passwd (clients will need the password)",
    )
    parser.add_argument(
        "--dir", metavar="D", default=None, help="output directory (default $PARNET_HOME/srp)"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        base = parallel_generate_srp_data(
            args.username, unattended=not args.no_client_file, directory=args.dir
        )
    except (ValueError, ConfigError, OSError) as exc:
        print(f"parnet keygen: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("parnet keygen: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {base / 'server' / 'passwd'}")
    print(f"wrote {base / 'server' / 'passwd.conf'}")
    if not args.no_client_file:
        print(f"wrote {base / 'client' / 'user_passwd'}")
    return 0
