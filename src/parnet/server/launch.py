"""Starting a daemon in the background and waiting until it listens (or says why not)."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

from ..errors import ParnetError
from ..transport import files
from .daemon import default_log_file, effective_bind, kill_server
from .logs import open_log_fd


def server_argv(
    *,
    use_tls: bool = True,
    auth_file: str | None = None,
    cmd_port: int = 12502,
    data_port: int = 12501,
    bind: str | None = None,
    allow_root: bool = False,
    log_file: str | None = None,
) -> list[str]:
    """The ``parnet server`` options for these settings."""
    argv = ["--cmd-port", str(cmd_port), "--data-port", str(data_port)]
    if not use_tls:
        argv.append("--no-tls")
    if auth_file:
        argv += ["--auth-file", str(auth_file)]
    if bind:
        argv += ["--bind", bind]
    if allow_root:
        argv.append("--allow-root")
    if log_file:
        argv += ["--log-file", str(log_file)]
    return argv


def start_background(timeout: float = 30.0, **opts: object) -> int:
    """Starts ``parnet server --foreground`` detached; returns its pid once it listens.

    Raises:
        ParnetError: with the server's own message when it could not start.
    """
    from ..checks import port

    cmd_port = port(opts.get("cmd_port", 12502), "parnet server: cmd_port")
    if port(opts.get("data_port", 12501), "parnet server: data_port") == cmd_port:
        raise ValueError(f"parnet server: cmd_port and data_port must differ (both are {cmd_port})")
    r, w = os.pipe()
    bind = effective_bind(opts.get("bind"), bool(opts.get("use_tls", True)))  # type: ignore[arg-type]
    log_file = str(opts.get("log_file") or default_log_file(bind, cmd_port))
    argv = [
        sys.executable,
        "-m",
        "parnet",
        "server",
        "--foreground",
        "--ready-fd",
        str(w),
        *server_argv(**opts),  # type: ignore[arg-type]
    ]
    try:
        errf = os.fdopen(open_log_fd(str(log_file)), "ab")
    except OSError as e:
        os.close(r)
        os.close(w)
        raise ParnetError(
            f"parnet server: cannot open the log file {log_file}: {e.strerror or e}"
        ) from None
    with errf:
        os.fchmod(errf.fileno(), 0o600)
        proc = subprocess.Popen(
            argv,
            pass_fds=(w,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errf,
            close_fds=True,
        )
    os.close(w)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
    lines = out.decode(errors="replace").strip().splitlines()
    for line in lines:
        if line.startswith("warn: "):  # e.g. no TLS: the terminal that starts it shows them
            print(f"parnet server: {line.removeprefix('warn: ')}", file=sys.stderr)
    text = "\n".join(line for line in lines if not line.startswith("warn: "))
    if text.startswith("ok"):
        return proc.pid
    if proc.poll() is None and not text:
        with contextlib.suppress(OSError):
            proc.kill()
        raise ParnetError(f"parnet server did not start within {timeout} s (log: {log_file})")
    code = proc.wait(timeout=5) if proc.poll() is None else proc.returncode
    raise ParnetError(
        text.removeprefix("error: ") or f"parnet server exited with status {code} (log: {log_file})"
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child is reaped and counts as gone)."""
    return files.pid_alive(pid, reap=True)


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Stops a server by pid: SIGTERM, wait up to ``timeout``, then SIGKILL."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def pserver(
    *args: str,
    use_tls: bool = True,
    auth_file: str | None = None,
    cmd_port: int = 12502,
    data_port: int = 12501,
    bind: str | None = None,
    allow_root: bool = False,
) -> None:
    """Starts a server daemon in the background, or stops one with ``pserver("kill")``.

    Starting returns once the daemon listens on both ports; it keeps running after this
    process exits (``parnet server`` does the same from a shell). ``pserver("kill")`` stops
    the server that matches ``bind``/``cmd_port``, found through its pid file.

    Args:
        *args: nothing, or ``"kill"``.
        use_tls: TLS 1.3 + SRP authentication; ``False`` has none (binds 127.0.0.1 unless
            ``bind`` is given).
        auth_file: the SRP passwd file (default ``$PARNET_HOME/srp/server/passwd``).
        cmd_port: the command port.
        data_port: the data port.
        bind: the address to listen on (default: all with TLS, 127.0.0.1 without).
        allow_root: run even as root (clients' code then runs as root).

    Raises:
        ParnetError: it could not start (the daemon's own message: port in use, no auth data,
            running as root without ``allow_root``), or there is no server to kill.
    """
    if args:
        if args != ("kill",):
            raise ValueError(f"pserver: unknown arguments {args!r} (only 'kill')")
        kill_server(cmd_port, bind)
        return
    start_background(
        use_tls=use_tls,
        auth_file=auth_file,
        cmd_port=cmd_port,
        data_port=data_port,
        bind=bind,
        allow_root=allow_root,
    )
