"""The ``parnet`` command: ``server``, ``keygen``, ``demo``, and ``up``/``down``/``status`` over ssh."""

from __future__ import annotations

import argparse
import os
import sys

from .constants import CMD_PORT, DATA_PORT


def _server(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="parnet server", description="Start (or --kill) a parnet server.")
    ap.add_argument("--no-tls", action="store_true", help="no TLS/authentication (binds 127.0.0.1 unless --bind)")
    ap.add_argument("--auth-file", help="SRP passwd file (default $PARNET_HOME/srp/server/passwd)")
    ap.add_argument("--cmd-port", type=int, default=CMD_PORT)
    ap.add_argument("--data-port", type=int, default=DATA_PORT)
    ap.add_argument("--bind", help="address to listen on (default: all with TLS, 127.0.0.1 without)")
    ap.add_argument("--foreground", action="store_true", help="do not detach (for service managers)")
    ap.add_argument("--allow-root", action="store_true", help="run even as root (clients' code runs as root)")
    ap.add_argument("--log-file", help="log file (default: in the private runtime directory)")
    ap.add_argument("--kill", action="store_true", help="stop the server matching --bind/--cmd-port")
    ap.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from .errors import ParnetError

    if a.kill:
        from .server.daemon import kill_server

        try:
            pid = kill_server(a.cmd_port, a.bind)
        except ParnetError as e:
            print(f"parnet server --kill: {e}", file=sys.stderr)
            return 1
        print(f"stopped parnet server (pid {pid})")
        return 0
    if not a.foreground:
        from .server.launch import start_background

        try:
            pid = start_background(use_tls=not a.no_tls, auth_file=a.auth_file, cmd_port=a.cmd_port,
                                   data_port=a.data_port, bind=a.bind, allow_root=a.allow_root,
                                   log_file=a.log_file)
        except ParnetError as e:
            print(f"parnet server: {e}", file=sys.stderr)
            return 1
        print(f"parnet server started (pid {pid}) on {a.bind or ('all addresses' if not a.no_tls else '127.0.0.1')}"
              f", ports {a.cmd_port}/{a.data_port}, TLS {'off' if a.no_tls else 'on'}")
        return 0
    from .server.daemon import Daemon

    d = Daemon(use_tls=not a.no_tls, auth_file=a.auth_file, cmd_port=a.cmd_port, data_port=a.data_port,
               bind=a.bind, allow_root=a.allow_root, log_file=a.log_file)
    try:
        d.prepare()
    except (ParnetError, OSError) as e:
        msg = str(e)
        if a.ready_fd is not None:
            os.write(a.ready_fd, f"error: {msg}\n".encode())
            os.close(a.ready_fd)
        print(f"parnet server: {msg}", file=sys.stderr)
        return 1
    if a.ready_fd is not None:
        os.write(a.ready_fd, f"ok {os.getpid()}\n".encode())
        os.close(a.ready_fd)
    d.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``parnet`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: parnet {server,keygen,demo,up,down,status} [options]   (parnet CMD --help for each)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "server":
        return _server(rest)
    if cmd == "keygen":
        from .auth.keyfile import keygen_main

        return keygen_main(rest)
    if cmd in ("up", "down", "status"):
        from .deploy import main as deploy_main

        return deploy_main(cmd, rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"parnet: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2
