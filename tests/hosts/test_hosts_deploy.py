"""`parnet up/status/down` over real ssh to hosts in network namespaces (tests/netbed.py)."""

from __future__ import annotations

import pytest

from helpers import wait_until

# the first test also builds the bed (on a fresh machine: the hosts' venv from PyPI)
pytestmark = pytest.mark.timeout(300)


def lines(r) -> dict[str, str]:
    return {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}


def test_up_status_down_and_bad_hosts(bed) -> None:
    c = bed.client
    assert c.parnet("down", "h1", "h2", "h3").returncode == 0  # whatever earlier tests left
    for h in ("h1", "h2"):
        bed.host(h).run("rm -rf ~/.config/parnet", check=True)
    r = c.parnet("up", "h1", "h2", "unreach", "nosuchuser@h1", "h4", "--copy-keys")
    out = lines(r)
    assert r.returncode == 1 and len(out) == 5, r.stdout + r.stderr
    for h in ("h1", "h2"):
        assert " started " in out[h] and "keys copied" in out[h], out[h]
    assert "ssh: unreachable" in out["unreach"]
    assert "ssh: authentication failed" in out["nosuchuser@h1"]
    assert "parnet is not installed" in out["h4"]
    pids = {h: int(out[h].split("pid ")[1].split()[0]) for h in ("h1", "h2")}
    assert sorted(bed.host("h1").server_pids() + bed.host("h2").server_pids()) == sorted(
        pids.values()
    )
    # the keys really arrived in each host user's own home, private
    for h in ("h1", "h2"):
        r = bed.host(h).run(
            "stat -c '%a %U' ~/.config/parnet/srp/server ~/.config/parnet/srp/server/passwd"
        )
        assert r.stdout.split() == ["700", bed.host(h).user, "600", bed.host(h).user], r.stdout

    # idempotent: the same servers, said so
    r = c.parnet("up", "h1", "h2", "--copy-keys")
    out = lines(r)
    assert r.returncode == 0, r.stdout + r.stderr
    for h in ("h1", "h2"):
        assert " running " in out[h] and f"pid {pids[h]}" in out[h] and "already running" in out[h]
        assert "keys identical" in out[h]

    r = c.parnet("status", "h1", "h2", "h3")
    out = lines(r)
    assert r.returncode == 0 and " running " in out["h1"] and " not running " in out["h3"], r.stdout

    r = c.parnet("down", "h1", "h2", "h3")
    out = lines(r)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        " stopped " in out["h1"]
        and " stopped " in out["h2"]
        and "no server was running" in out["h3"]
    )
    wait_until(
        lambda: not bed.host("h1").server_pids() and not bed.host("h2").server_pids(),
        10,
        "the servers to exit",
    )


def test_hostfile_ssh_config_and_python(bed, tmp_path) -> None:
    c = bed.client
    # a host file and an ssh config of the client's own, passed by option
    c.run(
        f"printf '# bed\\nalias1   # h1 by another name\\n' > ~/hosts && "
        f"printf 'Host alias1\\n  HostName h1\\n  User {bed.host('h1').user}\\n"
        f"  UserKnownHostsFile ~/.ssh/known_hosts\\n  HostKeyAlias h1\\n' > ~/alt_config",
        check=True,
    )
    r = c.parnet("status", "--hostfile", f"{c.home}/hosts", "--ssh-config", f"{c.home}/alt_config")
    assert r.returncode == 0 and r.stdout.split()[0] == "alias1", r.stdout + r.stderr
    assert r.stdout.split()[1] in ("running", "not"), r.stdout
    # an explicit --python reaches a host whose PATH has no parnet; a wrong one is named
    r = c.parnet("status", "h4", "--python", bed.python)
    assert r.returncode == 0 and " not running " in r.stdout, r.stdout + r.stderr
    r = c.parnet("status", "h1", "--python", "/nonexistent/python3")
    assert r.returncode == 1 and "Python not found there: /nonexistent/python3" in r.stdout, (
        r.stdout
    )


def test_python_form(bed) -> None:
    code = """
import parnet
names = parnet.up(["h1", "h3"], copy_keys=True, cmd_port=20502, data_port=20503)
c = parnet.pconnect(names)
print(names, parnet.rfeval(lambda: __import__("socket").gethostname() and 7 * 6, connection=c[2]))
parnet.sclose(c)
try:
    parnet.up(["h1", "unreach"], cmd_port=20502, data_port=20503)
except parnet.ParnetError as e:
    print(type(e).__name__, [s.state for s in e.statuses])
print([s.state for s in parnet.down(["h1", "h3"], cmd_port=20502)])
"""
    r = bed.client.python_code(code, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "['h1:20502', 'h3:20502'] 42",
        "DeployError ['running', 'failed']",
        "['stopped', 'stopped']",
    ], r.stdout
