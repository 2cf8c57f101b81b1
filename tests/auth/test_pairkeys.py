"""Pairwise data-link keys and tags: symmetric keys, direction-bound tags, HKDF correctness."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from parnet.auth import pairkeys

R = bytes(range(32))
NET = b"net-0001"
N_INIT = b"\x01" * pairkeys.NONCE_SIZE
N_RESP = b"\x02" * pairkeys.NONCE_SIZE
CB = b"\x03" * 32


def test_hkdf_rfc5869_case_1() -> None:
    okm = pairkeys.hkdf_sha256(
        bytes([0x0B] * 22), bytes(range(0xF0, 0xFA)), 42, salt=bytes(range(0x0D))
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@pytest.mark.parametrize("length", [1, 32, 33, 100])
def test_hkdf_matches_cryptography(length: int) -> None:
    ikm, info = b"input keying material", b"some info"
    expected = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)
    assert pairkeys.hkdf_sha256(ikm, info, length) == expected


def test_pair_key_symmetric_and_distinct() -> None:
    k12 = pairkeys.pair_key(R, NET, 1, 2)
    assert k12 == pairkeys.pair_key(R, NET, 2, 1)
    assert len(k12) == pairkeys.KEY_SIZE
    others = {
        pairkeys.pair_key(R, NET, 1, 3),
        pairkeys.pair_key(R, NET, 0, 2),
        pairkeys.pair_key(R, b"net-0002", 1, 2),
        pairkeys.pair_key(bytes(32), NET, 1, 2),
        pairkeys.pair_key(R, NET + b"\x00", 1, 2),
    }
    assert k12 not in others and len(others) == 5


def test_pair_key_encoding_unambiguous() -> None:
    # With plain concatenation "ab" || 1 and "a" || "b" 1 could collide; lp() and u32 prevent it.
    assert pairkeys.pair_key(R, b"\x00\x00\x00\x01", 2, 3) != pairkeys.pair_key(R, b"", 1, 2)
    assert pairkeys.pair_key(R, NET, 1, 256) != pairkeys.pair_key(R, NET, 256, 257)


@pytest.mark.parametrize(("i", "j"), [(1, 1), (-1, 2), (1, 2**32), (True, 2)])
def test_pair_key_bad_indices(i: int, j: int) -> None:
    with pytest.raises(ValueError):
        pairkeys.pair_key(R, NET, i, j)


def test_tags_are_direction_bound() -> None:
    key = pairkeys.pair_key(R, NET, 1, 2)
    t_init = pairkeys.init_tag(key, NET, 1, 2, N_INIT, N_RESP, CB)
    t_resp = pairkeys.resp_tag(key, NET, 1, 2, N_INIT, N_RESP, CB, t_init)
    assert len(t_init) == len(t_resp) == 32
    assert t_init != t_resp
    # Reflection: the responder's own challenge run the other way gives a different tag.
    assert t_init != pairkeys.init_tag(key, NET, 2, 1, N_RESP, N_INIT, CB)
    assert t_init != pairkeys.init_tag(key, NET, 2, 1, N_INIT, N_RESP, CB)
    assert pairkeys.verify_tag(t_init, pairkeys.init_tag(key, NET, 1, 2, N_INIT, N_RESP, CB))
    assert not pairkeys.verify_tag(t_init, t_resp)


@pytest.mark.parametrize("field", ["key", "netid", "n_init", "n_resp", "cb"])
def test_every_input_changes_the_tag(field: str) -> None:
    args = {
        "key": pairkeys.pair_key(R, NET, 1, 2),
        "netid": NET,
        "n_init": N_INIT,
        "n_resp": N_RESP,
        "cb": CB,
    }
    base = pairkeys.init_tag(
        args["key"], args["netid"], 1, 2, args["n_init"], args["n_resp"], args["cb"]
    )
    args[field] = bytes(len(args[field]) or 1)
    changed = pairkeys.init_tag(
        args["key"], args["netid"], 1, 2, args["n_init"], args["n_resp"], args["cb"]
    )
    assert base != changed


def test_resp_tag_depends_on_tag_init() -> None:
    key = pairkeys.pair_key(R, NET, 1, 2)
    a = pairkeys.resp_tag(key, NET, 1, 2, N_INIT, N_RESP, CB, b"\x00" * 32)
    b = pairkeys.resp_tag(key, NET, 1, 2, N_INIT, N_RESP, CB, b"\x01" * 32)
    assert a != b


def test_fresh_randomness() -> None:
    m1, m2 = pairkeys.new_master_secret(), pairkeys.new_master_secret()
    assert isinstance(m1, bytearray) and len(m1) == 32 and m1 != m2
    assert len(pairkeys.new_nonce()) == pairkeys.NONCE_SIZE
    assert pairkeys.pair_key(m1, NET, 0, 1) != pairkeys.pair_key(m2, NET, 0, 1)
    with pytest.raises(ValueError):
        pairkeys.pair_key(b"", NET, 0, 1)
