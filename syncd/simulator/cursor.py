"""Opaque `continueFrom` tokens: a signed, scrambled position in one feed's change log.

Clients must treat the token as opaque, so it is neither readable nor forgeable: the payload
(tenant, feed number, position) is XORed with a key stream and carries an HMAC tag. The key is
derived from the seed, so tokens stay valid across simulator restarts with the same seed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

_PAYLOAD = struct.Struct(">BqHq")  # format version, tenant, feed number, position
_VERSION = 1
_TAG_LEN = 10


class CursorCodec:
    """Encodes and checks continuation tokens for one simulator instance."""

    __slots__ = ("_key", "_pad")

    def __init__(self, seed: int) -> None:
        self._key = hashlib.blake2b(f"syncd-sim-cursor:{seed}".encode(), digest_size=32).digest()
        self._pad = hashlib.blake2b(b"pad" + self._key, digest_size=_PAYLOAD.size).digest()

    def encode(self, tenant: int, feed_no: int, position: int) -> str:
        """The token that resumes `feed_no` of `tenant` at change-log `position`."""
        plain = _PAYLOAD.pack(_VERSION, tenant, feed_no, position)
        tag = hmac.digest(self._key, plain, "sha256")[:_TAG_LEN]
        scrambled = bytes(a ^ b for a, b in zip(plain, self._pad, strict=True))
        return base64.urlsafe_b64encode(scrambled + tag).rstrip(b"=").decode()

    def decode(self, token: str) -> tuple[int, int, int] | None:
        """(tenant, feed number, position), or None when the token is not one of ours."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _PAYLOAD.size + _TAG_LEN:
            return None
        plain = bytes(a ^ b for a, b in zip(raw[: _PAYLOAD.size], self._pad, strict=True))
        tag = hmac.digest(self._key, plain, "sha256")[:_TAG_LEN]
        if not hmac.compare_digest(tag, raw[_PAYLOAD.size :]):
            return None
        version, tenant, feed_no, position = _PAYLOAD.unpack(plain)
        if version != _VERSION or position < 0:
            return None
        return tenant, feed_no, position
