"""The ``parnet`` command: ``server``, ``keygen``, ``demo``, and ``up``/``down``/``status`` over ssh."""

from __future__ import annotations

import argparse
import os
import sys

from .constants import CMD_PORT, DATA_PORT


def _port_arg(text: str) -> int:
    from .checks import port

    try:
        return port(text, "port")
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("port: ")) from None


def _log_file_problem(path: str) -> str:
    """Why the server could not write its log to ``path`` ("" if it can)."""
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path):
        return "" if os.access(path, os.W_OK) else "not writable"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    return "" if os.access(parent, os.W_OK | os.X_OK) else f"directory {parent} is not writable"


def _server(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="parnet server", description="Start (or --kill) a parnet server."
    )
    ap.add_argument(
        "--no-tls",
        action="store_true",
        help="no TLS/authentication (binds 127.0.0.1 unless --bind)",
    )
    ap.add_argument("--auth-file", help="SRP passwd file (default $PARNET_HOME/srp/server/passwd)")
    ap.add_argument(
        "--cmd-port", type=_port_arg, default=CMD_PORT, help=f"command port (default {CMD_PORT})"
    )
    ap.add_argument(
        "--data-port", type=_port_arg, default=DATA_PORT, help=f"data port (default {DATA_PORT})"
    )
    ap.add_argument(
        "--bind", help="address to listen on (default: all with TLS, 127.0.0.1 without)"
    )
    ap.add_argument(
        "--foreground", action="store_true", help="do not detach (for service managers)"
    )
    ap.add_argument(
        "--allow-root", action="store_true", help="run even as root (clients' code runs as root)"
    )
    ap.add_argument("--log-file", help="log file (default: in the private runtime directory)")
    ap.add_argument(
        "--kill", action="store_true", help="stop the server matching --bind/--cmd-port"
    )
    ap.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from .errors import ParnetError

    if a.cmd_port == a.data_port and not a.kill:
        ap.error(f"--cmd-port and --data-port must differ (both are {a.cmd_port})")
    if a.log_file:
        why = _log_file_problem(a.log_file)
        if why:
            ap.error(f"--log-file {a.log_file}: {why}")

    if a.kill:
        from .server.daemon import kill_server

        try:
            pid = kill_server(a.cmd_port, a.bind)
        except ParnetError as e:
            print(f"parnet server --kill: {e}", file=sys.stderr)
            return 1
        print(f"stopped parnet server (pid {pid})")
        return 0
    options = {
        "use_tls": not a.no_tls,
        "auth_file": a.auth_file,
        "cmd_port": a.cmd_port,
        "data_port": a.data_port,
        "bind": a.bind,
        "allow_root": a.allow_root,
        "log_file": a.log_file,
    }
    if not a.foreground:
        from .server.launch import start_background

        try:
            pid = start_background(**options)
        except ParnetError as e:
            print(f"parnet server: {e}", file=sys.stderr)
            return 1
        from .server.daemon import default_log_file, effective_bind

        log = a.log_file or default_log_file(effective_bind(a.bind, not a.no_tls), a.cmd_port)
        print(
            f"parnet server started (pid {pid}) on {a.bind or ('all addresses' if not a.no_tls else '127.0.0.1')}"
            f", ports {a.cmd_port}/{a.data_port}, TLS {'off' if a.no_tls else 'on'}; log: {log}"
        )
        return 0
    from .server.daemon import Daemon

    d = Daemon(**options)
    try:
        d.prepare()
    except (ParnetError, OSError) as e:
        msg = str(e)
        if a.ready_fd is not None:
            os.write(a.ready_fd, f"error: {msg}\n".encode())
            os.close(a.ready_fd)
        print(f"parnet server: {msg}", file=sys.stderr)
        return 1
    if a.ready_fd is not None:  # warnings first: the starting terminal shows them
        os.write(
            a.ready_fd,
            "".join(f"warn: {w}\n" for w in d.warnings).encode() + f"ok {os.getpid()}\n".encode(),
        )
        os.close(a.ready_fd)
    d.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``parnet`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    usage = (
        "usage: parnet {server,keygen,demo,up,down,status,forget-server} [options]   "
        "(parnet CMD --help for each)\n"
        "       parnet --version"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .wire.messages import versions

        v = versions()
        print(
            f"parnet {v['parnet']} (Python {v['python']}, cloudpickle {v['cloudpickle']}, numpy {v['numpy']})"
        )
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "server":
        return _server(rest)
    if cmd == "keygen":
        from .auth.keygen import keygen_main

        return keygen_main(rest)
    if cmd in ("up", "down", "status"):
        from .deploy import main as deploy_main

        return deploy_main(cmd, rest)
    if cmd == "forget-server":
        from .auth.known_servers import forget_main

        return forget_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"parnet: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2
