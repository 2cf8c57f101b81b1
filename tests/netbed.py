"""A multi-host test bed on one machine: hosts in network namespaces, reached over ssh by name.

Layout (everything here is made by :class:`Bed` and deleted by :meth:`Bed.close`, also after a
crash: the next bed removes what a dead process left):

* a namespace ``pnb<pid>-br`` holding a bridge ``br0``; every other namespace joins it with a
  veth pair (``eth0`` inside, ``v-<name>`` on the bridge), addresses ``10.213.1.0/24`` that
  exist only inside these namespaces (nothing is routed to the outside);
* one namespace per host (``pnb<pid>-h1`` ...), running its own ``sshd`` on port 22, as its own
  Unix user ``pnb<pid><name>`` with its own home (ssh keys, ``~/.ssh/environment`` putting the
  bed's Python first on ``PATH``, so ``parnet up`` needs no ``--python``); hosts listed in
  ``without_parnet`` get ``/usr/bin/python3`` alone;
* a client namespace ``pnb<pid>-c`` with user ``pnb<pid>c``, whose ``~/.ssh/config`` names
  every host (``User``, known host keys) and whose ``~/.config/parnet`` holds SRP keys made by
  ``parnet keygen``;
* names: ``/etc/netns/<ns>/hosts`` (bind-mounted by ``ip netns exec``) maps ``h1``... in every
  namespace, plus ``unreach`` to an address where nobody answers.

The hosts' Python is ``/usr/bin/python3`` in a venv under ``/var/tmp/parnet-netbed`` (readable
by every user, wherever the checkout lives): dependencies cached by their list, parnet's source
copied per source hash.

Use: ``bed.client.python(code)`` runs code as the client (returns ``CompletedProcess``);
``bed.client.parnet("up", "h1", ...)``; ``bed.host("h1").run(...)``; ``bed.cut("h1")`` takes
h1's cable out of the bridge, ``bed.cut("h1", "h2")`` drops only traffic between two hosts;
``bed.restore(...)`` undoes either.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

SUBNET = "10.213.1"
CACHE = Path("/var/tmp/parnet-netbed")
SYSTEM_PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parent.parent
_PREFIX_RE = re.compile(r"^pnb(\d+)")


def _sh(args: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def unavailable() -> str | None:
    """Why a bed cannot be made here (one line), or None."""
    if os.geteuid() != 0:
        return "namespace bed needs root (ip netns, sshd, useradd)"
    for tool in ("ip", "tc", "ssh", "ssh-keygen", "setpriv", "useradd"):
        if not shutil.which(tool):
            return f"namespace bed needs {tool}"
    if not os.path.exists("/usr/sbin/sshd"):
        return "namespace bed needs sshd (apt-get install openssh-server)"
    if not os.path.exists(SYSTEM_PYTHON):
        return f"namespace bed needs {SYSTEM_PYTHON}"
    r = _sh([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 11))"], check=False)
    if r.stdout.strip() != "True":
        return f"namespace bed needs {SYSTEM_PYTHON} >= 3.11"
    name = f"pnbprobe{os.getpid()}"
    r = _sh(["ip", "netns", "add", name], check=False)
    if r.returncode != 0:
        return f"cannot make network namespaces here: {r.stderr.strip()}"
    _sh(["ip", "netns", "del", name], check=False)
    return None


# -- the hosts' Python ---------------------------------------------------------------------
def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _publish(final: Path, make) -> Path:
    """Makes ``final`` through a temporary sibling renamed into place (once, under the lock)."""
    if final.exists():
        os.utime(final)
        return final
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    _sh(["chmod", "-R", "a+rX", str(tmp)])
    os.rename(tmp, final)
    return final


def bed_python() -> str:
    """A Python every user can run, with this tree's parnet and its dependencies."""
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pyver = _sh([SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"]).stdout.strip()
    dkey = hashlib.sha256(("\n".join(deps) + pyver).encode()).hexdigest()[:16]
    skey = _tree_hash(REPO / "src" / "parnet")
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # forget what has not been used for two days
        for old in CACHE.iterdir():
            if old.is_dir() and time.time() - old.stat().st_mtime > 2 * 86400:
                shutil.rmtree(old, ignore_errors=True)
        ddir = _publish(
            CACHE / f"deps-{dkey}",
            lambda t: _sh(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-compile",
                    "--target",
                    str(t),
                    *deps,
                ],
                timeout=600,
            ),
        )
        sdir = _publish(
            CACHE / f"src-{skey}",
            lambda t: shutil.copytree(
                REPO / "src" / "parnet", t / "parnet", ignore=shutil.ignore_patterns("__pycache__")
            ),
        )

        def make_venv(t: Path) -> None:
            _sh([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(t)])
            (site,) = (t / "lib").glob("python3*/site-packages")
            (site / "parnet-netbed.pth").write_text(f"{sdir}\n{ddir}\n")

        venv = _publish(CACHE / f"venv-{skey}-{dkey}", make_venv)
    return str(venv / "bin" / "python")


# -- cleanup of a bed, live or left by a dead process -----------------------------------------
def _kill_ns_pids(ns: str) -> None:
    r = _sh(["ip", "netns", "pids", ns], check=False)
    pids = [int(p) for p in r.stdout.split()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, 9)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.02)


def _remove(prefix: str) -> None:
    namespaces = [
        ln.split()[0]
        for ln in _sh(["ip", "netns", "list"], check=False).stdout.splitlines()
        if ln.startswith(prefix + "-")
    ]
    for ns in namespaces:
        _kill_ns_pids(ns)
    for ns in namespaces:
        _sh(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    with open("/etc/passwd") as f:
        users = [ln.split(":")[0] for ln in f if ln.startswith(prefix)]
    for u in users:
        _sh(["userdel", u], check=False)
        _sh(["groupdel", u], check=False)
    shutil.rmtree(f"/tmp/{prefix}", ignore_errors=True)


def sweep_stale() -> None:
    """Removes beds whose creating process is gone."""
    names = [ln.split()[0] for ln in _sh(["ip", "netns", "list"], check=False).stdout.splitlines()]
    with open("/etc/passwd") as f:
        names += [ln.split(":")[0] for ln in f]
    for pid in {int(m.group(1)) for n in names if (m := _PREFIX_RE.match(n))}:
        if not os.path.exists(f"/proc/{pid}"):
            _remove(f"pnb{pid}")


# -- the bed ---------------------------------------------------------------------------------
class Node:
    """One namespace of the bed with its user: a host (``h1``...) or the client."""

    def __init__(self, bed: Bed, name: str, index: int) -> None:
        self.bed, self.name = bed, name
        self.ns = f"{bed.prefix}-{name}"
        self.user = f"{bed.prefix}{name}"
        self.addr = f"{SUBNET}.{index}"
        self.home = bed.dir / "home" / name
        self.uid = self.gid = -1
        self.python = bed.python

    def env(self, extra: dict[str, str] | None = None) -> list[str]:
        e = {
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "PATH": f"{os.path.dirname(self.python)}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
        }
        e.update(extra or {})
        return [f"{k}={v}" for k, v in e.items()]

    def argv(
        self, args: Sequence[str], as_root: bool = False, env: dict[str, str] | None = None
    ) -> list[str]:
        """The command line running ``args`` in this namespace (as this node's user unless ``as_root``)."""
        if as_root:
            return ["ip", "netns", "exec", self.ns, *args]
        return [
            "ip",
            "netns",
            "exec",
            self.ns,
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--",
            "env",
            "-i",
            *self.env(env),
            *args,
        ]

    def run(
        self,
        args: Sequence[str] | str,
        *,
        as_root: bool = False,
        check: bool = False,
        timeout: float = 120,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Runs a command (a string: through ``sh -c``) here; returns the completed process."""
        if isinstance(args, str):
            args = ["sh", "-c", args]
        r = subprocess.run(
            self.argv(args, as_root, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd="/",
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{self.name}: {args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
            )
        return r

    def popen(
        self, args: Sequence[str], env: dict[str, str] | None = None, **kw
    ) -> subprocess.Popen:
        """Starts a command here as this node's user (the caller waits for it)."""
        return subprocess.Popen(self.argv(args, env=env), cwd="/", text=True, **kw)

    def python_code(self, code: str, **kw) -> subprocess.CompletedProcess:
        """Runs Python ``code`` here with the bed's Python (``run``'s keywords)."""
        return self.run([self.python, "-c", code], **kw)

    def parnet(self, *args: str, **kw) -> subprocess.CompletedProcess:
        """Runs ``python -m parnet ARGS`` here."""
        return self.run([self.python, "-m", "parnet", *args], **kw)

    def server_pids(self) -> list[int]:
        """Pids of the parnet server daemons in this namespace (not their workers)."""
        procs = {}
        for p in _sh(["ip", "netns", "pids", self.ns], check=False).stdout.split():
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"parnet" in cmd and b"server" in cmd:
                procs[int(p)] = ppid
        return sorted(p for p, pp in procs.items() if pp not in procs)


class Bed:
    """Hosts in network namespaces joined by a bridge; see the module docstring."""

    def __init__(
        self,
        hosts: Sequence[str] = ("h1", "h2", "h3"),
        without_parnet: Sequence[str] = (),
        password: str = "bed-password-0123456789",
    ) -> None:
        sweep_stale()
        self.prefix = f"pnb{os.getpid()}"
        self.dir = Path(f"/tmp/{self.prefix}")
        self.python = bed_python()
        self.password = password
        self.hosts = {n: Node(self, n, 11 + k) for k, n in enumerate(hosts)}
        self.client = Node(self, "c", 2)
        self.unreachable = f"{SUBNET}.99"
        self._cuts: set[tuple[str, ...]] = set()
        try:
            self._build(without_parnet)
        except BaseException:
            self.close()
            raise

    def host(self, name: str) -> Node:
        """The host called ``name``."""
        return self.hosts[name]

    @property
    def br(self) -> str:
        return f"{self.prefix}-br"

    def _build(self, without_parnet: Sequence[str]) -> None:
        _remove(self.prefix)
        self.dir.mkdir(mode=0o755)
        (self.dir / "home").mkdir(mode=0o755)
        (self.dir / "keys").mkdir(mode=0o755)
        _sh(["ip", "netns", "add", self.br])
        _sh(["ip", "-n", self.br, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", self.br, "link", "set", "br0", "up"])
        nodes = [self.client, *self.hosts.values()]
        names = "".join(f"{n.addr} {n.name}\n" for n in self.hosts.values())
        for n in nodes:
            _sh(["ip", "netns", "add", n.ns])
            _sh(["ip", "-n", n.ns, "link", "set", "lo", "up"])
            _sh(
                [
                    "ip",
                    "-n",
                    n.ns,
                    "link",
                    "add",
                    "eth0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"v-{n.name}",
                    "netns",
                    self.br,
                ]
            )
            _sh(["ip", "-n", self.br, "link", "set", f"v-{n.name}", "master", "br0"])
            _sh(["ip", "-n", self.br, "link", "set", f"v-{n.name}", "up"])
            _sh(["ip", "-n", n.ns, "addr", "add", f"{n.addr}/24", "dev", "eth0"])
            _sh(["ip", "-n", n.ns, "link", "set", "eth0", "up"])
            etc = Path(f"/etc/netns/{n.ns}")
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}{self.unreachable} unreach\n")
            _sh(["useradd", "-M", "-U", "-d", str(n.home), "-s", "/bin/sh", "-p", "*", n.user])
            n.uid = int(_sh(["id", "-u", n.user]).stdout)
            n.gid = int(_sh(["id", "-g", n.user]).stdout)
            (n.home / ".ssh").mkdir(parents=True, mode=0o700)
        # the client: its key, ssh config naming every host, SRP keys
        c = self.client
        _sh(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                str(c.home / ".ssh" / "id_ed25519"),
            ]
        )
        pub = (c.home / ".ssh" / "id_ed25519.pub").read_text()
        known, config = [], ["Host *\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"]
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for h in self.hosts.values():
            d = self.dir / h.name
            d.mkdir(mode=0o700)
            _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")])
            known.append(
                f"{h.name},{h.addr} ssh-ed25519 {(d / 'hostkey.pub').read_text().split()[1]}\n"
            )
            config.append(f"Host {h.name}\n  User {h.user}\n")
            (self.dir / "keys" / h.user).write_text(pub)
            os.chmod(self.dir / "keys" / h.user, 0o644)
            path = (
                "/usr/bin:/bin"
                if h.name in without_parnet
                else f"{os.path.dirname(self.python)}:/usr/bin:/bin"
            )
            (h.home / ".ssh" / "environment").write_text(f"PATH={path}\n")
            (d / "sshd_config").write_text(
                f"ListenAddress {h.addr}\nPort 22\nHostKey {d / 'hostkey'}\nPidFile {d / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.dir / 'keys'}/%u\nUsePAM no\nPasswordAuthentication no\n"
                f"KbdInteractiveAuthentication no\nPermitRootLogin no\nStrictModes no\n"
                f"PermitUserEnvironment yes\nAllowUsers {h.user}\nMaxStartups 100\n"
            )
            _sh(
                h.argv(
                    ["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")],
                    as_root=True,
                )
            )
        (c.home / ".ssh" / "known_hosts").write_text("".join(known))
        (c.home / ".ssh" / "config").write_text("\n".join(config))
        for n in nodes:
            _sh(["chown", "-R", f"{n.uid}:{n.gid}", str(n.home)])
            os.chmod(n.home, 0o700)
        c.run(
            [self.python, "-m", "parnet", "keygen", "tester"],
            input=self.password + "\n",
            check=True,
        )

    def pids(self) -> list[int]:
        """Every process in the bed's namespaces."""
        out = []
        for n in [self.client, *self.hosts.values()]:
            out += [int(p) for p in _sh(["ip", "netns", "pids", n.ns], check=False).stdout.split()]
        return out

    # -- faults ----------------------------------------------------------------------------
    def cut(self, a: str, b: str | None = None) -> None:
        """Cuts host ``a`` off the bridge (its side stays up, as with a pulled cable at the
        switch), or with ``b`` drops only the traffic between hosts ``a`` and ``b``."""
        if b is None:
            _sh(["ip", "-n", self.br, "link", "set", f"v-{a}", "down"])
        else:
            for x, y in ((a, b), (b, a)):
                _sh(
                    [
                        "ip",
                        "-n",
                        self.hosts[x].ns,
                        "route",
                        "add",
                        "blackhole",
                        f"{self.hosts[y].addr}/32",
                    ]
                )
        self._cuts.add((a,) if b is None else (a, b))

    def restore(self, a: str, b: str | None = None) -> None:
        """Undoes :meth:`cut` with the same arguments."""
        if b is None:
            _sh(["ip", "-n", self.br, "link", "set", f"v-{a}", "up"])
        else:
            for x, y in ((a, b), (b, a)):
                _sh(
                    [
                        "ip",
                        "-n",
                        self.hosts[x].ns,
                        "route",
                        "del",
                        "blackhole",
                        f"{self.hosts[y].addr}/32",
                    ],
                    check=False,
                )
        self._cuts.discard((a,) if b is None else (a, b))

    def restore_all(self) -> None:
        """Undoes every cut still in place."""
        for c in list(self._cuts):
            self.restore(*c)

    def close(self) -> None:
        """Kills every process in the bed's namespaces and deletes namespaces, users and files."""
        _remove(self.prefix)
