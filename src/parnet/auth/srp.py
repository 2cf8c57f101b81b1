"""SRP-6a login bound to the TLS channel: sans-IO ``SrpClient`` and ``SrpServer``.

Theory of operation (SECURITY.md, "The client-server login"). Four messages run inside the
TLS 1.3 connection, right after the handshake::

    client                                    server
    hello(I)                    ------>       look up (v, s, group) for I, or fake them
                                <------       challenge(group index, s, PAD(B))
    check B, compute S, M1
    proof(PAD(A), M1)           ------>       check A, compute S, check M1
                                <------       server_proof(M2)  (only if M1 was right)
    check M2 -> Ksess                         -> username, Ksess

Math: RFC 5054 SRP-6a over its groups, with ``k = H(PAD(N) | PAD(g))``,
``u = H(PAD(A) | PAD(B))`` and H = SHA-256, except ``x = SHA1(s | SHA1(I ":" P))`` so that the
GnuTLS ``tpasswd`` verifiers written by ``srptool`` work. The shared value S is then bound to
everything both sides saw, including the TLS certificate (``cb``), the port role and the
caller's protocol options::

    T     = SHA-256(lp("parnet-srp-v1") || lp(role) || lp(I) || lp(group index, decimal)
                    || lp(PAD(N)) || lp(PAD(g)) || lp(s) || lp(PAD(A)) || lp(PAD(B))
                    || lp("tls-server-end-point") || lp(cb) || lp(options))
    K     = SHA-256(PAD(S))
    M1    = HMAC-SHA256(K, "parnet client proof" || T)
    M2    = HMAC-SHA256(K, "parnet server proof" || T || M1)
    Ksess = HKDF-SHA256(K, info = "parnet session" || T)

where ``lp(x)`` is a 4-byte big-endian length then x. Each side uses its own view of cb, so a
relay that terminates TLS with another certificate makes M1 fail. A and B are fresh each
session, so a replayed M1 or M2 never verifies.

Wire encoding of the four messages: ``version (1 byte) || kind (1 byte)`` then a fixed number of
fields, each a 2-byte big-endian length and its bytes, nothing after; every message is under
``MAX_MESSAGE`` bytes (about 1.1 KiB for the 8192-bit group). Anything else raises
``RemoteProtocolError``. No pickle, no variable-size allocation beyond the received bytes.

Invariants: the server rejects ``A`` unless it is exactly ``|N|`` bytes with ``0 < A < N``,
before any modular exponentiation, with the same ``AuthenticationError("authentication
failed")`` as a wrong password or an unknown user. An unknown user gets a challenge of the
same shape and cost, in the default group: salt ``HMAC(fake_secret, "salt" || I)[:16]`` (the
same on every query) and a verifier derived the same way without a ``pow``. The client aborts
without sending M1 if ``B % N == 0`` or ``u == 0``, and returns the session key only after M2
checks out. Every proof comparison is ``hmac.compare_digest``. This module does no I/O and
imports no ``socket``, ``ssl`` or ``threading``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from parnet.auth.pairkeys import hkdf_sha256
from parnet.constants import MAX_PREAUTH_FRAME
from parnet.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_GROUP_INDEX",
    "GROUPS",
    "GROUP_1024",
    "MAX_MESSAGE",
    "SrpClient",
    "SrpServer",
    "VerifierEntry",
    "client_premaster",
    "compute_A",
    "compute_B",
    "compute_k",
    "compute_u",
    "compute_verifier",
    "compute_x",
    "failure_message",
    "normalize_password",
    "pad",
    "server_premaster",
]

# RFC 5054 Appendix A groups (the 3072-, 4096- and 8192-bit ones are RFC 3526's MODP primes),
# checked against srptool --create-conf output by the tests.
_N1024 = int(
    "EEAF0AB9ADB38DD69C33F80AFA8FC5E86072618775FF3C0B9EA2314C9C256576"
    "D674DF7496EA81D3383B4813D692C6E0E0D5D8E250B98BE48E495C1D6089DAD1"
    "5DC7D7B46154D6B6CE8EF4AD69B15D4982559B297BCF1885C529F566660E57EC"
    "68EDBC3C05726CC02FD4CBF4976EAA9AFD5138FE8376435B9FC61D2FC0EB06E3",
    16,
)
_N1536 = int(
    "9DEF3CAFB939277AB1F12A8617A47BBBDBA51DF499AC4C80BEEEA9614B19CC4D"
    "5F4F5F556E27CBDE51C6A94BE4607A291558903BA0D0F84380B655BB9A22E8DC"
    "DF028A7CEC67F0D08134B1C8B97989149B609E0BE3BAB63D47548381DBC5B1FC"
    "764E3F4B53DD9DA1158BFD3E2B9C8CF56EDF019539349627DB2FD53D24B7C486"
    "65772E437D6C7F8CE442734AF7CCB7AE837C264AE3A9BEB87F8A2FE9B8B5292E"
    "5A021FFF5E91479E8CE7A28C2442C6F315180F93499A234DCF76E3FED135F9BB",
    16,
)
_N2048 = int(
    "AC6BDB41324A9A9BF166DE5E1389582FAF72B6651987EE07FC3192943DB56050"
    "A37329CBB4A099ED8193E0757767A13DD52312AB4B03310DCD7F48A9DA04FD50"
    "E8083969EDB767B0CF6095179A163AB3661A05FBD5FAAAE82918A9962F0B93B8"
    "55F97993EC975EEAA80D740ADBF4FF747359D041D5C33EA71D281E446B14773B"
    "CA97B43A23FB801676BD207A436C6481F1D2B9078717461A5B9D32E688F87748"
    "544523B524B0D57D5EA77A2775D2ECFA032CFBDBF52FB3786160279004E57AE6"
    "AF874E7303CE53299CCC041C7BC308D82A5698F3A8D0C38271AE35F8E9DBFBB6"
    "94B5C803D89F7AE435DE236D525F54759B65E372FCD68EF20FA7111F9E4AFF73",
    16,
)
_N3072 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)
_N4096 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
    "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
    "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF",
    16,
)
_N8192 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
    "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
    "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C93402849236C3FAB4D27C7026"
    "C1D4DCB2602646DEC9751E763DBA37BDF8FF9406AD9E530EE5DB382F413001AE"
    "B06A53ED9027D831179727B0865A8918DA3EDBEBCF9B14ED44CE6CBACED4BB1B"
    "DB7F1447E6CC254B332051512BD7AF426FB8F401378CD2BF5983CA01C64B92EC"
    "F032EA15D1721D03F482D7CE6E74FEF6D55E702F46980C82B5A84031900B1C9E"
    "59E7C97FBEC7E8F323A97A7E36CC88BE0F1D45B7FF585AC54BD407B22B4154AA"
    "CC8F6D7EBF48E1D814CC5ED20F8037E0A79715EEF29BE32806A1D58BB7C5DA76"
    "F550AA3D8A1FBFF0EB19CCB1A313D55CDA56C9EC2EF29632387FE8D76E3C0468"
    "043E8F663F4860EE12BF2D5B0B7474D6E694F91E6DBE115974A3926F12FEE5E4"
    "38777CB6A932DF8CD8BEC4D073B931BA3BC832B68D9DD300741FA7BF8AFC47ED"
    "2576F6936BA424663AAB639C5AE4F5683423B4742BF1C978238F16CBE39D652D"
    "E3FDB8BEFC848AD922222E04A4037C0713EB57A81A23F0C73473FC646CEA306B"
    "4BCBC8862F8385DDFA9D4B7FA2C087E879683303ED5BDD3A062B3CF5B3A278A6"
    "6D2A13F83F44F82DDF310EE074AB6A364597E899A0255DC164F31CC50846851D"
    "F9AB48195DED7EA1B1D510BD7EE74D73FAF36BC31ECFA268359046F4EB879F92"
    "4009438B481C6CD7889A002ED5EE382BC9190DA6FC026E479558E4475677E9AA"
    "9E3050E2765694DFC81F56E880B96E7160C980DD98EDD3DFFFFFFFFFFFFFFFFF",
    16,
)

#: GnuTLS ``tpasswd.conf`` index -> (N, g), as ``srptool --create-conf`` writes them.
GROUPS: dict[int, tuple[int, int]] = {
    2: (_N1536, 2),
    3: (_N2048, 2),
    4: (_N3072, 5),
    5: (_N4096, 5),
    7: (_N8192, 19),
}
#: The 2048-bit group, what ``parnet keygen`` uses.
DEFAULT_GROUP_INDEX = 3
#: RFC 5054's 1024-bit group (old srptool index 1): too weak to accept, kept for the test
#: vectors and to recognise old files.
GROUP_1024: tuple[int, int] = (_N1024, 2)

#: Upper bound on any encoded login message (the pre-auth frame cap).
MAX_MESSAGE = MAX_PREAUTH_FRAME

_VERSION = 1


@dataclass(frozen=True)
class VerifierEntry:
    """One user's line of a ``tpasswd`` file.

    Attributes:
        username: the user name.
        verifier: v = g^x mod N.
        salt: the salt s.
        index: the group's index in ``tpasswd.conf`` (a key of ``srp.GROUPS``).
    """

    username: str
    verifier: int = field(repr=False)
    salt: bytes = field(repr=False)
    index: int


_HELLO, _CHALLENGE, _PROOF, _SERVER_PROOF, _FAILURE = 1, 2, 3, 4, 5
_KIND_NAMES = {1: "hello", 2: "challenge", 3: "proof", 4: "server proof", 5: "failure"}
_MAX_USERNAME = 256
_MAX_SALT = 64
_MAC_LEN = 32
_SECRET_BITS = 256
_FAKE_SALT_LEN = 16
_ROLES = ("cmd", "data")
_GENERIC = "authentication failed"


# --- the math, with the hash as a parameter (RFC 5054 vectors use SHA1 throughout) -----------


def _h(hash_name: str, *parts: bytes) -> bytes:
    h = hashlib.new(hash_name)
    for p in parts:
        h.update(p)
    return h.digest()


def _nbytes(N: int) -> int:
    return (N.bit_length() + 7) // 8


def pad(value: int, length: int) -> bytes:
    """``value`` as big-endian bytes, left-padded with zeros to ``length`` (RFC 5054 PAD)."""
    return value.to_bytes(length, "big")


def normalize_password(password: str) -> str:
    """Normalize a password as GnuTLS does before hashing (RFC 7613 OpaqueString, roughly).

    Non-ASCII spaces become U+0020, then NFC. ASCII passwords are unchanged.
    """
    mapped = "".join(" " if unicodedata.category(c) == "Zs" else c for c in password)
    return unicodedata.normalize("NFC", mapped)


def compute_k(N: int, g: int, hash_name: str = "sha256") -> int:
    """SRP-6a multiplier ``k = H(PAD(N) | PAD(g))``."""
    L = _nbytes(N)
    return int.from_bytes(_h(hash_name, pad(N, L), pad(g, L)), "big")


def compute_u(A: int, B: int, N: int, hash_name: str = "sha256") -> int:
    """Scrambling parameter ``u = H(PAD(A) | PAD(B))``."""
    L = _nbytes(N)
    return int.from_bytes(_h(hash_name, pad(A, L), pad(B, L)), "big")


def compute_x(username: str, password: str, salt: bytes, hash_name: str = "sha1") -> int:
    """Private key ``x = H(salt | H(username ":" password))``, password normalized.

    SHA1 is what GnuTLS uses for ``tpasswd`` verifiers; other hashes are for test vectors only.
    """
    inner = _h(hash_name, username.encode() + b":" + normalize_password(password).encode())
    return int.from_bytes(_h(hash_name, bytes(salt), inner), "big")


def compute_verifier(username: str, password: str, salt: bytes, N: int, g: int) -> int:
    """The GnuTLS ``tpasswd`` verifier ``v = g^x mod N`` with ``x = SHA1(salt | SHA1(I:P))``.

    Args:
        username: the user name I, as UTF-8.
        password: the password P (normalized as GnuTLS does).
        salt: the salt s.
        N: the group prime.
        g: the group generator.

    Returns:
        v as an int.
    """
    return pow(g, compute_x(username, password, salt), N)


def compute_A(N: int, g: int, a: int) -> int:
    """Client public value ``A = g^a mod N``."""
    return pow(g, a, N)


def compute_B(N: int, g: int, k: int, v: int, b: int) -> int:
    """Server public value ``B = (k*v + g^b) mod N``."""
    return (k * v + pow(g, b, N)) % N


def client_premaster(N: int, g: int, k: int, x: int, a: int, u: int, B: int) -> int:
    """Client's shared value ``S = (B - k*g^x) ^ (a + u*x) mod N``."""
    return pow((B - k * pow(g, x, N)) % N, a + u * x, N)


def server_premaster(N: int, v: int, b: int, u: int, A: int) -> int:
    """Server's shared value ``S = (A * v^u) ^ b mod N``."""
    return pow(A * pow(v, u, N) % N, b, N)


def _random_secret(N: int) -> int:
    while True:
        r = secrets.randbits(_SECRET_BITS) % N
        if r > 1:
            return r


# --- the transcript and the proofs --------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _transcript(
    role: str,
    username: bytes,
    index: int,
    salt: bytes,
    A: int,
    B: int,
    cb: bytes,
    options: bytes,
) -> bytes:
    N, g = GROUPS[index]
    L = _nbytes(N)
    h = hashlib.sha256()
    for part in (
        b"parnet-srp-v1",
        role.encode(),
        username,
        str(index).encode(),
        pad(N, L),
        pad(g, L),
        salt,
        pad(A, L),
        pad(B, L),
        b"tls-server-end-point",
        cb,
        options,
    ):
        h.update(_lp(part))
    return h.digest()


def _proof_keys(S: int, N: int, T: bytes) -> tuple[bytes, bytes, bytes]:
    """K, M1 and Ksess from the shared value S and the transcript T."""
    K = hashlib.sha256(pad(S, _nbytes(N))).digest()
    M1 = hmac.new(K, b"parnet client proof" + T, hashlib.sha256).digest()
    ksess = hkdf_sha256(K, b"parnet session" + T, 32)
    return K, M1, ksess


def _server_mac(K: bytes, T: bytes, M1: bytes) -> bytes:
    return hmac.new(K, b"parnet server proof" + T + M1, hashlib.sha256).digest()


# --- message encoding ---------------------------------------------------------------------------


def _pack(kind: int, *fields: bytes) -> bytes:
    out = bytearray((_VERSION, kind))
    for f in fields:
        out += struct.pack(">H", len(f)) + f
    return bytes(out)


def _unpack(message: bytes, kind: int, count: int) -> list[bytes]:
    """Split a message of ``kind`` into exactly ``count`` fields, or raise."""
    data = bytes(message)
    name = _KIND_NAMES[kind]
    if len(data) > MAX_MESSAGE:
        raise RemoteProtocolError(f"SRP {name} message too long ({len(data)} bytes)")
    if len(data) < 2 or data[0] != _VERSION:
        raise RemoteProtocolError(f"SRP {name}: bad message version")
    if data[1] == _FAILURE and len(data) == 2:
        raise AuthenticationError(_GENERIC)
    if data[1] != kind:
        raise RemoteProtocolError(f"SRP {name}: unexpected message kind {data[1]}")
    fields = []
    pos = 2
    for _ in range(count):
        if pos + 2 > len(data):
            raise RemoteProtocolError(f"SRP {name}: truncated message")
        (n,) = struct.unpack_from(">H", data, pos)
        pos += 2
        if pos + n > len(data):
            raise RemoteProtocolError(f"SRP {name}: truncated field")
        fields.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise RemoteProtocolError(f"SRP {name}: trailing bytes")
    return fields


def failure_message() -> bytes:
    """The generic refusal a server may send instead of a challenge or M2.

    The client's ``respond`` / ``verify`` turn it into ``AuthenticationError``. It carries no
    reason, so it reveals nothing.
    """
    return _pack(_FAILURE)


def _check_binding(cb: bytes, role: str, options: bytes) -> tuple[bytes, str, bytes]:
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, not {role!r}")
    if not isinstance(cb, bytes | bytearray) or not isinstance(options, bytes | bytearray):
        raise TypeError("cb and options must be bytes")
    return bytes(cb), role, bytes(options)


def _encode_username(username: str) -> bytes:
    raw = username.encode("utf-8")
    if not 0 < len(raw) <= _MAX_USERNAME or any(c in username for c in "\x00\r\n"):
        raise ValueError("username must be 1-256 UTF-8 bytes without NUL or newlines")
    return raw


# --- the two state machines ---------------------------------------------------------------------


class SrpClient:
    """The client side of one login: feed it the server's messages, send what it returns.

    Use: ``hello()`` -> send; ``respond(challenge)`` -> send; ``verify(server_proof)`` ->
    session key. Each object serves one login; any error leaves it failed (make a new one).
    """

    def __init__(
        self, username: str, password: str, *, cb: bytes, role: str, options: bytes
    ) -> None:
        """Prepare a login.

        Args:
            username: the user name I.
            password: the password P (never sent; only a proof of it is).
            cb: the channel binding: ``tls.cert_binding`` of the certificate the server
                presented (``getpeercert(binary_form=True)``).
            role: ``"cmd"`` or ``"data"``, the port this connection is on.
            options: protocol version and options as agreed bytes; must equal the server's.

        Raises:
            ValueError: a bad role or username (the caller's mistake).
        """
        self._cb, self._role, self._options = _check_binding(cb, role, options)
        self._username = _encode_username(username)
        self._password = password
        self._state = "start"
        self._K = b""
        self._T = b""
        self._M1 = b""
        self._ksess = b""

    def _expect(self, state: str, what: str) -> None:
        if self._state != state:
            raise LocalProtocolError(f"SrpClient.{what}() called in state {self._state!r}")

    def hello(self) -> bytes:
        """Message 1: the user name.

        Returns:
            The encoded hello to send.
        """
        self._expect("start", "hello")
        self._state = "hello_sent"
        return _pack(_HELLO, self._username)

    def respond(self, challenge: bytes) -> bytes:
        """Take message 2 (group, salt, B) and return message 3 (A, M1).

        Args:
            challenge: the server's reply to the hello.

        Returns:
            The encoded proof to send.

        Raises:
            RemoteProtocolError: malformed challenge; close the connection.
            AuthenticationError: the server refused, offered an unknown group, or sent an
                unsafe B (``B % N == 0`` or ``u == 0``); nothing must be sent. Do not retry.
        """
        self._expect("hello_sent", "respond")
        self._state = "failed"
        fields = _unpack(challenge, _CHALLENGE, 3)
        raw_index, salt, raw_B = fields
        if len(raw_index) != 1 or not 0 < len(salt) <= _MAX_SALT:
            raise RemoteProtocolError("SRP challenge: bad group index or salt field")
        index = raw_index[0]
        if index not in GROUPS:
            raise AuthenticationError(f"server offered an unknown SRP group (index {index})")
        N, g = GROUPS[index]
        L = _nbytes(N)
        if len(raw_B) != L:
            raise RemoteProtocolError("SRP challenge: B has the wrong length")
        B = int.from_bytes(raw_B, "big")
        if B % N == 0:
            raise AuthenticationError("server sent an invalid SRP value B")
        a = _random_secret(N)
        A = compute_A(N, g, a)
        u = compute_u(A, B, N)
        if u == 0:
            raise AuthenticationError("server sent an invalid SRP value B (u == 0)")
        username = self._username.decode()
        x = compute_x(username, self._password, salt)
        S = client_premaster(N, g, compute_k(N, g), x, a, u, B)
        T = _transcript(self._role, self._username, index, salt, A, B, self._cb, self._options)
        self._K, self._M1, self._ksess = _proof_keys(S, N, T)
        self._T = T
        self._state = "proof_sent"
        return _pack(_PROOF, pad(A, L), self._M1)

    def verify(self, server_proof: bytes) -> bytes:
        """Check message 4 (M2) and return the session key.

        Args:
            server_proof: the server's last message.

        Returns:
            Ksess, 32 bytes, known only to this client and this server.

        Raises:
            RemoteProtocolError: malformed message; close the connection.
            AuthenticationError: the server refused the proof (wrong password or user), or its
                M2 is wrong (a server that does not hold the verifier, or a relay). Send
                nothing more on this connection and do not retry.
        """
        self._expect("proof_sent", "verify")
        self._state = "failed"
        (M2,) = _unpack(server_proof, _SERVER_PROOF, 1)
        expected = _server_mac(self._K, self._T, self._M1)
        if not hmac.compare_digest(expected, M2):
            raise AuthenticationError(
                "the server's SRP proof is wrong (not the real server, or a man in the middle)"
            )
        self._state = "done"
        return self._ksess


class SrpServer:
    """The server side of one login: feed it the client's messages, send what it returns.

    Use: ``challenge(hello)`` -> send; ``verify(proof)`` -> send M2, then read ``username``
    and ``session_key``. On ``AuthenticationError`` send ``failure_message()`` (or just close)
    and log the generic failure. Each object serves one login.
    """

    def __init__(
        self,
        lookup: Callable[[str], VerifierEntry | None],
        *,
        fake_secret: bytes,
        cb: bytes,
        role: str,
        options: bytes,
    ) -> None:
        """Prepare to answer one login.

        Args:
            lookup: user name -> ``VerifierEntry`` or ``None`` (``ServerAuth.lookup``).
            fake_secret: server secret for unknown users' fake salts and verifiers; stable for
                the process so that repeated queries get the same salt.
            cb: the channel binding of this server's own certificate.
            role: ``"cmd"`` or ``"data"``.
            options: protocol version and options as agreed bytes.

        Raises:
            ValueError: a bad role or an empty fake secret.
        """
        self._cb, self._role, self._options = _check_binding(cb, role, options)
        if not fake_secret:
            raise ValueError("fake_secret must not be empty")
        self._lookup = lookup
        self._fake_secret = bytes(fake_secret)
        self._state = "start"
        self._claimed: str | None = None
        self._username = b""
        self._fake = True
        self._index = DEFAULT_GROUP_INDEX
        self._salt = b""
        self._v = 0
        self._b = 0
        self._B = 0
        self._ksess = b""

    def _expect(self, state: str, what: str) -> None:
        if self._state != state:
            raise LocalProtocolError(f"SrpServer.{what}() called in state {self._state!r}")

    @property
    def claimed_username(self) -> str | None:
        """The name the client asked for (unverified; for logs), once the hello is parsed."""
        return self._claimed

    @property
    def authenticated(self) -> bool:
        """True once ``verify`` has accepted the client's proof."""
        return self._state == "done"

    @property
    def username(self) -> str:
        """The authenticated user name. Raises ``LocalProtocolError`` before success."""
        if self._state != "done":
            raise LocalProtocolError("SrpServer.username read before authentication")
        return self._username.decode()

    @property
    def session_key(self) -> bytes:
        """Ksess (32 bytes). Raises ``LocalProtocolError`` before success."""
        if self._state != "done":
            raise LocalProtocolError("SrpServer.session_key read before authentication")
        return self._ksess

    def _fake_entry(self, username: bytes, L: int, N: int) -> tuple[bytes, int]:
        salt = hmac.new(self._fake_secret, b"salt\0" + username, hashlib.sha256).digest()
        ikm = hmac.new(self._fake_secret, b"verifier\0" + username, hashlib.sha256).digest()
        v = int.from_bytes(hkdf_sha256(ikm, b"parnet fake verifier", L), "big") % N
        return salt[:_FAKE_SALT_LEN], v or 1

    def challenge(self, hello: bytes) -> bytes:
        """Take message 1 (the user name) and return message 2 (group, salt, B).

        An unknown user gets a fake challenge of the same shape and cost, with the same salt
        every time; the login then fails at ``verify``.

        Args:
            hello: the client's first message.

        Returns:
            The encoded challenge to send.

        Raises:
            RemoteProtocolError: malformed hello; close the connection.
        """
        self._expect("start", "challenge")
        self._state = "failed"
        (raw_user,) = _unpack(hello, _HELLO, 1)
        try:
            name = raw_user.decode("utf-8")
            _encode_username(name)
        except (UnicodeDecodeError, ValueError):
            raise RemoteProtocolError("SRP hello: bad user name") from None
        self._claimed = name
        self._username = raw_user
        entry = self._lookup(name)
        if entry is not None and entry.index in GROUPS and 0 < len(entry.salt) <= _MAX_SALT:
            self._fake = False
            self._index = entry.index
            N, g = GROUPS[self._index]
            self._salt, self._v = bytes(entry.salt), entry.verifier % N
        else:
            self._fake = True
            self._index = DEFAULT_GROUP_INDEX
            N, g = GROUPS[self._index]
            self._salt, self._v = self._fake_entry(raw_user, _nbytes(N), N)
        L = _nbytes(N)
        k = compute_k(N, g)
        while True:
            self._b = _random_secret(N)
            self._B = compute_B(N, g, k, self._v, self._b)
            if self._B != 0:
                break
        self._state = "challenged"
        return _pack(_CHALLENGE, bytes([self._index]), self._salt, pad(self._B, L))

    def verify(self, proof: bytes) -> bytes:
        """Take message 3 (A, M1) and return message 4 (M2).

        Args:
            proof: the client's proof.

        Returns:
            The encoded server proof to send; ``username`` and ``session_key`` are then set.

        Raises:
            RemoteProtocolError: malformed message structure; close the connection.
            AuthenticationError: ``"authentication failed"`` for a wrong password, an unknown
                user, or an invalid A (checked before any exponentiation): all alike, so the
                reply reveals nothing. Count it toward rate limiting and close.
        """
        self._expect("challenged", "verify")
        self._state = "failed"
        raw_A, M1 = _unpack(proof, _PROOF, 2)
        N, g = GROUPS[self._index]
        L = _nbytes(N)
        if len(raw_A) != L or len(M1) != _MAC_LEN:
            raise AuthenticationError(_GENERIC)
        A = int.from_bytes(raw_A, "big")
        if A == 0 or A >= N:  # covers A = 0, N, 2N, ... and anything not reduced mod N
            raise AuthenticationError(_GENERIC)
        u = compute_u(A, self._B, N)
        if u == 0:
            raise AuthenticationError(_GENERIC)
        S = server_premaster(N, self._v, self._b, u, A)
        T = _transcript(
            self._role,
            self._username,
            self._index,
            self._salt,
            A,
            self._B,
            self._cb,
            self._options,
        )
        K, expected, ksess = _proof_keys(S, N, T)
        ok = hmac.compare_digest(expected, M1)
        if not ok or self._fake:
            raise AuthenticationError(_GENERIC)
        self._ksess = ksess
        self._state = "done"
        return _pack(_SERVER_PROOF, _server_mac(K, T, M1))
