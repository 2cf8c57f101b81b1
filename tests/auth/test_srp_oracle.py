"""Cross-checks of parnet's SRP math against the PyPI ``srp`` package (pure-Python module)."""

from __future__ import annotations

import hashlib

import pytest

from parnet.auth import srp

pysrp = pytest.importorskip("srp._pysrp")

A_SECRET = hashlib.sha512(b"a").digest() * 4  # srp wants exactly 256-byte ephemeral secrets
B_SECRET = hashlib.sha512(b"b").digest() * 4
SALT = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")


@pytest.mark.parametrize(
    ("ng", "index"),
    [("NG_2048", 3), ("NG_4096", 5), ("NG_8192", 7)],
)
def test_group_constants_match(ng: str, index: int) -> None:
    assert pysrp.get_ng(getattr(pysrp, ng), None, None) == srp.GROUPS[index]


def test_1024_group_matches() -> None:
    assert pysrp.get_ng(pysrp.NG_1024, None, None) == srp.GROUP_1024


@pytest.mark.parametrize(
    ("user", "password"), [("alice", "password123"), ("j\u00f6rg", "p\u00e4 ss:w\u00f6rd")]
)
def test_verifier_matches(user: str, password: str) -> None:
    N, g = srp.GROUPS[3]
    x = pysrp.gen_x(hashlib.sha1, SALT, user, password)
    assert srp.compute_x(user, password, SALT) == x
    assert srp.compute_verifier(user, password, SALT, N, g) == pow(g, x, N)


def _oracle_exchange(hash_alg: int, v: int, *, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Run srp's User and Verifier (RFC 5054 padding on) with fixed secrets."""
    monkeypatch.setattr(pysrp, "_rfc5054_compat", True)
    N, g = srp.GROUPS[3]
    user = pysrp.User("alice", "pw", hash_alg=hash_alg, ng_type=pysrp.NG_2048, bytes_a=A_SECRET)
    _, bytes_A = user.start_authentication()
    verifier = pysrp.Verifier(
        "alice",
        SALT,
        pysrp.long_to_bytes(v),
        bytes_A,
        hash_alg=hash_alg,
        ng_type=pysrp.NG_2048,
        bytes_b=B_SECRET,
    )
    _, bytes_B = verifier.get_challenge()
    return user, verifier, int.from_bytes(bytes_A, "big"), int.from_bytes(bytes_B, "big")


def test_sha1_everywhere_matches_srp_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """With SHA1 for k and u too, parnet's core gives srp's k, u, B and S on both sides."""
    N, g = srp.GROUPS[3]
    v = srp.compute_verifier("alice", "pw", SALT, N, g)
    user, verifier, A, B = _oracle_exchange(pysrp.SHA1, v, monkeypatch=monkeypatch)
    a, b = int.from_bytes(A_SECRET, "big"), int.from_bytes(B_SECRET, "big")
    k = srp.compute_k(N, g, "sha1")
    assert k == user.k == verifier.k
    assert srp.compute_A(N, g, a) == A
    assert srp.compute_B(N, g, k, v, b) == B
    M = user.process_challenge(SALT, B.to_bytes(256, "big"))
    assert M is not None
    assert verifier.verify_session(M) is not None  # srp accepts parnet's verifier
    u = srp.compute_u(A, B, N, "sha1")
    assert u == user.u == verifier.u
    x = srp.compute_x("alice", "pw", SALT)
    assert srp.client_premaster(N, g, k, x, a, u, B) == user.S
    assert srp.server_premaster(N, v, b, u, A) == verifier.S


def test_parnet_hashes_match_srp_verifier_with_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    """parnet's mix (SHA-256 k and u, SHA1 x) is srp's SHA-256 Verifier on a GnuTLS verifier."""
    N, g = srp.GROUPS[3]
    v = srp.compute_verifier("alice", "pw", SALT, N, g)
    _, verifier, A, B = _oracle_exchange(pysrp.SHA256, v, monkeypatch=monkeypatch)
    verifier.verify_session(b"x" * 32)  # computes u and S (and rejects the bogus proof)
    a, b = int.from_bytes(A_SECRET, "big"), int.from_bytes(B_SECRET, "big")
    k = srp.compute_k(N, g)
    assert k == verifier.k
    assert srp.compute_B(N, g, k, v, b) == B
    u = srp.compute_u(A, B, N)
    assert u == verifier.u
    x = srp.compute_x("alice", "pw", SALT)
    assert srp.server_premaster(N, v, b, u, A) == verifier.S
    assert srp.client_premaster(N, g, k, x, a, u, B) == verifier.S
