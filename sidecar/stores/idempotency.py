"""Idempotency records in Redis: one key per (route, credentials, Idempotency-Key).

A record is either in flight (a leader holds it under a short lease it renews) or done (the
stored response, kept for the policy's `ttl`). Every write after the claim compares the value
first, in a Lua script, so a leader whose lease ran out can neither extend, overwrite nor
delete a record that is no longer its own.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from ..crypto import Sealer
from .boundary import redis_boundary

PREFIX = "sidecar:idem:"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Also stores when the lease ran out and nobody took the key: the response exists, keep it.
_COMPLETE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def record_key(route: str, credentials: bytes, idempotency_key: str) -> str:
    """Hashed parts: neither credentials nor client-chosen keys appear in Redis as such."""
    creds = hashlib.sha256(credentials).hexdigest()
    key = hashlib.sha256(idempotency_key.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{PREFIX}{route}:{creds}:{key}"


class RecordState(enum.Enum):
    IN_FLIGHT = "in_flight"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    state: RecordState
    fingerprint: str
    token: str = ""  # in flight: tells one leader's claim from another's
    status: int = 0
    reason: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None  # done without a body: the response was too large to store

    def pack(self) -> bytes:
        meta = orjson.dumps({
            "state": self.state.value, "fp": self.fingerprint, "token": self.token,
            "s": self.status, "r": self.reason, "stored": self.body is not None,
            "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
        })
        return struct.pack("!I", len(meta)) + meta + (self.body or b"")

    @classmethod
    def unpack(cls, data: bytes) -> IdempotencyRecord:
        (length,) = struct.unpack_from("!I", data)
        meta = orjson.loads(data[4:4 + length])
        return cls(
            state=RecordState(meta["state"]), fingerprint=meta["fp"], token=meta["token"],
            status=meta["s"], reason=meta["r"],
            headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"]),
            body=data[4 + length:] if meta["stored"] else None,
        )


@redis_boundary
class IdempotencyStore:
    """The Redis operations of the idempotency policy; Redis errors propagate to the caller."""

    def __init__(self, client: aioredis.Redis, sealer: Sealer) -> None:
        """A finished record (the response) is sealed; a claim holds no client data and stays
        as it is, since the scripts compare it byte for byte."""
        self.client = client
        self.sealer = sealer
        self._renew: Any = client.register_script(_RENEW)
        self._complete: Any = client.register_script(_COMPLETE)
        self._release: Any = client.register_script(_RELEASE)

    async def claim(self, key: str, record: IdempotencyRecord, lease: float
                    ) -> IdempotencyRecord | None:
        """Take the key for `record` (None), or return the record already there, atomically."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, record.pack(), nx=True, px=_ms(lease))
            pipe.get(key)
            claimed, current = await pipe.execute()
        if claimed:
            return None
        # SET NX failed inside MULTI: the GET that follows sees the record that made it fail.
        return self._read(key, cast(bytes, current))

    async def get(self, key: str) -> IdempotencyRecord | None:
        data = cast("bytes | None", await self.client.get(key))
        return None if data is None else self._read(key, data)

    def _read(self, key: str, data: bytes) -> IdempotencyRecord:
        """SealError for a record that does not open: the policy answers it as Redis down
        (the request goes through without replay), never with a wrong response."""
        return IdempotencyRecord.unpack(self.sealer.open(data, key))

    async def renew(self, key: str, claim: IdempotencyRecord, lease: float) -> bool:
        """Extend the lease; False when the record is no longer this claim."""
        return bool(await self._renew(keys=[key], args=[claim.pack(), _ms(lease)]))

    async def complete(self, key: str, claim: IdempotencyRecord, done: IdempotencyRecord,
                       ttl: float) -> bool:
        return bool(await self._complete(keys=[key], args=[claim.pack(),
                                                          self.sealer.seal(done.pack(), key),
                                                          _ms(ttl)]))

    async def release(self, key: str, claim: IdempotencyRecord) -> None:
        """Give the key up (no response was had) so that the client's retry can go through."""
        await self._release(keys=[key], args=[claim.pack()])

    def __repr__(self) -> str:
        return f"<IdempotencyStore {self.client!r}>"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
