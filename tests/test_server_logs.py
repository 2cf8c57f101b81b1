"""server/logs.py: a flood of refusals from many addresses stays a bounded number of lines, and
a worker's handler follows the daemon's rotation instead of writing to the moved file."""

from __future__ import annotations

import logging
from pathlib import Path

from parnet.constants import LOG_LINES_PER_SOURCE
from parnet.server import logs


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def logger(name: str) -> tuple[logging.Logger, Lines]:
    lg = logging.getLogger(f"parnet.test-{name}")
    lg.propagate = False
    lg.handlers.clear()
    h = Lines()
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    return lg, h


def test_flood_from_many_addresses_is_summed_up() -> None:
    lg, h = logger("flood")
    rl = logs.RefusalLog(lg, window=3600)
    busy = [f"10.0.0.{k}" for k in range(logs._SUMMARY_SOURCES + 2)]
    for ip in busy:
        for n in range(LOG_LINES_PER_SOURCE + 5):
            rl.note(ip, f"refused {ip} #{n}")
    assert len(h.lines) == len(busy) * LOG_LINES_PER_SOURCE  # the rest is counted only
    for k in range(logs._MAX_SOURCES - len(busy)):
        rl.note(f"10.1.{k // 250}.{k % 250}", "once")
    logged = len(h.lines)
    for k in range(7):  # sources beyond the tracked ones: counted, never logged
        rl.note(f"10.9.9.{k}", "untracked")
    assert len(h.lines) == logged and rl.others == 7
    h.lines.clear()
    rl.flush()  # the window has not ended: nothing yet
    assert h.lines == []
    rl.flush(force=True)
    per_source, rest = h.lines[:-1], h.lines[-1]
    assert len(per_source) == logs._SUMMARY_SOURCES
    n = LOG_LINES_PER_SOURCE + 5
    assert per_source[0].startswith(f"refused {n} connections from 10.0.0.9 in the last ")
    assert per_source[0].endswith(
        f"({LOG_LINES_PER_SOURCE} logged; last: refused 10.0.0.9 #{n - 1})"
    )
    assert rest.startswith(f"refused {2 * n} connections from 2 other busy addresses, and 7 ")
    # a new window starts empty
    h.lines.clear()
    rl.note("10.9.9.0", "again")
    assert h.lines == ["again"] and rl.others == 0


def test_worker_handler_follows_the_daemons_rotation(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    h = logs.LogFile(str(path))
    h.setFormatter(logging.Formatter("%(message)s"))
    h.owner = -1  # as in a forked worker: the daemon (another process) owns the rotation
    try:
        h.emit(logging.makeLogRecord({"msg": "before"}))
        path.rename(tmp_path / "server.log.1")  # the daemon rotated
        h.emit(logging.makeLogRecord({"msg": "after"}))
        h.emit(logging.makeLogRecord({"msg": "again"}))
    finally:
        h.close()
    assert (tmp_path / "server.log.1").read_text() == "before\n"
    assert path.read_text() == "after\nagain\n"
    assert path.stat().st_mode & 0o077 == 0
