"""Secrets at rest: what the sidecar keeps in Redis that came from a client or an upstream is
sealed with AES-256-GCM (`cryptography`) when `redis.encryption_keys` is set. The one module
that speaks to the cipher.

A sealed value is `SC1` + the key's id (4 bytes of its SHA-256) + a random 96-bit nonce + the
ciphertext and its tag. The first key seals; every key listed opens what it sealed, so a
rotation puts the new key first, reloads, and drops the old one once what it sealed has expired
(jobs.max_age, the cache's and idempotency's retention). The value's own Redis key is bound in
as associated data: a sealed value copied under another key does not open.

A value without the prefix was written before encryption was turned on and is read as it is;
a sealed one that does not open (a key no longer listed, a tampered byte) raises SealError,
which each store turns into what a missing value means there: a cache miss, a job that fails
with a clear error, never a crash and never a wrong answer served.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"SC1"
_KID, _NONCE = 4, 12
_HEADER = len(MAGIC) + _KID + _NONCE


class SealError(Exception):
    """A sealed value that does not open: the message says why, without the value."""


def parse_key(text: str) -> bytes:
    """A key from the config: 32 bytes in base64 (standard or URL-safe). ValueError says how to
    make one."""
    cleaned = text.strip()
    try:
        raw = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_"
                               if "-" in cleaned or "_" in cleaned else None, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("an encryption key is 32 random bytes in base64 (44 characters); "
                         "make one with `sidecar keygen`")
    return raw


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_KID]


class Sealer:
    """Seals and opens values with the configured keys; holds none when encryption is off, and
    then passes values through. One per process, reconfigured by a reload (a key rotation)."""

    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        self.configure(keys)

    def configure(self, keys: Sequence[bytes]) -> None:
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}
        self._sealing = (key_id(keys[0]), AESGCM(keys[0])) if keys else None

    @property
    def enabled(self) -> bool:
        return self._sealing is not None

    def seal(self, data: bytes, where: str) -> bytes:
        """`data` sealed for the Redis key `where` (unchanged when encryption is off)."""
        if self._sealing is None:
            return data
        kid, cipher = self._sealing
        nonce = os.urandom(_NONCE)
        return MAGIC + kid + nonce + cipher.encrypt(nonce, data, where.encode())

    def open(self, data: bytes, where: str) -> bytes:
        """What `seal` was given; a value that was never sealed as it is; SealError otherwise."""
        if not data.startswith(MAGIC):
            return data
        if len(data) < _HEADER + 16:
            raise SealError(f"the sealed value at {where} is cut short")
        kid = data[len(MAGIC):len(MAGIC) + _KID]
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SealError(f"the value at {where} was sealed with a key not in "
                            f"redis.encryption_keys (key id {kid.hex()})")
        nonce = data[len(MAGIC) + _KID:_HEADER]
        try:
            return cipher.decrypt(nonce, data[_HEADER:], where.encode())
        except InvalidTag:
            raise SealError(f"the value at {where} does not open with its key (key id "
                            f"{kid.hex()}): altered, or moved from another key") from None

    def seal_text(self, text: str, where: str) -> str:
        """A string field of a JSON record (a job's request head): sealed, then base64."""
        if self._sealing is None:
            return text
        return base64.b64encode(self.seal(text.encode("latin-1"), where)).decode("ascii")

    def open_text(self, text: str, where: str) -> str:
        if not text.startswith(_MAGIC_B64):
            return text
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SealError(f"the sealed field at {where} is not base64") from None
        return self.open(raw, where).decode("latin-1")


_MAGIC_B64 = base64.b64encode(MAGIC).decode()  # "U0Mx": how a sealed text field starts


def new_key() -> str:
    """A fresh key for `redis.encryption_keys` (`sidecar keygen`)."""
    return base64.b64encode(os.urandom(32)).decode()
