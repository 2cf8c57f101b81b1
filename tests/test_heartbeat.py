"""transport/heartbeat.py, the decision layer: what the kernel's view of a peer (``TCP_INFO``)
makes of it, beat by beat.

A busy peer whose kernel acknowledges is never dead; one that stopped acknowledging is declared
dead once it has been silent for the timeout less two beats, not before; a connection the kernel
ended after unanswered probes is dead, one ended by a reset is the reader's to report. The
links here are scripted stand-ins for ``Link`` that return chosen kernel states: the real
links and cut cables are in test_liveness.py and tests/hosts/."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from helpers import wait_until
from parnet.transport import heartbeat as hb
from parnet.transport.heartbeat import PeerState
from parnet.wire import messages as msg

TIMEOUT = 0.4  # beat 0.05 s: dead after 0.3 s of silence


class ScriptedLink:
    """What the monitor uses of a ``Link``, with a kernel state set by the test."""

    def __init__(self, name: str = "srv1 (node 1)") -> None:
        self.name = name
        self.sends = 0
        self.queued = False
        self.usable = True
        self.keepalive_timeout: float | None = None
        self.sent: list[int] = []
        self.dead: list[str] = []
        self.last_ack = time.monotonic()
        self.unacked = 0
        self.probes = 0
        self.ended = False
        self.unanswered = False
        self.tcp = True

    def keepalive(self, timeout: float) -> None:
        self.keepalive_timeout = timeout

    def send_frame(self, code: int, *args: object) -> None:
        self.sent.append(code)
        self.sends += 1

    def peer_state(self) -> PeerState | None:
        if not self.tcp:
            return None
        silence = time.monotonic() - self.last_ack
        return PeerState(self.ended, self.unanswered, self.unacked, self.probes, silence)

    def declare_dead(self, reason: str) -> None:
        self.dead.append(reason)
        self.usable = False


@pytest.fixture()
def monitor() -> Iterator[hb.Monitor]:
    """A monitor of its own (not the process's); its thread is parked when the test ends."""
    m = hb.Monitor()
    yield m
    with m._lock:
        m._entries.clear()
        m._tasks.clear()
    m.interval = 3600.0
    m._wake.set()


def entry(link: ScriptedLink, timeout: float = TIMEOUT) -> hb._Entry:
    return hb._Entry(link, timeout, None)


def test_quiet_healthy_link_is_alive(monitor: hb.Monitor) -> None:
    link = ScriptedLink()
    e = entry(link)
    for _ in range(3):
        assert monitor.check(e) is None
    assert e.waiting is None  # nothing unanswered: no wait started
    link.probes = 1  # one keepalive probe in flight is normal
    assert monitor.check(e) is None and e.waiting is None
    link.tcp, link.unacked = False, 3  # no kernel view (not TCP): never declared dead
    assert monitor.check(e) is None and e.waiting is None


def test_busy_peer_that_acknowledges_is_never_dead(monitor: hb.Monitor) -> None:
    """Data stays unacknowledged (its receive queue is full), but its kernel keeps answering."""
    link = ScriptedLink()
    link.unacked = 5
    e = entry(link)
    end = time.monotonic() + 3 * TIMEOUT
    while time.monotonic() < end:
        link.last_ack = time.monotonic()
        assert monitor.check(e) is None
        time.sleep(hb.beat(TIMEOUT))  # one beat, as the monitor's thread does


def test_silent_peer_is_dead_after_the_timeout_less_two_beats(monitor: hb.Monitor) -> None:
    link = ScriptedLink()
    e = entry(link)
    assert monitor.check(e) is None
    link.unacked = 1  # a segment sent, never acknowledged from now on
    start = time.monotonic()
    reason = wait_until(lambda: monitor.check(e), 10, "the silent peer to be declared dead")
    assert time.monotonic() - start >= TIMEOUT - 2 * hb.beat(TIMEOUT)
    assert reason.startswith("no sign of life from srv1 (node 1) for ")
    assert "machine or network gone" in reason


def test_an_answer_starts_the_wait_again(monitor: hb.Monitor) -> None:
    link = ScriptedLink()
    link.probes = 2  # a second unanswered keepalive probe: waiting
    e = entry(link)
    assert monitor.check(e) is None
    first = e.waiting
    assert first is not None
    wait_until(lambda: time.monotonic() - first > TIMEOUT / 2, 5, "half the timeout")
    link.last_ack = time.monotonic()  # the peer's kernel answered meanwhile
    assert monitor.check(e) is None
    assert e.waiting is not None and e.waiting > first


def test_kernel_ended_connection(monitor: hb.Monitor) -> None:
    link = ScriptedLink()
    link.ended = True  # e.g. a reset: the reader reports it, not the heartbeat
    assert monitor.check(entry(link)) is None
    link.unanswered = True  # keepalive gave up
    reason = monitor.check(entry(link))
    assert reason == hb.silence_reason(link.name, TIMEOUT)


def test_quiet_link_is_pinged_only_when_keepalive_is_too_coarse(monitor: hb.Monitor) -> None:
    fine, coarse = ScriptedLink(), ScriptedLink()
    e_fine, e_coarse = entry(fine, 10.0), entry(coarse, 1.5)  # keepalive: 2 s x 4; 1 s x 1
    assert not e_fine.ping and e_coarse.ping
    for _ in range(3):
        monitor.check(e_fine)
        monitor.check(e_coarse)
    assert fine.sent == []
    assert coarse.sent == [msg.PING, msg.PING]  # from the second beat on, one per quiet beat
    coarse.sends += 1  # the link sent a frame of its own: no ping needed
    monitor.check(e_coarse)
    coarse.queued = True  # data waiting to be written is in flight too
    monitor.check(e_coarse)
    assert coarse.sent == [msg.PING, msg.PING]


def test_monitor_declares_calls_back_and_keeps_beating(
    monitor: hb.Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="parnet.transport.heartbeat")
    beats = []
    calls: list[tuple[object, str]] = []
    done = threading.Event()

    def broken_task() -> None:
        raise RuntimeError("task bug")

    def on_dead(link: object, reason: str) -> None:
        calls.append((link, reason))
        done.set()
        raise RuntimeError("callback bug")

    monitor.add_task(broken_task)
    monitor.add_task(lambda: beats.append(1))
    link = ScriptedLink()
    link.unacked = 1
    monitor.watch(link, TIMEOUT, on_dead)
    assert link.keepalive_timeout == TIMEOUT and monitor.interval == hb.beat(TIMEOUT)
    assert done.wait(10), "the silent link was not declared dead"
    [(who, reason)] = calls
    assert who is link and link.dead == [reason] and "no sign of life" in reason
    n = len(beats)
    wait_until(lambda: len(beats) > n + 1, 10, "more beats after the failed callback")
    assert id(link) not in monitor._entries  # declared once, then no longer watched
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.endswith(": declared dead") for m in messages)
    assert "heartbeat callback failed" in messages and "periodic task failed" in messages


def test_kernel_view_of_real_sockets() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    u1, u2 = socket.socketpair()
    try:
        a.sendall(b"x")
        assert b.recv(1) == b"x"
        st = wait_until(lambda: (s := hb.peer_state(a)) and s.unacked == 0 and s, 10, "the ack")
        assert not st.ended and not st.unanswered and st.probes == 0 and st.silence < 60
        hb.set_keepalive(u1, 10)  # not TCP: nothing to set, no error
        assert u1.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert hb.peer_state(u1) is None
        a.close()
        assert hb.peer_state(a) is None  # closed: cannot be told
    finally:
        for s in (a, b, srv, u1, u2):
            s.close()


@pytest.mark.parametrize("bad", ["10", None, True, float("nan"), float("inf"), 0, -1])
def test_check_timeout_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="heartbeat must be a number of seconds > 0"):
        hb.check_timeout(bad)
