"""The server's log: a size-bounded file opened without following symlinks, and refusals
rate-limited and summed up so that a flood of junk connections cannot fill the disk.

* ``LogFile``: a ``RotatingFileHandler`` (``LOG_MAX_BYTES`` per file, ``LOG_BACKUPS`` old
  files) that opens its file with ``O_NOFOLLOW`` and mode 0600. Only the daemon rotates; a
  forked worker never does, and reopens the file when the daemon has rotated it.
* ``RefusalLog``: the first ``LOG_LINES_PER_SOURCE`` refusals of each source address in a
  ``LOG_WINDOW`` are logged as they come; the rest are counted, and ``flush`` (called by the
  daemon's loop) writes one line per busy source at the window's end: "refused 9554
  connections from 127.0.0.5 in the last 10 s (last: ...)". At most ``_SUMMARY_SOURCES``
  such lines per window; the others are summed up in one line.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import time

from ..constants import LOG_BACKUPS, LOG_LINES_PER_SOURCE, LOG_MAX_BYTES, LOG_WINDOW

_SUMMARY_SOURCES = 8
_MAX_SOURCES = 4096  # sources tracked per window (bounded memory); the rest count as "others"


def open_log_fd(path: str) -> int:
    """``path`` opened for appending (created 0600); never through a symbolic link.

    Raises:
        OSError: ``ELOOP`` if ``path`` is a symbolic link.
    """
    return os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )


class LogFile(logging.handlers.RotatingFileHandler):
    """The server's log file (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.owner = os.getpid()
        self._ino = -1
        super().__init__(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")

    def _open(self):  # noqa: ANN202 - logging's own signature
        fd = open_log_fd(self.baseFilename)
        self._ino = os.fstat(fd).st_ino
        return os.fdopen(fd, "a", encoding="utf-8")

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 - logging's name
        """Only the daemon rotates; a worker follows a rotation by reopening the file."""
        if os.getpid() == self.owner:
            return bool(super().shouldRollover(record))
        try:
            moved = os.stat(self.baseFilename).st_ino != self._ino
        except OSError:
            moved = True
        if moved and self.stream is not None:
            self.stream.close()
            self.stream = None  # reopened by emit()
        return False


class RefusalLog:
    """Rate-limited, aggregated log lines about refused connections (module docstring)."""

    def __init__(self, log: logging.Logger, window: float = LOG_WINDOW) -> None:
        self.log = log
        self.window = window
        self.started = time.monotonic()
        self.counts: dict[str, int] = {}
        self.last: dict[str, str] = {}
        self.others = 0

    def note(self, ip: str, text: str, level: int = logging.WARNING) -> None:
        """One refused (or closed, or evicted) connection from ``ip``; ``text`` is its line."""
        if time.monotonic() - self.started >= self.window:
            self.flush()
        n = self.counts.get(ip)
        if n is None and len(self.counts) >= _MAX_SOURCES:
            self.others += 1
            return
        n = (n or 0) + 1
        self.counts[ip] = n
        if n <= LOG_LINES_PER_SOURCE:
            self.log.log(level, "%s", text)
        else:
            self.last[ip] = text

    def flush(self, force: bool = False) -> None:
        """Writes the summary of the window if it has ended (or ``force``), and starts a new one."""
        now = time.monotonic()
        if not force and now - self.started < self.window:
            return
        secs = max(now - self.started, 0.001)
        busy = sorted(
            ((n, ip) for ip, n in self.counts.items() if n > LOG_LINES_PER_SOURCE), reverse=True
        )
        for n, ip in busy[:_SUMMARY_SOURCES]:
            self.log.warning(
                "refused %d connections from %s in the last %.0f s (%d logged; last: %s)",
                n,
                ip,
                secs,
                LOG_LINES_PER_SOURCE,
                self.last.get(ip, "?"),
            )
        rest = sum(n for n, _ in busy[_SUMMARY_SOURCES:])
        if rest or self.others:
            self.log.warning(
                "refused %d connections from %d other busy addresses, and %d from addresses "
                "not tracked, in the last %.0f s",
                rest,
                len(busy[_SUMMARY_SOURCES:]),
                self.others,
                secs,
            )
        self.started = now
        self.counts.clear()
        self.last.clear()
        self.others = 0
