"""SRP-6a: RFC 5054 vectors, the in-memory login, and every rejection in the attack table."""

from __future__ import annotations

import ast
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parnet.auth import keyfile, srp
from parnet.errors import (
    AuthenticationError,
    LocalProtocolError,
    RemoteProtocolError,
)

Pair = Callable[..., tuple[srp.SrpClient, srp.SrpServer]]
Login = Callable[[srp.SrpClient, srp.SrpServer], tuple[bytes, bytes]]
ALICE_PW = "correct horse battery"


def h(text: str) -> int:
    return int("".join(text.split()), 16)


# RFC 5054 Appendix B (1024-bit group, SHA1 everywhere).
RFC_I, RFC_P = "alice", "password123"
RFC_S = bytes.fromhex("BEB25379D1A8581EB5A727673A2441EE")
RFC_K = h("7556AA04 5AEF2CDD 07ABAF0F 665C3E81 8913186F")
RFC_X = h("94B7555A ABE9127C C58CCF49 93DB6CF8 4D16C124")
RFC_V = h(
    """7E273DE8 696FFC4F 4E337D05 B4B375BE B0DDE156 9E8FA00A 9886D812
    9BADA1F1 822223CA 1A605B53 0E379BA4 729FDC59 F105B478 7E5186F5
    C671085A 1447B52A 48CF1970 B4FB6F84 00BBF4CE BFBB1681 52E08AB5
    EA53D15C 1AFF87B2 B9DA6E04 E058AD51 CC72BFC9 033B564E 26480D78
    E955A5E2 9E7AB245 DB2BE315 E2099AFB"""
)
RFC_a = h("60975527 035CF2AD 1989806F 0407210B C81EDC04 E2762A56 AFD529DD DA2D4393")
RFC_b = h("E487CB59 D31AC550 471E81F0 0F6928E0 1DDA08E9 74A004F4 9E61F5D1 05284D20")
RFC_A = h(
    """61D5E490 F6F1B795 47B0704C 436F523D D0E560F0 C64115BB 72557EC4
    4352E890 3211C046 92272D8B 2D1A5358 A2CF1B6E 0BFCF99F 921530EC
    8E393561 79EAE45E 42BA92AE ACED8251 71E1E8B9 AF6D9C03 E1327F44
    BE087EF0 6530E69F 66615261 EEF54073 CA11CF58 58F0EDFD FE15EFEA
    B349EF5D 76988A36 72FAC47B 0769447B"""
)
RFC_B = h(
    """BD0C6151 2C692C0C B6D041FA 01BB152D 4916A1E7 7AF46AE1 05393011
    BAF38964 DC46A067 0DD125B9 5A981652 236F99D9 B681CBF8 7837EC99
    6C6DA044 53728610 D0C6DDB5 8B318885 D7D82C7F 8DEB75CE 7BD4FBAA
    37089E6F 9C6059F3 88838E7A 00030B33 1EB76840 910440B1 B27AAEAE
    EB4012B7 D7665238 A8E3FB00 4B117B58"""
)
RFC_U = h("CE38B959 3487DA98 554ED47D 70A7AE5F 462EF019")
RFC_PREMASTER = h(
    """B0DC82BA BCF30674 AE450C02 87745E79 90A3381F 63B387AA F271A10D
    233861E3 59B48220 F7C4693C 9AE12B0A 6F67809F 0876E2D0 13800D6C
    41BB59B6 D5979B5C 00A172B4 A2A5903A 0BDCAF8A 709585EB 2AFAFA8F
    3499B200 210DCC1F 10EB3394 3CD67FC8 8A2F39A4 BE5BEC4E C0A3212D
    C346D7E4 74B29EDE 8A469FFE CA686E5A"""
)


def test_rfc5054_appendix_b_vector() -> None:
    N, g = srp.GROUP_1024
    k = srp.compute_k(N, g, "sha1")
    x = srp.compute_x(RFC_I, RFC_P, RFC_S, "sha1")
    v = pow(g, x, N)
    assert (k, x, v) == (RFC_K, RFC_X, RFC_V)
    assert srp.compute_verifier(RFC_I, RFC_P, RFC_S, N, g) == RFC_V  # x is SHA1 by design
    assert srp.compute_A(N, g, RFC_a) == RFC_A
    assert srp.compute_B(N, g, k, v, RFC_b) == RFC_B
    u = srp.compute_u(RFC_A, RFC_B, N, "sha1")
    assert u == RFC_U
    assert srp.client_premaster(N, g, k, x, RFC_a, u, RFC_B) == RFC_PREMASTER
    assert srp.server_premaster(N, v, RFC_b, u, RFC_A) == RFC_PREMASTER


@pytest.mark.parametrize("index", sorted(srp.GROUPS))
def test_groups_are_rfc5054(index: int) -> None:
    bits = {2: 1536, 3: 2048, 4: 3072, 5: 4096, 7: 8192}[index]
    N, g = srp.GROUPS[index]
    assert N.bit_length() == bits
    assert g == {2: 2, 3: 2, 4: 5, 5: 5, 7: 19}[index]
    assert N % 2 == 1 and N % 3 != 0 and 1 < g < N
    if bits <= 2048:
        assert pow(g, N - 1, N) == 1  # Fermat (skipped for the big groups: too slow)
    assert srp.DEFAULT_GROUP_INDEX == 3
    assert srp.GROUP_1024[0].bit_length() == 1024


def test_password_normalization_nfc_and_spaces() -> None:
    N, g = srp.GROUPS[2]
    salt = b"s" * 16
    nfc = srp.compute_verifier("u", "p\u00e4ss\u00a0word", salt, N, g)
    nfd = srp.compute_verifier("u", "pa\u0308ss word", salt, N, g)
    assert nfc == nfd
    assert srp.normalize_password("plain ascii") == "plain ascii"


def test_module_imports_no_io() -> None:
    """srp.py, sb64.py and pairkeys.py stay sans-IO (STYLE.md section 1)."""
    root = Path(srp.__file__).parent
    for name in ("srp.py", "sb64.py", "pairkeys.py"):
        tree = ast.parse((root / name).read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"socket", "ssl", "threading", "asyncio", "pickle"}, name


# --- the login in memory ------------------------------------------------------------------------


def test_login_succeeds_and_keys_agree(
    alice_auth: keyfile.ServerAuth, make_pair: Pair, login: Login
) -> None:
    client, server = make_pair(alice_auth, "alice", ALICE_PW)
    ck, sk = login(client, server)
    assert ck == sk and len(ck) == 32
    assert server.authenticated and server.username == "alice"
    client2, server2 = make_pair(alice_auth, "alice", ALICE_PW)
    assert login(client2, server2)[0] != ck  # fresh per session


@pytest.mark.parametrize("index", sorted(srp.GROUPS))
def test_every_group_logs_in_and_fits_the_preauth_cap(index: int, login: Login) -> None:
    salt = bytes(range(1, 17))
    N, g = srp.GROUPS[index]
    entry = keyfile.VerifierEntry("u", srp.compute_verifier("u", "pw", salt, N, g), salt, index)
    client = srp.SrpClient("u", "pw", cb=b"c", role="data", options=b"")
    server = srp.SrpServer({"u": entry}.get, fake_secret=b"f", cb=b"c", role="data", options=b"")
    hello = client.hello()
    challenge = server.challenge(hello)
    proof = client.respond(challenge)
    server_proof = server.verify(proof)
    assert client.verify(server_proof) == server.session_key
    for message in (hello, challenge, proof, server_proof):
        assert len(message) < srp.MAX_MESSAGE
    L = (N.bit_length() + 7) // 8
    assert len(challenge) == 2 + 3 + 2 + 16 + 2 + L
    assert len(proof) == 2 + 2 + L + 2 + 32


def test_wrong_password_fails_at_server(alice_auth: keyfile.ServerAuth, make_pair: Pair) -> None:
    client, server = make_pair(alice_auth, "alice", "not the password")
    proof = client.respond(server.challenge(client.hello()))
    with pytest.raises(AuthenticationError, match="^authentication failed$"):
        server.verify(proof)
    assert not server.authenticated
    with pytest.raises(LocalProtocolError):
        _ = server.session_key
    # The server sends only the generic refusal; the client gets no key.
    with pytest.raises(AuthenticationError):
        client.verify(srp.failure_message())


def test_unknown_user_looks_like_a_real_one(
    alice_auth: keyfile.ServerAuth, make_pair: Pair
) -> None:
    def challenge_for(name: str) -> bytes:
        client, server = make_pair(alice_auth, name, "whatever")
        return server.challenge(client.hello())

    real = challenge_for("alice")
    ghost1 = challenge_for("mallory")
    ghost2 = challenge_for("mallory")
    other = challenge_for("trent")
    assert len(ghost1) == len(real)
    assert ghost1[:5] == real[:5]  # version, kind, index field (same default group)
    salt = ghost1[5:7]
    assert salt == real[5:7] == struct.pack(">H", 16)
    assert ghost1[7:23] == ghost2[7:23]  # same fake salt on every query
    assert ghost1[7:23] != other[7:23]
    assert ghost1[23:] != ghost2[23:]  # B is fresh
    assert real[7:23] == challenge_for("alice")[7:23]


def test_unknown_user_fails_with_the_same_message(
    alice_auth: keyfile.ServerAuth, make_pair: Pair
) -> None:
    client, server = make_pair(alice_auth, "mallory", "guess")
    proof = client.respond(server.challenge(client.hello()))
    with pytest.raises(AuthenticationError) as info:
        server.verify(proof)
    assert str(info.value) == "authentication failed"
    assert server.claimed_username == "mallory"


def test_fake_salt_depends_on_the_server_secret(alice_auth: keyfile.ServerAuth) -> None:
    def salt(secret: bytes) -> bytes:
        server = srp.SrpServer(
            alice_auth.lookup, fake_secret=secret, cb=b"", role="cmd", options=b""
        )
        client = srp.SrpClient("mallory", "x", cb=b"", role="cmd", options=b"")
        return server.challenge(client.hello())[7:23]

    assert salt(b"one") != salt(b"two")
    assert salt(b"one") == salt(b"one")


def _proof_with_A(A_bytes: bytes) -> bytes:
    return (
        bytes([1, 3])
        + struct.pack(">H", len(A_bytes))
        + A_bytes
        + struct.pack(">H", 32)
        + bytes(32)
    )


@pytest.mark.parametrize("case", ["zero", "N", "2N", "N+1", "all-ones", "longer", "shorter"])
def test_bad_A_rejected_before_any_pow(
    case: str, alice_auth: keyfile.ServerAuth, make_pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server = make_pair(alice_auth, "alice", ALICE_PW)
    server.challenge(client.hello())
    N, _ = srp.GROUPS[3]
    L = 256
    A_bytes = {
        "zero": bytes(L),
        "N": N.to_bytes(L, "big"),
        "2N": (2 * N).to_bytes(L + 1, "big"),
        "N+1": (N + 1).to_bytes(L, "big"),
        "all-ones": b"\xff" * L,
        "longer": b"\x00" + (5).to_bytes(L, "big"),
        "shorter": (5).to_bytes(L - 1, "big"),
    }[case]

    def no_pow(*args: object) -> int:
        raise AssertionError("pow called on a bad A")

    monkeypatch.setattr(srp, "pow", no_pow, raising=False)
    with pytest.raises(AuthenticationError) as info:
        server.verify(_proof_with_A(A_bytes))
    assert str(info.value) == "authentication failed"


def _challenge_with_B(B: int, index: int = 3, L: int = 256) -> bytes:
    fields = [bytes([index]), b"s" * 16, B.to_bytes(L, "big")]
    return bytes([1, 2]) + b"".join(struct.pack(">H", len(f)) + f for f in fields)


@pytest.mark.parametrize("B", [0, "N"])
def test_client_rejects_B_zero_mod_N(B: object) -> None:
    N, _ = srp.GROUPS[3]
    value = N if B == "N" else 0
    client = srp.SrpClient("alice", "pw", cb=b"", role="cmd", options=b"")
    client.hello()
    with pytest.raises(AuthenticationError):
        client.respond(_challenge_with_B(value))
    with pytest.raises(LocalProtocolError):  # no M1 ever comes out of this client
        client.verify(b"\x01\x04\x00\x20" + bytes(32))


def test_client_rejects_u_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(srp, "compute_u", lambda *a, **k: 0)
    client = srp.SrpClient("alice", "pw", cb=b"", role="cmd", options=b"")
    client.hello()
    with pytest.raises(AuthenticationError, match="u == 0"):
        client.respond(_challenge_with_B(12345))


@pytest.mark.parametrize("index", [0, 1, 6, 8, 255])
def test_client_rejects_unknown_group(index: int) -> None:
    client = srp.SrpClient("alice", "pw", cb=b"", role="cmd", options=b"")
    client.hello()
    with pytest.raises(AuthenticationError, match="group"):
        client.respond(_challenge_with_B(12345, index=index))


def test_client_rejects_B_of_wrong_length() -> None:
    client = srp.SrpClient("alice", "pw", cb=b"", role="cmd", options=b"")
    client.hello()
    with pytest.raises(RemoteProtocolError):
        client.respond(_challenge_with_B(12345, L=255))


def test_replayed_M1_is_rejected(
    alice_auth: keyfile.ServerAuth, make_pair: Pair, login: Login
) -> None:
    client, server = make_pair(alice_auth, "alice", ALICE_PW)
    hello = client.hello()
    old_proof = client.respond(server.challenge(hello))
    server.verify(old_proof)
    _, server2 = make_pair(alice_auth, "alice", ALICE_PW)
    server2.challenge(hello)
    with pytest.raises(AuthenticationError, match="^authentication failed$"):
        server2.verify(old_proof)


def test_replayed_M2_is_rejected(alice_auth: keyfile.ServerAuth, make_pair: Pair) -> None:
    client, server = make_pair(alice_auth, "alice", ALICE_PW)
    old_m2 = server.verify(client.respond(server.challenge(client.hello())))
    client2, server2 = make_pair(alice_auth, "alice", ALICE_PW)
    client2.respond(server2.challenge(client2.hello()))
    with pytest.raises(AuthenticationError):
        client2.verify(old_m2)


def test_channel_binding_mismatch_is_rejected(
    alice_auth: keyfile.ServerAuth, make_pair: Pair, login: Login
) -> None:
    """A relay presents its own certificate: the client's cb differs from the server's."""
    client, server = make_pair(
        alice_auth, "alice", ALICE_PW, client_cb=b"\x22" * 32, server_cb=b"\x11" * 32
    )
    with pytest.raises(AuthenticationError, match="^authentication failed$"):
        login(client, server)


@pytest.mark.parametrize(
    "override",
    [
        {"client_role": "data"},
        {"client_options": b"parnet/2"},
    ],
)
def test_role_and_options_are_bound(
    override: dict[str, object], alice_auth: keyfile.ServerAuth, make_pair: Pair, login: Login
) -> None:
    client, server = make_pair(alice_auth, "alice", ALICE_PW, **override)
    with pytest.raises(AuthenticationError):
        login(client, server)


def test_tampered_M1_and_M2(alice_auth: keyfile.ServerAuth, make_pair: Pair) -> None:
    client, server = make_pair(alice_auth, "alice", ALICE_PW)
    proof = bytearray(client.respond(server.challenge(client.hello())))
    proof[-1] ^= 1
    with pytest.raises(AuthenticationError):
        server.verify(bytes(proof))

    client, server = make_pair(alice_auth, "alice", ALICE_PW)
    m2 = bytearray(server.verify(client.respond(server.challenge(client.hello()))))
    m2[-5] ^= 0x80
    with pytest.raises(AuthenticationError, match="server's SRP proof is wrong"):
        client.verify(bytes(m2))


def test_state_machine_misuse(alice_auth: keyfile.ServerAuth, make_pair: Pair) -> None:
    client, server = make_pair(alice_auth, "alice", ALICE_PW)
    with pytest.raises(LocalProtocolError):
        client.respond(b"")
    with pytest.raises(LocalProtocolError):
        server.verify(b"")
    hello = client.hello()
    with pytest.raises(LocalProtocolError):
        client.hello()
    server.challenge(hello)
    with pytest.raises(LocalProtocolError):
        server.challenge(hello)
    with pytest.raises(LocalProtocolError):
        _ = server.username


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        srp.SrpClient("a", "p", cb=b"", role="other", options=b"")
    with pytest.raises(ValueError):
        srp.SrpClient("", "p", cb=b"", role="cmd", options=b"")
    with pytest.raises(ValueError):
        srp.SrpServer(lambda u: None, fake_secret=b"", cb=b"", role="cmd", options=b"")


def test_server_refusal_message_before_challenge() -> None:
    client = srp.SrpClient("a", "p", cb=b"", role="cmd", options=b"")
    client.hello()
    with pytest.raises(AuthenticationError):
        client.respond(srp.failure_message())


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x01",
        b"\x02\x01\x00\x01a",  # wrong version
        b"\x01\x03\x00\x01a",  # wrong kind
        b"\x01\x01\x00\x05a",  # truncated field
        b"\x01\x01\x00\x01ab",  # trailing byte
        b"\x01\x01\x00\x00",  # empty user name
        b"\x01\x01\x00\x02\xff\xfe",  # not UTF-8
        b"\x01\x01\x00\x03a\nb",  # newline in the name
        b"\x01\x01" + struct.pack(">H", 300) + b"a" * 300,  # too long a name
        b"\x01\x01" + struct.pack(">H", 5000) + b"a" * 5000,  # over the pre-auth cap
    ],
)
def test_malformed_hello(message: bytes) -> None:
    server = srp.SrpServer(lambda u: None, fake_secret=b"k", cb=b"", role="cmd", options=b"")
    with pytest.raises(RemoteProtocolError):
        server.challenge(message)


# --- fuzz: every parse entry point raises only the two documented errors ------------------------

_FUZZ = settings(
    max_examples=150,  # random each run (hypothesis prints the seed of a failure)
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _framed(kind: int) -> st.SearchStrategy[bytes]:
    """Mostly-well-formed messages of ``kind`` with random fields, plus raw noise."""
    field = st.binary(max_size=300).map(lambda b: struct.pack(">H", len(b)) + b)
    framed = st.lists(field, max_size=4).map(lambda fs: bytes([1, kind]) + b"".join(fs))
    return st.one_of(st.binary(max_size=600), framed)


def _fields(message: bytes, kind: int) -> list[bytes]:
    """The length-prefixed fields of a well-formed message of ``kind`` (asserts the format)."""
    assert message[:2] == bytes([1, kind])
    out, pos = [], 2
    while pos < len(message):
        (n,) = struct.unpack_from(">H", message, pos)
        out.append(message[pos + 2 : pos + 2 + n])
        pos += 2 + n
    assert pos == len(message)
    return out


def _check_challenge(out: bytes, hello: bytes, claimed: str | None) -> None:
    """A challenge the server sent for ``hello``: group, salt and a safe B of the right size."""
    raw_index, salt, raw_B = _fields(out, 2)
    N, _ = srp.GROUPS[raw_index[0]]
    assert 0 < len(salt) <= 64 and len(raw_B) == (N.bit_length() + 7) // 8
    assert 0 < int.from_bytes(raw_B, "big") < N
    assert _fields(hello, 1)[0].decode() == claimed


def _small_entry() -> keyfile.VerifierEntry:
    salt = b"\x01" * 16
    N, g = srp.GROUPS[2]
    return keyfile.VerifierEntry("u", srp.compute_verifier("u", "pw", salt, N, g), salt, 2)


_ENTRY = _small_entry()
_OK = (RemoteProtocolError, AuthenticationError)


@_FUZZ
@given(_framed(1))
def test_fuzz_server_challenge(data: bytes) -> None:
    server = srp.SrpServer({"u": _ENTRY}.get, fake_secret=b"k", cb=b"", role="cmd", options=b"")
    try:
        out = server.challenge(data)
    except _OK:
        return
    _check_challenge(out, data, server.claimed_username)


@_FUZZ
@given(
    st.one_of(
        _framed(3),
        st.binary(min_size=192, max_size=192).map(_proof_with_A),  # |N| for the 1536-bit group
    )
)
def test_fuzz_server_verify(data: bytes) -> None:
    server = srp.SrpServer({"u": _ENTRY}.get, fake_secret=b"k", cb=b"", role="cmd", options=b"")
    server.challenge(srp.SrpClient("u", "pw", cb=b"", role="cmd", options=b"").hello())
    with pytest.raises(_OK):
        server.verify(data)


@_FUZZ
@given(_framed(2))
def test_fuzz_client_respond(data: bytes) -> None:
    client = srp.SrpClient("u", "pw", cb=b"", role="cmd", options=b"")
    client.hello()
    try:
        out = client.respond(data)
    except _OK:
        return
    # accepted only a well-formed challenge with a usable B; the proof is (A, M1)
    raw_index, _, raw_B = _fields(data, 2)
    N, _ = srp.GROUPS[raw_index[0]]
    assert int.from_bytes(raw_B, "big") % N != 0
    raw_A, m1 = _fields(out, 3)
    assert len(raw_A) == len(raw_B) and 0 < int.from_bytes(raw_A, "big") < N and len(m1) == 32


_SERVER = srp.SrpServer({"u": _ENTRY}.get, fake_secret=b"k", cb=b"", role="cmd", options=b"")
_CLIENT_HELLO_CHALLENGE = _SERVER.challenge(
    srp.SrpClient("u", "pw", cb=b"", role="cmd", options=b"").hello()
)


@settings(_FUZZ, max_examples=60)
@given(_framed(4))
def test_fuzz_client_verify(data: bytes) -> None:
    client = srp.SrpClient("u", "pw", cb=b"", role="cmd", options=b"")
    client.hello()
    client.respond(_CLIENT_HELLO_CHALLENGE)
    with pytest.raises(_OK):
        client.verify(data)
