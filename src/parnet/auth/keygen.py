"""``parnet keygen`` (``parallel_generate_srp_data``): new users' SRP data, written under
``$PARNET_HOME/srp`` in the formats of ``auth.keyfile`` through ``transport.files``."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import warnings
from pathlib import Path

from parnet.auth.keyfile import SALT_SIZE, passwd_conf_text, passwd_with_user, verifier_line
from parnet.constants import default_srp_dir
from parnet.errors import ConfigError
from parnet.transport.files import (
    make_private_dir,
    read_public_file,
    read_secret_file,
    write_secret_file,
)

__all__ = ["keygen_main", "parallel_generate_srp_data"]

#: Typed passwords shorter than this get a warning.
MIN_PASSWORD_WARN = 12


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

    new_line = verifier_line(username, password, secrets.token_bytes(SALT_SIZE))
    old = ""
    if os.path.lexists(passwd):
        old = read_secret_file(passwd, "SRP password file").decode("utf-8", "surrogateescape")
    text = passwd_with_user(old, username, new_line)
    write_secret_file(passwd, text.encode("utf-8", "surrogateescape"))

    conf = server_dir / "passwd.conf"
    conf_text = passwd_conf_text().encode()
    current = None
    with contextlib.suppress(OSError, ConfigError):
        current = read_public_file(conf, "SRP group file")
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
