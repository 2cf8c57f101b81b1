"""Hardened file I/O: secret files, atomic publishing, pid files and the runtime directory.

Secret files are checked like ssh's StrictModes: opened with ``O_NOFOLLOW``, then ``fstat``:
a regular file owned by the effective uid, ``mode & 0o077 == 0``, in a directory that is not
writable by group or others (and owned by us or root). They are written into an
``O_CREAT | O_EXCL`` temporary file created with the target's mode (never looser, whatever
the umask; the umask itself is left alone because it is process-wide), fsynced, then
``os.replace``d over the target (``write_secret_file``) or hard-linked to it if the name is
free (``publish_file``, ``write_pid_file``), so a crash never leaves a half-written file and
a reader never sees one. Directories are made 0700.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from ..errors import ConfigError

#: Largest secret or conf file read (a passwd line is under 2 KiB; this allows thousands).
MAX_FILE = 16 << 20


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


def read_public_file(path: str | os.PathLike[str], what: str = "file") -> bytes:
    """Reads a non-secret file that must not be writable by others (owned by us or root)."""
    path = Path(path)
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


def write_temp_file(path: Path, data: bytes, mode: int, *, fsync: bool = True) -> Path:
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
        if fsync:
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


def publish_file(
    path: str | os.PathLike[str], data: bytes, mode: int, *, fsync: bool = True
) -> bool:
    """Creates ``path`` with ``data`` unless it exists; True if this call created it.

    The content goes to an ``O_EXCL`` temporary file, is fsynced, then hard-linked to ``path``
    (atomic, and fails if ``path`` exists), so ``path`` never appears half-written.
    """
    p = Path(path)
    tmp = write_temp_file(p, data, mode, fsync=fsync)
    try:
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# --- processes and pid files --------------------------------------------------------------------


def runtime_dir() -> str:
    """A private directory for pid files: ``$XDG_RUNTIME_DIR/parnet`` or ``~/.local/state/parnet``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        d = os.path.join(base, "parnet")
    else:
        d = os.path.join(os.path.expanduser("~"), ".local", "state", "parnet")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{d}: runtime directory must be owned by you and private (chmod 700 {d})"
        )
    return d


def pid_alive(pid: int, *, reap: bool = False) -> bool:
    """True while ``pid`` runs; a zombie counts as gone. With ``reap``, a child of ours that
    has exited is reaped first (so it does not linger as a zombie)."""
    if reap:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return False
        except ChildProcessError:
            pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def read_pid_file(path: str | os.PathLike[str]) -> int:
    """The pid in ``path``.

    Raises:
        OSError: it cannot be read. ValueError: it holds no pid.
    """
    with open(path) as f:
        return int(f.read().strip())


def write_pid_file(path: str | os.PathLike[str], pid: int) -> int:
    """Publishes ``pid`` in ``path`` atomically (a complete file appears under its name or
    none) unless a live process owns it already; a stale file (its pid gone) is replaced.

    Returns:
        0 once written, else the pid of the live process that owns the file.
    """
    while True:
        if publish_file(path, f"{pid}\n".encode(), 0o600, fsync=False):  # a pid needs no fsync
            return 0
        try:
            old = read_pid_file(path)
        except (OSError, ValueError):
            old = 0
        if old and old != pid and pid_alive(old):
            return old
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
