"""GnuTLS SRP base64: alphabet, grouping from the right, the leading-zero quirk, real data."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parnet.auth import keyfile, sb64, srp

# Written by GnuTLS srptool 3.7.9 (`srptool --passwd tp --passwd-conf tp.conf -u alice -i 3`,
# password "secretpw" on stdin).
SRPTOOL_ALICE = (
    "alice:1oguvgObsMlPl4MgLbs7YMdT71dwtcHHqxoxhXXU9hOaXzBbZfIEvPtCaqdmqYtyaovX9I5lbQ0WRGVUqTKmZ"
    "obY6rasn1pjyjIqv3a4s.M6Zn05jgJneMCpU1z6Wpv5brhsdLPpgnBy.s2riLAfYl/c3ymtFwn.BNeVjIvCR6eF6uh3"
    "AFd17IpAWpYXCHKn4LeFxfsIN8Rgshoz2mAf8GKI29RWcxq7OB2EmiMsDQ51sMwZCBzzZjCIRgDLd6g5Kc7tv0h1P/t"
    "4d6j.FpCJL/emcENBu3Rog3uJONfDt8uMACUyvQVHH6P9Qt4hLUkTecUk8MpS4rqIGX/t6/diSi:"
    "nsEHSSjE9DkX/FAmxJFtR:3"
)
# Same tool, password "pässwörd<U+00A0>x" typed in NFD: GnuTLS normalizes it (NFC, space).
SRPTOOL_UNI = (
    "uni:1LemLQaZCVJB1j2rSLfp4pFc3uIH5QUX9m2oM.UNNpKuVjBIre6K1t5QlvQP9XL5VQ9zIhV3pQ2DNK0jglyqwLP"
    "4MstprK/4zUzmk4Xx20I/9rTXsZP02yecccssesdKq30QdiAPj.nhW/2gcSoWJrMF6rOinQ.Pl5xcbxM93auL4DNQO9"
    "pZ1jhqDtmi30CAHSpB0/b9ve3Fx7rf7ifm5TZ7poFIpQrqxsK/s36IbtplXVAujcGnlN9mr94GrHK0U3PdL5saFGITF"
    "iRoLi1hr1WSbJpuFzqxFJ33JI2UAAsjywhy8A1G0q3AuvZ07T7MqZw6srI0cemNKdNbpwor.U:"
    "2f.jsUF6zq7GvL.zW7O3en:3"
)
# SHA-256 of the file `srptool --create-conf` (3.7.9) writes.
SRPTOOL_CONF_SHA256 = "1104b8a3a73c5927b697edf3e576e319b8a3eece65f49deabd2b3e2be0b2075d"


def test_alphabet_digits_first() -> None:
    assert sb64.ALPHABET[:10] == "0123456789"
    assert len(set(sb64.ALPHABET)) == 64
    assert sb64.encode(bytes([2])) == "2"
    assert sb64.encode(bytes([5])) == "5"
    assert sb64.encode(bytes([19])) == "J"  # g of the 8192-bit group, as in tpasswd.conf


def test_groups_from_the_right() -> None:
    assert sb64.encode(b"") == ""
    assert sb64.decode("") == b""
    assert sb64.encode(b"\x00\x00\x00") == "0000"
    assert sb64.encode(b"\xff\xff\xff") == "////"
    assert sb64.encode(b"\x01\x00\x00\x00") == "10000"  # short group first, not last
    assert sb64.encode(b"\x40") == "10"  # 0x40 = 1*64 + 0
    assert sb64.decode("10000") == b"\x01\x00\x00\x00"


@pytest.mark.parametrize("length", range(0, 25))
def test_round_trip_exact_when_no_quirk(length: int) -> None:
    data = bytes((37 * i + 1) % 256 or 1 for i in range(length))
    assert sb64.decode(sb64.encode(data)) == data
    zero_led = b"\x00" + data
    if len(zero_led) % 3 != 2:
        assert sb64.decode(sb64.encode(zero_led)) == zero_led


def test_quirk_leading_zero_with_length_2_mod_3() -> None:
    data = b"\x00\x80" + b"\x12\x34\x56"
    text = sb64.encode(data)
    assert text == "20" + sb64.encode(b"\x12\x34\x56")
    back = sb64.decode(text)
    assert back == data[1:]  # the leading zero byte is lost ...
    assert int.from_bytes(back, "big") == int.from_bytes(data, "big")  # ... not the value


def test_small_head_group_keeps_its_value() -> None:
    # GnuTLS's own encoder writes "0" here and loses 0x05; ours keeps the number.
    assert sb64.encode(b"\x00\x05") == "5"
    assert sb64.decode("5") == b"\x05"


def test_decoder_matches_gnutls_head_rules() -> None:
    assert sb64.decode("0") == b"\x00"  # one char: always one byte
    assert sb64.decode("00") == b"\x00"  # two chars: zero top byte dropped
    assert sb64.decode("40") == b"\x01\x00"
    assert sb64.decode("000") == b"\x00\x00"  # three chars: only the first byte dropped
    assert sb64.decode("100") == b"\x10\x00"
    assert sb64.decode("G00") == b"\x01\x00\x00"  # G = 16, and 16 << 12 == 0x10000


@pytest.mark.parametrize("bad", ["+", "ab=", "a b", "é", "abc\n", "ab\x00c", "-"])
def test_decode_rejects_bad_characters(bad: str) -> None:
    with pytest.raises(ValueError):
        sb64.decode(bad)


@settings(max_examples=300, derandomize=True, database=None)
@given(st.binary(max_size=80))
def test_round_trip_property(data: bytes) -> None:
    back = sb64.decode(sb64.encode(data))
    assert int.from_bytes(back, "big") == int.from_bytes(data, "big")
    if not (len(data) % 3 == 2 and data[0] == 0):
        assert back == data
    assert set(sb64.encode(data)) <= set(sb64.ALPHABET)


@settings(max_examples=300, derandomize=True, database=None)
@given(st.text(alphabet=sb64.ALPHABET, max_size=40))
def test_decode_encode_canonical_text(text: str) -> None:
    data = sb64.decode(text)
    assert len(data) <= (len(text) * 3 + 3) // 4
    assert int.from_bytes(sb64.decode(sb64.encode(data)), "big") == int.from_bytes(data, "big")


@pytest.mark.parametrize(
    ("line", "password"),
    [(SRPTOOL_ALICE, "secretpw"), (SRPTOOL_UNI, "p\u00e4ssw\u00f6rd x")],
)
def test_real_srptool_line(line: str, password: str) -> None:
    username, v_text, s_text, index = line.rsplit(":", 3)
    salt = sb64.decode(s_text)
    verifier = sb64.decode(v_text)
    assert len(salt) == 16
    assert index == "3"
    assert sb64.encode(salt) == s_text
    assert sb64.encode(verifier) == v_text
    N, g = srp.GROUPS[3]
    assert srp.compute_verifier(username, password, salt, N, g) == int.from_bytes(verifier, "big")


def test_conf_text_is_what_srptool_writes() -> None:
    text = keyfile.passwd_conf_text()
    assert hashlib.sha256(text.encode()).hexdigest() == SRPTOOL_CONF_SHA256
    for line in text.splitlines():
        index, n_text, g_text = line.split(":")
        N, g = srp.GROUPS[int(index)]
        assert int.from_bytes(sb64.decode(n_text), "big") == N
        assert int.from_bytes(sb64.decode(g_text), "big") == g
