"""transport/files.py: the StrictModes-like checks, atomic writes that leave nothing behind when
they fail, private directories and pid files (live owner kept, stale or garbage replaced)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from parnet.errors import ConfigError
from parnet.transport import files

ROOT = os.geteuid() == 0
OTHER_UID = 12345


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def secret(path: Path, data: bytes = b"s3cret\n") -> Path:
    files.write_secret_file(path, data)
    return path


def test_secret_file_checks_name_the_file_and_the_fix(tmp_path: Path) -> None:
    p = secret(tmp_path / "key")
    files.check_secret_file(p)  # a private file of ours in a private directory passes
    assert files.read_secret_file(p) == b"s3cret\n"
    os.chmod(p, 0o640)
    with pytest.raises(ConfigError, match=f"mode 0640.*chmod 600 {p}"):
        files.check_secret_file(p, "the key")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'}: the key not found"):
        files.check_secret_file(tmp_path / "nope", "the key")


def test_path_through_a_file_is_refused_with_the_os_reason(tmp_path: Path) -> None:
    p = secret(tmp_path / "key")
    with pytest.raises(ConfigError, match="cannot open secret file: Not a directory"):
        files.read_secret_file(p / "inside")


def test_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    p = secret(tmp_path / "big")
    os.truncate(p, files.MAX_FILE + 1)  # sparse: nothing is written
    with pytest.raises(ConfigError, match=rf"too large \({files.MAX_FILE + 1} bytes\)"):
        files.read_secret_file(p)
    with pytest.raises(ConfigError, match="too large"):
        files.read_public_file(p)


@pytest.mark.skipif(not ROOT, reason="needs root to chown")
def test_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o755)
    p = secret(d / "key")
    os.chown(d, OTHER_UID, -1)
    with pytest.raises(ConfigError, match=f"owned by uid {OTHER_UID}.*move the file"):
        files.read_secret_file(p)
    with pytest.raises(ConfigError, match=f"owned by uid {OTHER_UID}"):
        files.read_public_file(p)


@pytest.mark.skipif(not ROOT, reason="needs root to chown")
def test_public_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "conf"
    p.write_text("x = 1\n")
    os.chmod(p, 0o644)
    assert files.read_public_file(p) == b"x = 1\n"  # readable by all is fine for a public file
    os.chown(p, OTHER_UID, -1)
    with pytest.raises(ConfigError, match=f"owned by uid {OTHER_UID}, not by you or root"):
        files.read_public_file(p)


def test_make_private_dir_creates_each_level_0700_and_tightens_ours(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    files.make_private_dir(deep)
    for d in (tmp_path / "a", tmp_path / "a" / "b", deep):
        assert mode(d) == 0o700, d
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    files.make_private_dir(loose)
    assert mode(loose) == 0o700


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = secret(tmp_path / "key", b"old")
    with pytest.raises(TypeError):
        files.write_secret_file(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["key"]


def test_failed_replace_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "child").write_text("keep")
    with pytest.raises(OSError):
        files.write_secret_file(target, b"data")  # a non-empty directory cannot be replaced
    assert (target / "child").read_text() == "keep"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["taken"]


def test_publish_file_never_replaces(tmp_path: Path) -> None:
    p = tmp_path / "name"
    assert files.publish_file(p, b"first", 0o600)
    assert not files.publish_file(p, b"second", 0o600)
    assert p.read_bytes() == b"first" and mode(p) == 0o600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["name"]


@pytest.fixture()
def live_pid():
    """A process of ours that runs until the test ends (stopped by pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    yield proc.pid
    proc.stdin.close()  # type: ignore[union-attr]
    proc.wait(timeout=30)


def test_pid_file_of_a_live_process_is_kept(tmp_path: Path, live_pid: int) -> None:
    p = tmp_path / "server.pid"
    assert files.write_pid_file(p, live_pid) == 0
    assert files.read_pid_file(p) == live_pid and mode(p) == 0o600
    assert files.write_pid_file(p, os.getpid()) == live_pid  # owned by a live process
    assert files.read_pid_file(p) == live_pid
    assert files.write_pid_file(p, live_pid) == 0  # the owner itself may rewrite it


def test_stale_or_garbage_pid_file_is_replaced(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = int(done.stdout)  # exited and reaped
    p = tmp_path / "server.pid"
    p.write_text(f"{gone}\n")
    assert not files.pid_alive(gone)
    assert files.write_pid_file(p, os.getpid()) == 0
    assert files.read_pid_file(p) == os.getpid()
    p.write_text("not a pid\n")
    assert files.write_pid_file(p, os.getpid()) == 0
    assert p.read_text() == f"{os.getpid()}\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["server.pid"]


def test_zombie_counts_as_gone_and_reap_collects_it(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = proc.pid
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, left a zombie
    assert os.path.exists(f"/proc/{pid}") and not files.pid_alive(pid)
    assert not files.pid_alive(pid, reap=True)
    assert not os.path.exists(f"/proc/{pid}")
    proc.returncode = 0  # reaped above: Popen must not wait for it again
