"""Pairwise keys and tags for server-to-server (and client data) links.

Theory of operation (SECURITY.md, "Server-to-server links: pairwise keys"): one shared network
key would let a compromised server impersonate every other one, and a symmetric
challenge-response under one key can be reflected between two connections. So the client
draws a per-network master secret R that it never sends, derives one key per unordered pair of
nodes::

    K_ij = HKDF-SHA256(R, info = "pair" || lp(netid) || u32(min(i, j)) || u32(max(i, j)))

and hands server i only ``{K_ij : j != i}`` over its authenticated command channel. On a data
link from i (initiator) to j (responder) both sides send fresh nonces (responder first), then::

    tag_init = HMAC(K_ij, "parnet-s2s-v1 init" || lp(netid) || u32(i) || u32(j)
                          || lp(n_init) || lp(n_resp) || lp(cb))
    tag_resp = HMAC(K_ij, "parnet-s2s-v1 resp" || ... same ... || lp(tag_init))

The direction label and the ordered (i, j) make the two tags different, so a tag cannot be
reflected back; ``lp(x)`` (4-byte big-endian length, then x) and fixed-width ``u32`` node ids
make every input unambiguous. The responder checks ``tag_init`` with ``hmac.compare_digest``
before it answers. Pure functions: no sockets, no state.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "hkdf_sha256",
    "init_tag",
    "new_master_secret",
    "new_nonce",
    "pair_key",
    "resp_tag",
    "verify_tag",
]

#: Size of the master secret, pair keys and tags, in bytes.
KEY_SIZE = 32
#: Size of each side's fresh nonce on a data link.
NONCE_SIZE = 32

_HASH_LEN = 32
_MAX_NODE = 0xFFFFFFFF


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32, salt: bytes = b"") -> bytes:
    """HKDF-SHA256 (RFC 5869), extract then expand.

    Args:
        ikm: input keying material.
        info: context and application specific information.
        length: output size in bytes (at most 255 * 32).
        salt: optional salt; empty means a block of zeros, as the RFC says.

    Returns:
        ``length`` bytes of output keying material.
    """
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError("HKDF output length out of range")
    prk = hmac.new(salt or bytes(_HASH_LEN), bytes(ikm), hashlib.sha256).digest()
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + bytes(info) + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return bytes(out[:length])


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + bytes(data)


def _node(i: int) -> bytes:
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= _MAX_NODE:
        raise ValueError(f"node index out of range: {i!r}")
    return struct.pack(">I", i)


def new_master_secret() -> bytearray:
    """A fresh per-network master secret R (32 random bytes).

    Returns:
        A ``bytearray``, so the owner can overwrite it when the network closes (best effort:
        Python may have copied it elsewhere).
    """
    return bytearray(secrets.token_bytes(KEY_SIZE))


def new_nonce() -> bytes:
    """A fresh link nonce of ``NONCE_SIZE`` random bytes."""
    return secrets.token_bytes(NONCE_SIZE)


def pair_key(master: bytes | bytearray, netid: bytes, i: int, j: int) -> bytes:
    """The key K_ij shared by nodes i and j of one network.

    Args:
        master: the network's master secret R.
        netid: the network id.
        i: one node index.
        j: the other node index (must differ from ``i``).

    Returns:
        32 bytes; ``pair_key(R, n, i, j) == pair_key(R, n, j, i)``.

    Raises:
        ValueError: ``i == j``, an index outside 0..2**32-1, or an empty master secret.
    """
    if i == j:
        raise ValueError("a node has no pair key with itself")
    if not master:
        raise ValueError("empty master secret")
    lo, hi = (i, j) if i < j else (j, i)
    info = b"pair" + _lp(netid) + _node(lo) + _node(hi)
    return hkdf_sha256(bytes(master), info, KEY_SIZE)


def _tag_input(netid: bytes, i: int, j: int, n_init: bytes, n_resp: bytes, cb: bytes) -> bytes:
    return _lp(netid) + _node(i) + _node(j) + _lp(n_init) + _lp(n_resp) + _lp(cb)


def init_tag(
    key: bytes, netid: bytes, i: int, j: int, n_init: bytes, n_resp: bytes, cb: bytes
) -> bytes:
    """The initiator's tag on a data link from node i to node j.

    Args:
        key: K_ij.
        netid: the network id.
        i: the initiator's node index.
        j: the responder's node index.
        n_init: the initiator's nonce.
        n_resp: the responder's nonce (sent first).
        cb: the channel binding (``tls.cert_binding`` of the responder's certificate).

    Returns:
        32-byte HMAC-SHA256 tag.
    """
    msg = b"parnet-s2s-v1 init" + _tag_input(netid, i, j, n_init, n_resp, cb)
    return hmac.new(bytes(key), msg, hashlib.sha256).digest()


def resp_tag(
    key: bytes,
    netid: bytes,
    i: int,
    j: int,
    n_init: bytes,
    n_resp: bytes,
    cb: bytes,
    tag_init: bytes,
) -> bytes:
    """The responder's tag, sent only after ``tag_init`` has verified.

    Args:
        key: K_ij.
        netid: the network id.
        i: the initiator's node index.
        j: the responder's node index.
        n_init: the initiator's nonce.
        n_resp: the responder's nonce.
        cb: the channel binding, as for ``init_tag``.
        tag_init: the initiator's tag it answers.

    Returns:
        32-byte HMAC-SHA256 tag, never equal to an init tag for the same inputs.
    """
    msg = b"parnet-s2s-v1 resp" + _tag_input(netid, i, j, n_init, n_resp, cb) + _lp(tag_init)
    return hmac.new(bytes(key), msg, hashlib.sha256).digest()


def verify_tag(expected: bytes, received: bytes) -> bool:
    """Constant-time tag comparison (``hmac.compare_digest``)."""
    return hmac.compare_digest(bytes(expected), bytes(received))
