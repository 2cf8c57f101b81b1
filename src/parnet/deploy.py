"""Starting, stopping and reporting servers on many machines over ssh (``parnet up/down/status``).

Theory of operation. For each host, one run of the system OpenSSH client (so ``~/.ssh/config``,
agents and ProxyJump work) executes ``PYTHON -`` there and feeds it a small self-contained
script (``_REMOTE``) on standard input, with this call's settings as JSON. The script depends on
nothing of the remote parnet but ``import parnet`` and ``parnet server`` (stopping is SIGTERM
to the pid in its pid file), so it reports a missing or different parnet as clearly as a
missing Python. It answers with one marked JSON line, which becomes a ``HostStatus``. All
hosts run in parallel threads, each bounded by ``timeout`` seconds (ssh is killed after that).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .constants import CMD_PORT, DATA_PORT, __version__
from .errors import ParnetError

#: Seconds ssh may take to connect, and one host's whole operation.
CONNECT_TIMEOUT = 10
HOST_TIMEOUT = 60.0
_MARK = "PARNET-DEPLOY "

# Runs on the remote host under its Python, fed on stdin. ``P`` (the settings) is prepended.
_REMOTE = r'''
import base64, json, os, subprocess, sys
def out(**kw):
    kw.setdefault("python", sys.executable)
    print("PARNET-DEPLOY " + json.dumps(kw), flush=True)
    sys.exit(0)
try:
    import parnet
    ver = parnet.__version__
except Exception as e:
    out(state="failed", kind="parnet", reason="parnet is not installed for %s (%s: %s)"
        % (sys.executable, type(e).__name__, e))
if ver != P["version"] and P["op"] == "up":
    out(state="failed", kind="version", version=ver,
        reason="parnet %s there, %s here: install the same version" % (ver, P["version"]))

def running():
    """(pid, argv, pid file) of a live server on our command port, or Nones. Pid files are
    looked for in both runtime directories: a server started by systemd has no
    XDG_RUNTIME_DIR, an ssh login on a systemd machine has one."""
    import glob
    dirs = [os.path.join(os.path.expanduser("~"), ".local", "state", "parnet")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        dirs.insert(0, os.path.join(os.environ["XDG_RUNTIME_DIR"], "parnet"))
    for f in sorted(sum((glob.glob(os.path.join(d, "server-*-%d.pid" % P["cmd_port"])) for d in dirs), [])):
        try:
            pid = int(open(f).read().strip())
            with open("/proc/%d/stat" % pid) as st:
                if st.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open("/proc/%d/cmdline" % pid, "rb") as c:
                argv = c.read().decode(errors="replace").split("\0")
            if "parnet" not in " ".join(argv):
                continue
            return pid, argv, f
        except (OSError, ValueError):
            continue
    return None, None, None

def stop(pid, path):
    import signal, time
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < end:
        time.sleep(0.05)
    if os.path.exists("/proc/%d" % pid):
        os.kill(pid, signal.SIGKILL)
    try:
        os.unlink(path)
    except OSError:
        pass

def server(args):
    return subprocess.run([sys.executable, "-m", "parnet", "server", *args], capture_output=True,
                          text=True, timeout=P["timeout"], stdin=subprocess.DEVNULL)

def reason_of(r):
    return (r.stderr.strip() or r.stdout.strip() or "exit status %d" % r.returncode).splitlines()[-1]

pid, argv, pidfile = running()
op = P["op"]
if op == "status":
    if pid is None:
        out(state="not running", version=ver)
    out(state="running", pid=pid, version=ver,
        note="" if ver == P["version"] else "version differs from the client's (%s)" % P["version"])
if op == "down":
    if pid is None:
        out(state="not running", version=ver, note="no server was running")
    try:
        stop(pid, pidfile)
    except OSError as e:
        out(state="failed", kind="other", pid=pid, version=ver, reason="cannot stop pid %d: %s" % (pid, e))
    out(state="stopped", pid=pid, version=ver)
# up
note = []
if P["keys"] is not None:
    home = os.environ.get("PARNET_HOME") or os.path.join(os.path.expanduser("~"), ".config", "parnet")
    d = os.path.join(home, "srp", "server")
    want = {k: base64.b64decode(v) for k, v in P["keys"].items()}
    def same(name, data):
        try:
            with open(os.path.join(d, name), "rb") as f:
                return f.read() == data
        except OSError:
            return False
    if all(same(k, v) for k, v in want.items()):
        note.append("keys identical")
    else:
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(d), 0o700)
        os.chmod(d, 0o700)
        for k, v in want.items():
            tmp = os.path.join(d, ".%s.%d.tmp" % (k, os.getpid()))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(v)
            os.replace(tmp, os.path.join(d, k))
        note.append("keys copied")
if pid is not None:
    def opt(name, default):
        return argv[argv.index(name) + 1] if name in argv[:-1] else default
    tls = "--no-tls" not in argv
    dport = int(opt("--data-port", "12501"))
    if tls != P["tls"] or dport != P["data_port"]:
        out(state="failed", kind="other", pid=pid, version=ver,
            reason="a server with other settings runs on port %d (pid %d, TLS %s, data port %d): "
                   "parnet down first" % (P["cmd_port"], pid, "on" if tls else "off", dport))
    note.append("already running, left as is")
    out(state="running", pid=pid, version=ver, note=", ".join(note))
args = ["--cmd-port", str(P["cmd_port"]), "--data-port", str(P["data_port"])]
if not P["tls"]:
    args += ["--no-tls", "--bind", "0.0.0.0"]
if P["allow_root"]:
    args.append("--allow-root")
r = server(args)
if r.returncode != 0:
    msg = reason_of(r).removeprefix("parnet server: ")
    kind = "port" if "in use" in msg else "root" if "as root" in msg else "other"
    out(state="failed", kind=kind, version=ver, reason=msg)
try:
    pid = int(r.stdout.split("(pid ", 1)[1].split(")", 1)[0])
except (IndexError, ValueError):
    pid = None
out(state="started", pid=pid, version=ver, note=", ".join(note))
'''


class DeployError(ParnetError):
    """``up``/``down``/``status`` failed on at least one host; ``statuses`` holds every host's."""

    def __init__(self, statuses: list[HostStatus]) -> None:
        self.statuses = statuses
        bad = [s for s in statuses if not s.ok]
        super().__init__(
            f"{len(bad)} of {len(statuses)} hosts failed:\n" + "\n".join(s.line() for s in bad)
        )


@dataclass
class HostStatus:
    """What one host answered.

    ``host``: the ssh destination as given; ``name``: what to pass to ``pconnect`` (the host
    without ``user@``, with ``:port`` when the command port is not the default); ``state``:
    ``started``, ``running``, ``stopped``, ``not running`` or ``failed``; ``kind`` (when
    failed): ``ssh``, ``python``, ``parnet``, ``version``, ``port``, ``root``, ``timeout`` or
    ``other``; ``reason``: why it failed; ``note``: anything else worth saying.
    """

    host: str
    name: str
    state: str
    pid: int | None = None
    version: str | None = None
    kind: str = ""
    reason: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        """False when this host failed."""
        return self.state != "failed"

    def line(self, width: int = 0) -> str:
        """The one line the command prints for this host."""
        pid = f"pid {self.pid}" if self.pid else "-"
        if self.ok:
            info = f"parnet {self.version}" if self.version else ""
            if self.note:
                info += f" ({self.note})" if info else self.note
        else:
            info = self.reason
        return f"{self.host:<{width}}  {self.state:<11}  {pid:<10}  {info}".rstrip()


def connect_name(host: str, cmd_port: int = CMD_PORT) -> str:
    """The ``pconnect`` name for ssh destination ``[user@]host``."""
    name = host.rsplit("@", 1)[-1]
    if cmd_port != CMD_PORT:
        name = f"[{name}]:{cmd_port}" if ":" in name else f"{name}:{cmd_port}"
    return name


def read_hostfile(path: str | os.PathLike[str]) -> list[str]:
    """Hosts of a host file: one per line, ``#`` starts a comment, blank lines ignored."""
    hosts = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                hosts.extend(line.split())
    return hosts


def ssh_reason(stderr: str) -> str:
    """A short explanation of an ssh failure (exit status 255) from its stderr."""
    lines = [
        ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning:")
    ]
    last = lines[-1] if lines else "ssh failed"
    low = stderr.lower()
    if "permission denied" in low or "too many authentication failures" in low:
        return f"ssh: authentication failed ({last})"
    if "could not resolve hostname" in low or "name or service not known" in low:
        return f"ssh: unknown host ({last})"
    if "host key verification failed" in low or "remote host identification has changed" in low:
        return f"ssh: host key not trusted ({last})"
    for s in (
        "connection refused",
        "no route to host",
        "timed out",
        "network is unreachable",
        "connection closed",
        "connection reset",
        "broken pipe",
        "banner exchange",
    ):
        if s in low:
            return f"ssh: unreachable ({last})"
    return f"ssh: {last}"


def _remote_python(python: str) -> str:
    if python.startswith("~/"):
        return "~/" + shlex.quote(python[2:])
    return shlex.quote(python)


def ssh_argv(
    host: str,
    command: str,
    *,
    ssh_config: str | None = None,
    ssh_opts: Sequence[str] = (),
    ssh: str = "ssh",
) -> list[str]:
    """The ssh command line that runs ``command`` on ``host`` (user options first: they win)."""
    argv = [ssh, "-T"]
    if ssh_config:
        argv += ["-F", str(ssh_config)]
    for o in ssh_opts:
        argv += ["-o", o]
    argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "--", host, command]
    return argv


def _parse(host: str, name: str, python: str, proc_rc: int, stdout: str, stderr: str) -> HostStatus:
    for line in reversed(stdout.splitlines()):
        if line.startswith(_MARK):
            try:
                d = json.loads(line[len(_MARK) :])
            except ValueError:
                break
            return HostStatus(
                host,
                name,
                d["state"],
                d.get("pid"),
                d.get("version"),
                d.get("kind", ""),
                d.get("reason", ""),
                d.get("note", ""),
            )
    if proc_rc == 255:
        return HostStatus(host, name, "failed", kind="ssh", reason=ssh_reason(stderr))
    err = stderr.strip().splitlines()
    if proc_rc == 127 or (err and ("not found" in err[-1] or "No such file" in err[-1])):
        return HostStatus(
            host,
            name,
            "failed",
            kind="python",
            reason=f"Python not found there: {python} (give --python PATH)",
        )
    tail = err[-1] if err else f"exit status {proc_rc}"
    return HostStatus(host, name, "failed", kind="other", reason=f"{python} failed: {tail}")


def _one(
    host: str,
    op: str,
    params: dict[str, object],
    *,
    python: str,
    ssh_config: str | None,
    ssh_opts: Sequence[str],
    timeout: float,
    runner: Sequence[str] | None,
) -> HostStatus:
    name = connect_name(host, int(params["cmd_port"]))  # type: ignore[call-overload]
    command = f"{_remote_python(python)} -"
    argv = (
        [*runner, command]
        if runner is not None
        else ssh_argv(host, command, ssh_config=ssh_config, ssh_opts=ssh_opts)
    )
    script = (
        f"P = {json.dumps({**params, 'op': op})!r}\nimport json as _j\nP = _j.loads(P)\n{_REMOTE}"
    )
    try:
        p = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return HostStatus(
            host, name, "failed", kind="timeout", reason=f"no answer within {timeout:g} s"
        )
    except OSError as e:
        return HostStatus(host, name, "failed", kind="ssh", reason=f"cannot run ssh: {e}")
    return _parse(host, name, python, p.returncode, p.stdout, p.stderr)


def _local_keys() -> dict[str, str]:
    home = os.environ.get("PARNET_HOME") or os.path.join(
        os.path.expanduser("~"), ".config", "parnet"
    )
    d = os.path.join(home, "srp", "server")
    try:
        names = sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)))
    except OSError as e:
        raise ParnetError(
            f"--copy-keys: no server key files in {d} ({e.strerror}); "
            f"make them with `parnet keygen USER`"
        ) from None
    if "passwd" not in names:
        raise ParnetError(f"--copy-keys: {d}/passwd is missing; make it with `parnet keygen USER`")
    out = {}
    for n in names:
        with open(os.path.join(d, n), "rb") as f:
            out[n] = base64.b64encode(f.read()).decode()
    return out


def run(
    op: str,
    hosts: Iterable[str],
    *,
    python: str = "python3",
    copy_keys: bool = False,
    ssh_config: str | None = None,
    ssh_opts: Sequence[str] = (),
    use_tls: bool = True,
    cmd_port: int = CMD_PORT,
    data_port: int = DATA_PORT,
    allow_root: bool = False,
    timeout: float = HOST_TIMEOUT,
    _runner: Sequence[str] | None = None,
) -> list[HostStatus]:
    """Runs ``op`` (``up``, ``down``, ``status``) on every host in parallel; never raises for a host.

    ``_runner`` (tests only) replaces the ssh command: the remote command is appended to it.
    """
    hosts = list(hosts)
    if not hosts:
        raise ValueError("no hosts given")
    if op not in ("up", "down", "status"):
        raise ValueError(f"unknown operation {op!r}")
    params = {
        "version": __version__,
        "cmd_port": cmd_port,
        "data_port": data_port,
        "tls": use_tls,
        "allow_root": allow_root,
        "timeout": max(5.0, timeout - CONNECT_TIMEOUT),
        "keys": _local_keys() if copy_keys and op == "up" else None,
    }
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as ex:
        futs = [
            ex.submit(
                _one,
                h,
                op,
                params,
                python=python,
                ssh_config=ssh_config,
                ssh_opts=ssh_opts,
                timeout=timeout,
                runner=_runner,
            )
            for h in hosts
        ]
        return [f.result() for f in futs]


def _checked(statuses: list[HostStatus]) -> list[HostStatus]:
    if not all(s.ok for s in statuses):
        raise DeployError(statuses)
    return statuses


def up(
    hosts: Iterable[str],
    *,
    python: str = "python3",
    copy_keys: bool = False,
    ssh_config: str | None = None,
    ssh_opts: Sequence[str] = (),
    use_tls: bool = True,
    cmd_port: int = CMD_PORT,
    data_port: int = DATA_PORT,
    allow_root: bool = False,
    timeout: float = HOST_TIMEOUT,
) -> list[str]:
    """Starts ``parnet server`` on each ssh destination ``[user@]host`` (as ``parnet up``).

    Returns the names to pass to ``pconnect`` (``host``, or ``host:port`` for another command
    port), in the order given; a host already running a matching server is left as is.

    Args:
        hosts: ssh destinations, ``[user@]host`` (``~/.ssh/config`` names work).
        python: the Python to run there (default: ``python3`` on the remote ``PATH``).
        ssh_config: an ssh configuration file (``ssh -F``).
        ssh_opts: ssh options (``ssh -o``), e.g. ``["ProxyJump=gw"]``.
        cmd_port: the servers' command port.
        timeout: seconds for each host, connecting included.
        copy_keys: first copy the local ``$PARNET_HOME/srp/server`` to each host's default
            location (modes 0700/0600), unless the copy there is identical.
        use_tls: ``False`` starts the servers with ``--no-tls``.
        data_port: the servers' data port.
        allow_root: start the servers with ``--allow-root``.

    Raises:
        DeployError: some host failed (its ``statuses`` has every host's ``HostStatus``;
            the servers that did start keep running).
        ParnetError: ``copy_keys`` without local server key files.
    """
    return [
        s.name
        for s in _checked(
            run(
                "up",
                hosts,
                python=python,
                copy_keys=copy_keys,
                ssh_config=ssh_config,
                ssh_opts=ssh_opts,
                use_tls=use_tls,
                cmd_port=cmd_port,
                data_port=data_port,
                allow_root=allow_root,
                timeout=timeout,
            )
        )
    ]


def down(
    hosts: Iterable[str],
    *,
    python: str = "python3",
    ssh_config: str | None = None,
    ssh_opts: Sequence[str] = (),
    cmd_port: int = CMD_PORT,
    timeout: float = HOST_TIMEOUT,
) -> list[HostStatus]:
    """Stops the server on each host (as ``parnet down``); a host without one is not an error.

    Args:
        hosts: ssh destinations, ``[user@]host`` (``~/.ssh/config`` names work).
        python: the Python to run there (default: ``python3`` on the remote ``PATH``).
        ssh_config: an ssh configuration file (``ssh -F``).
        ssh_opts: ssh options (``ssh -o``), e.g. ``["ProxyJump=gw"]``.
        cmd_port: the servers' command port.
        timeout: seconds for each host, connecting included.

    Returns:
        Each host's ``HostStatus`` (``stopped`` or ``not running``).

    Raises:
        DeployError: some host could not be reached or its server not stopped.
    """
    return _checked(
        run(
            "down",
            hosts,
            python=python,
            ssh_config=ssh_config,
            ssh_opts=ssh_opts,
            cmd_port=cmd_port,
            timeout=timeout,
        )
    )


def status(
    hosts: Iterable[str],
    *,
    python: str = "python3",
    ssh_config: str | None = None,
    ssh_opts: Sequence[str] = (),
    cmd_port: int = CMD_PORT,
    timeout: float = HOST_TIMEOUT,
) -> list[HostStatus]:
    """Reports each host's server (as ``parnet status``): ``running`` with its pid, or ``not running``.

    Args:
        hosts: ssh destinations, ``[user@]host`` (``~/.ssh/config`` names work).
        python: the Python to run there (default: ``python3`` on the remote ``PATH``).
        ssh_config: an ssh configuration file (``ssh -F``).
        ssh_opts: ssh options (``ssh -o``), e.g. ``["ProxyJump=gw"]``.
        cmd_port: the servers' command port.
        timeout: seconds for each host, connecting included.

    Returns:
        Each host's ``HostStatus``.

    Raises:
        DeployError: some host could not be reached or asked.
    """
    return _checked(
        run(
            "status",
            hosts,
            python=python,
            ssh_config=ssh_config,
            ssh_opts=ssh_opts,
            cmd_port=cmd_port,
            timeout=timeout,
        )
    )


def main(op: str, argv: list[str]) -> int:
    """``parnet up|down|status``: one line per host; exit 1 if any host failed, 2 on bad usage."""
    import argparse

    ap = argparse.ArgumentParser(
        prog=f"parnet {op}",
        description={
            "up": "Start parnet servers on hosts over ssh.",
            "down": "Stop parnet servers on hosts over ssh.",
            "status": "Report parnet servers on hosts over ssh.",
        }[op],
    )
    ap.add_argument("hosts", nargs="*", metavar="HOST", help="ssh destination [user@]host")
    ap.add_argument("--hostfile", help="file with one HOST per line (# comments)")
    ap.add_argument("--python", default="python3", help="Python on the hosts (default: python3)")
    ap.add_argument("--ssh-config", help="ssh configuration file (ssh -F)")
    ap.add_argument(
        "--ssh-opt",
        action="append",
        default=[],
        metavar="OPTION",
        help="ssh option (ssh -o), repeatable",
    )
    ap.add_argument("--cmd-port", type=int, default=CMD_PORT)
    ap.add_argument("--timeout", type=float, default=HOST_TIMEOUT, help="seconds per host")
    if op == "up":
        ap.add_argument(
            "--copy-keys",
            action="store_true",
            help="copy $PARNET_HOME/srp/server to each host first",
        )
        ap.add_argument(
            "--no-tls", action="store_true", help="servers without TLS (isolated networks)"
        )
        ap.add_argument("--data-port", type=int, default=DATA_PORT)
        ap.add_argument("--allow-root", action="store_true", help="let servers run as root")
    a = ap.parse_args(argv)
    hosts = list(a.hosts)
    try:
        if a.hostfile:
            hosts += read_hostfile(a.hostfile)
    except OSError as e:
        print(f"parnet {op}: {a.hostfile}: {e.strerror}", file=sys.stderr)
        return 2
    if not hosts:
        ap.error("no hosts given (HOST... or --hostfile)")
    extra = {}
    if op == "up":
        extra = dict(
            copy_keys=a.copy_keys,
            use_tls=not a.no_tls,
            data_port=a.data_port,
            allow_root=a.allow_root,
        )
    try:
        statuses = run(
            op,
            hosts,
            python=a.python,
            ssh_config=a.ssh_config,
            ssh_opts=a.ssh_opt,
            cmd_port=a.cmd_port,
            timeout=a.timeout,
            **extra,
        )
    except ParnetError as e:
        print(f"parnet {op}: {e}", file=sys.stderr)
        return 2
    width = max(len(s.host) for s in statuses)
    for s in statuses:
        print(s.line(width), flush=True)
    return 0 if all(s.ok for s in statuses) else 1
