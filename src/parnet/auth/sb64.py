"""The "SRP base64" codec of GnuTLS ``tpasswd`` / ``tpasswd.conf`` files.

Theory of operation: this is not RFC 4648 base64. The alphabet puts the digits first
(``0-9A-Za-z./``), there is no padding, and groups are aligned to the *right* end of the data,
as if the bytes were one big-endian number (GnuTLS ``lib/auth/srp_sb64.c``):

- Encoding: the leading ``len % 3`` bytes form a short group, written as a number in base 64
  with its leading zero digits dropped (at least one digit); every later 3-byte group becomes
  exactly 4 characters.
- Decoding: the leading ``len % 4`` characters form a short group that decodes right-aligned
  to up to 3 bytes, of which a leading zero byte is dropped (GnuTLS drops the top byte of a
  1- or 2-character group when zero, and of a 3-character group only the very first byte);
  every later 4 characters decode to exactly 3 bytes.

The quirk: a value whose length is ``2 (mod 3)`` and whose first byte is ``0x00`` comes back one
byte shorter (the same number, without the leading zero). Integers (N, g, verifiers) do not
care; salts must not start with a zero byte in a 2-mod-3 length, so parnet writes 16-byte salts
as srptool does (``16 % 3 == 1``). Where GnuTLS's own encoder is lossy (a 2-byte head group
``00 xx`` with ``xx < 64`` comes out as ``"0"``), this encoder writes the value ``xx`` instead,
which GnuTLS decodes to the same number.

Decoding is strict: any character outside the alphabet raises ``ValueError`` (GnuTLS silently
accepts some, with garbled results).
"""

from __future__ import annotations

__all__ = ["ALPHABET", "decode", "encode"]

#: The 64 digits, value order (``srp_sb64.c`` ``b64table``).
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz./"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}


def _digits(value: int, width: int) -> str:
    """``value`` in base 64, exactly ``width`` digits."""
    out = []
    for _ in range(width):
        out.append(ALPHABET[value & 0x3F])
        value >>= 6
    return "".join(reversed(out))


def encode(data: bytes) -> str:
    """Encode bytes in GnuTLS SRP base64.

    Args:
        data: the raw bytes (a salt, or an unsigned big-endian integer).

    Returns:
        The encoded text, empty for empty input.
    """
    data = bytes(data)
    head = len(data) % 3
    out = []
    if head:
        value = int.from_bytes(data[:head], "big")
        width = 1
        while value >> (6 * width):
            width += 1
        out.append(_digits(value, width))
    for i in range(head, len(data), 3):
        out.append(_digits(int.from_bytes(data[i : i + 3], "big"), 4))
    return "".join(out)


def decode(text: str) -> bytes:
    """Decode GnuTLS SRP base64 exactly as GnuTLS does, but strictly.

    Args:
        text: the encoded text, without surrounding whitespace.

    Returns:
        The decoded bytes (empty for empty text).

    Raises:
        ValueError: a character outside the alphabet (including whitespace), or non-str input.
    """
    if not isinstance(text, str):
        raise ValueError("SRP base64 input must be str")
    values: list[int] = []
    for ch in text:
        v = _VALUE.get(ch)
        if v is None:
            raise ValueError(f"invalid character {ch!r} in SRP base64")
        values.append(v)
    head = len(values) % 4
    out = bytearray()
    if head:
        value = 0
        for v in values[:head]:
            value = (value << 6) | v
        group = value.to_bytes(head, "big")  # 6*head bits fit in head bytes
        if head > 1 and group[0] == 0:
            group = group[1:]
        out += group
    for i in range(head, len(values), 4):
        a, b, c, d = values[i : i + 4]
        out += ((a << 18) | (b << 12) | (c << 6) | d).to_bytes(3, "big")
    return bytes(out)
