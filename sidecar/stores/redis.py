"""L2: cached responses in Redis, shared by every sidecar instance, with the indexes that purge
by key, prefix and tag needs, within a byte quota for the whole cluster. Entries expire by
Redis TTL, or go least recently used first once L2 holds more than its quota.

Layout under the `sidecar:cache:` prefix:
  e:{h}      hash: one field per Vary variant -> packed CachedResponse
  uris       sorted set of "{uri}\\0{h}" (all scores 0): purge by exact URI or by prefix
  uris:exp   the same members scored by expiry (ms): prune() drops index members whose entry
             has expired, so the index does not grow with every URL ever cached
  tag:{tag}  set of {h}
  lru        sorted set of {h} scored by last use (ms): what eviction takes first
  meta       hash {h} -> "{bytes}\\0{uri}\\0{tag}\\0{tag}...": the bytes charged to the entry and
             what to take out of the indexes when it goes
  bytes      the sum of the charges: what the quota is compared with
  evictions  entries evicted for the quota, ever (a counter for every instance to read)
  workers    sorted set of worker ids scored by when their last heartbeat stops counting (ms,
             Redis's clock): the workers that may be serving from L1, whom a purge waits for
  ack:{id}   list of the worker ids that applied purge {id}

Why the sidecar counts instead of Redis's maxmemory-policy: Redis evicts from every key of the
database, and job records, idempotency keys and dedup locks live there too (volatile-lru would
take the ones with a TTL, which they all have). So each put is one script that writes the
entry, charges its bytes as Redis counts them (MEMORY USAGE, plus an estimate of its index
members) and evicts the least recently used entries until the total is within the quota; only
`sidecar:cache:` keys are ever deleted for it.

Recency costs a hit nothing: hits are remembered in the worker (CacheService.touched) and
written once a second as one ZADD XX GT, so an entry read in the last second may rank as
older than it is, never as newer, and an evicted entry is never brought back by a late touch.

The scripts name the keys they derive (an evicted entry's hash and tags), so they need one
Redis server (or a primary), not a Redis Cluster.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from ..crypto import Sealer, SealError
from .entry import CachedResponse
from .memory import MAX_VARIANTS

log = logging.getLogger("sidecar.cache")

PREFIX = "sidecar:cache:"
CHANNEL = PREFIX + "purge"
LRU = PREFIX + "lru"
WORKERS = PREFIX + "workers"


def worker_channel(worker_id: str) -> str:
    """Where a worker's own heartbeats come back to it, on the connection purges come by."""
    return CHANNEL + ":" + worker_id
# Entries one script looks at for eviction at most (about 10 commands each): a put evicts a
# few, a trim after the quota was lowered runs as many scripts as it takes.
EVICT_BATCH = 1000


def key_hash(primary: str) -> str:
    return hashlib.blake2b(primary.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


# redis-py types its commands as "Awaitable[T] | T" (one signature for the sync and async
# clients); the casts below state what the asyncio client returns.
_Hash = Awaitable[dict[bytes, bytes]]

# What each script shares: ARGV[1] is the key prefix. forget(h) deletes an entry, its index
# members and its charge (1 when an entry was still there); evict(quota) forgets the least
# recently used entries until the charges fit, EVICT_BATCH at most, so that no script holds
# Redis for long (how many entries it deleted).
#
# An entry's charge is MEMORY USAGE of its hash (its key, fields and values as allocated) plus
# what it adds elsewhere: its slot in the keyspace's expiry table (64 bytes), its member in
# uris and uris:exp (the member, a skiplist node and a dict entry: 100 bytes more), in lru the
# same for the hash, in meta the field, the value and a dict entry, and a set member per tag.
# tests/test_cache_quota.py checks the sum against INFO used_memory.
_LIB = """
local P = ARGV[1]
local function split(s)
  local parts, start = {}, 1
  while true do
    local i = string.find(s, '\\0', start, true)
    if not i then
      parts[#parts + 1] = string.sub(s, start)
      return parts
    end
    parts[#parts + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end
local function forget(h)
  local meta = redis.call('HGET', P .. 'meta', h)
  local removed = redis.call('DEL', P .. 'e:' .. h)
  redis.call('ZREM', P .. 'lru', h)
  if meta then
    local parts = split(meta)
    local member = parts[2] .. '\\0' .. h
    redis.call('ZREM', P .. 'uris', member)
    redis.call('ZREM', P .. 'uris:exp', member)
    for i = 3, #parts do redis.call('SREM', P .. 'tag:' .. parts[i], h) end
    redis.call('HDEL', P .. 'meta', h)
    redis.call('DECRBY', P .. 'bytes', parts[1])
  end
  return removed
end
local function evict(quota)
  local evicted, looked = 0, 0
  while looked < EVICT_BATCH and tonumber(redis.call('GET', P .. 'bytes') or '0') > quota do
    looked = looked + 1
    local oldest = redis.call('ZPOPMIN', P .. 'lru')
    if #oldest == 0 then
      redis.call('SET', P .. 'bytes', 0)
      break
    end
    evicted = evicted + forget(oldest[1])
  end
  if evicted > 0 then redis.call('INCRBY', P .. 'evictions', evicted) end
  return looked
end
""".replace("EVICT_BATCH", str(EVICT_BATCH))

# KEYS[1] e:{h}. ARGV: prefix, h, field, value, ttl ms, now ms, quota, uri, n stale fields,
# the stale fields, then the tags. Returns how many entries eviction looked at.
_PUT = _LIB + """
local h, field, value = ARGV[2], ARGV[3], ARGV[4]
local ttl, now, quota, uri = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local stale = tonumber(ARGV[9])
local name = KEYS[1]
for i = 10, 9 + stale do redis.call('HDEL', name, ARGV[i]) end
redis.call('HSET', name, field, value)
redis.call('PEXPIRE', name, ttl, 'GT')
redis.call('PEXPIRE', name, ttl, 'NX')
local member = uri .. '\\0' .. h
redis.call('ZADD', P .. 'uris', 0, member)
redis.call('ZADD', P .. 'uris:exp', 'GT', now + ttl, member)
local tags, seen = {}, {}
local old = redis.call('HGET', P .. 'meta', h)
local old_bytes = 0
if old then
  local parts = split(old)
  old_bytes = tonumber(parts[1])
  for i = 3, #parts do
    if not seen[parts[i]] then
      seen[parts[i]] = true
      tags[#tags + 1] = parts[i]
    end
  end
end
for i = 10 + stale, #ARGV do
  local tag = P .. 'tag:' .. ARGV[i]
  redis.call('SADD', tag, h)
  redis.call('PEXPIRE', tag, ttl, 'GT')
  redis.call('PEXPIRE', tag, ttl, 'NX')
  if not seen[ARGV[i]] then
    seen[ARGV[i]] = true
    tags[#tags + 1] = ARGV[i]
  end
end
local meta = table.concat({'', uri, unpack(tags)}, '\\0')
local index = 64 + 2 * (#member + 100) + (#h + 100) + (#h + #meta + 64) + #tags * (#h + 48)
local bytes = redis.call('MEMORY', 'USAGE', name, 'SAMPLES', '0') + index
redis.call('HSET', P .. 'meta', h, bytes .. meta)
redis.call('INCRBY', P .. 'bytes', bytes - old_bytes)
redis.call('ZADD', P .. 'lru', now, h)
return evict(quota)
"""

# ARGV: prefix, quota. After the quota was lowered, or at start.
_TRIM = _LIB + """
return evict(tonumber(ARGV[2]))
"""

# ARGV: prefix, the hashes to delete. Returns the entries deleted.
_FORGET = _LIB + """
local removed = 0
for i = 2, #ARGV do removed = removed + forget(ARGV[i]) end
return removed
"""

# ARGV: prefix, now ms. Up to 1000 index members past their expiry: an entry Redis has
# expired is forgotten (its charge given back); one still there (its TTL was extended, or
# Redis's clock is behind ours) is scored again by its TTL.
_PRUNE = _LIB + """
local now = tonumber(ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', P .. 'uris:exp', '-inf', now, 'LIMIT', 0, 1000)
for _, member in ipairs(expired) do
  local h = string.sub(member, -32)
  local left = redis.call('PTTL', P .. 'e:' .. h)
  if left > 0 then
    redis.call('ZADD', P .. 'uris:exp', now + left, member)
  else
    redis.call('ZREM', P .. 'uris', member)
    redis.call('ZREM', P .. 'uris:exp', member)
    forget(h)
  end
end
return #expired
"""


# KEYS: workers, the worker's channel. ARGV: worker id, registration ms, message. The worker is
# registered until Redis's now + ARGV[2], and the message reaches its subscription after every
# purge published before this script ran.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 0
"""

# KEYS: workers, the purge channel. ARGV: message. Publishes the purge and returns the workers
# registered at that instant: those that may be serving from L1, whose acks a purge waits for.
_PUBLISH_PURGE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PUBLISH', KEYS[2], ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def _variant(values: tuple[str | None, ...]) -> bytes:
    return orjson.dumps(values)


def _where(name: str, field: bytes) -> str:
    """What a sealed entry is bound to: its hash and its variant's field."""
    return name + "/" + field.hex()


class RedisStore:
    def __init__(self, client: aioredis.Redis, sealer: Sealer) -> None:
        self.client = client
        self.sealer = sealer  # entries are sealed in Redis when encryption keys are set
        self._put = client.register_script(_PUT)
        self._trim = client.register_script(_TRIM)
        self._forget = client.register_script(_FORGET)
        self._prune = client.register_script(_PRUNE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._publish_purge = client.register_script(_PUBLISH_PURGE)

    async def get(self, primary: str) -> list[CachedResponse]:
        """The stored variants; one that does not open (crypto.SealError) is left out, as if
        it were not there: a miss, and the next store replaces it."""
        name = PREFIX + "e:" + key_hash(primary)
        fields = await cast(_Hash, self.client.hgetall(name))
        return [entry for field, value in fields.items()
                if (entry := self._open(name, field, value)) is not None]

    def _open(self, name: str, field: bytes, value: bytes) -> CachedResponse | None:
        try:
            return CachedResponse.unpack(self.sealer.open(value, _where(name, field)))
        except SealError as exc:
            log.warning("a cache entry did not open; served as a miss",
                        extra={"error": str(exc)})
            return None

    async def put(self, entry: CachedResponse, retention: float, *, quota: int,
                  now: float) -> int:
        """Store a variant and evict least recently used entries past `quota` bytes; returns
        how many entries eviction took (EVICT_BATCH: maybe not all it had to, see trim)."""
        h = key_hash(entry.key)
        ttl_ms = max(1000, int(retention * 1000))
        name = PREFIX + "e:" + h
        field = _variant(entry.vary_values)
        existing = await cast(_Hash, self.client.hgetall(name))
        stale_variants = []
        kept = []
        for old_field, value in existing.items():
            old = self._open(name, old_field, value)
            if old is None or old.vary_names != entry.vary_names:
                stale_variants.append(old_field)
            elif old_field != field:
                kept.append((old.freshness.stored_at, old_field))
        # At most MAX_VARIANTS per key, as in memory: the oldest go.
        kept.sort()
        stale_variants += [f for _, f in kept[:max(0, len(kept) - MAX_VARIANTS + 1)]]
        args: list[Any] = [PREFIX, h, field, self.sealer.seal(entry.pack(), _where(name, field)),
                           ttl_ms, int(now * 1000), quota,
                           entry.uri, len(stale_variants), *stale_variants, *entry.tags]
        return int(await self._put(keys=[name], args=args))

    async def touch(self, primaries: Iterable[str], now: float) -> None:
        """Mark entries as used at `now`: XX, so an entry evicted meanwhile is not brought
        back into the index; GT, so a late batch cannot make an entry look older."""
        score = int(now * 1000)
        await self.client.zadd(LRU, dict.fromkeys(map(key_hash, primaries), score),
                               xx=True, gt=True)

    async def trim(self, quota: int) -> int:
        """Evict least recently used entries until L2 is within `quota`, a batch per script;
        returns how many were taken."""
        total = 0
        while True:
            taken = int(await self._trim(args=[PREFIX, quota]))
            total += taken
            if taken < EVICT_BATCH:
                return total

    async def purge(self, kind: str, value: str) -> int:
        """Delete entries by exact URI ("key"), URI prefix or tag; returns keys removed."""
        members: list[bytes] = []
        if kind == "tag":
            members_of_tag = cast(Awaitable[set[bytes]],
                                  self.client.smembers(PREFIX + "tag:" + value))
            hashes = [h.decode() for h in await members_of_tag]
            await self.client.delete(PREFIX + "tag:" + value)
        else:
            low = value + "\0" if kind == "key" else value
            members = await self.client.zrangebylex(
                PREFIX + "uris", "[" + low, "[" + low + "\xff")
            hashes = [m.decode("utf-8", "surrogateescape").rsplit("\0", 1)[1] for m in members]
        if not hashes:
            return 0
        removed = int(await self._forget(args=[PREFIX, *hashes]))
        if members:
            await self.client.zrem(PREFIX + "uris", *members)
            await self.client.zrem(PREFIX + "uris:exp", *members)
        return removed

    async def publish_purge(self, kind: str, value: str, purge_id: str) -> set[str]:
        """Tell every worker to drop matching L1 entries; returns the workers registered then."""
        message = orjson.dumps({"kind": kind, "value": value, "id": purge_id})
        ids = await self._publish_purge(keys=[WORKERS, CHANNEL], args=[message])
        return {i.decode() for i in ids}

    async def wait_acks(self, purge_id: str, expected: set[str], timeout: float) -> set[str]:
        """The workers of `expected` that acknowledged the purge within `timeout` seconds: all
        of them as soon as they have, else the wait lasts the whole `timeout`."""
        got: set[str] = set()
        key = PREFIX + "ack:" + purge_id
        deadline = time.monotonic() + timeout
        while not expected <= got:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # At least 10 ms: a BLPOP timeout of 0 would wait for ever.
            item = await cast(Awaitable[list[bytes] | None],
                              self.client.blpop([key], timeout=max(left, 0.01)))
            if item is not None:
                got.add(item[1].decode())
        await self.client.delete(key)
        return got & expected

    async def ack(self, purge_id: str, worker_id: str) -> None:
        key = PREFIX + "ack:" + purge_id
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.rpush(key, worker_id)
            pipe.expire(key, 30)
            await pipe.execute()

    async def heartbeat(self, worker_id: str, registration: float, message: bytes) -> None:
        """Register the worker for `registration` seconds and send `message` to its own
        channel (heartbeat script above)."""
        await self._heartbeat(keys=[WORKERS, worker_channel(worker_id)],
                              args=[worker_id, int(registration * 1000), message])

    async def unregister(self, worker_id: str) -> None:
        """A worker that stops: purges no longer wait for it."""
        await self.client.zrem(WORKERS, worker_id)

    async def try_refresh_lock(self, primary: str, seconds: float) -> bool:
        """One background refresh per key across instances."""
        return bool(await self.client.set(PREFIX + "rl:" + key_hash(primary), 1, nx=True,
                                          px=max(100, int(seconds * 1000))))

    async def release_refresh_lock(self, primary: str) -> None:
        await self.client.delete(PREFIX + "rl:" + key_hash(primary))

    async def prune(self, now: float) -> int:
        """Forget entries Redis has expired, with their index members and their charge;
        returns how many index members past their expiry were looked at (at most 1000)."""
        return int(await self._prune(args=[PREFIX, int(now * 1000)]))

    async def info(self) -> dict[str, int]:
        """Indexed URIs (an upper bound on entries), the bytes charged against the quota, the
        evictions so far, and the Redis server's memory in use."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcard(PREFIX + "uris")
            pipe.get(PREFIX + "bytes")
            pipe.get(PREFIX + "evictions")
            pipe.info("memory")
            uris, charged, evictions, memory = await pipe.execute()
        return {"entries": int(uris), "bytes": int(charged or 0),
                "evictions": int(evictions or 0),
                "used_memory": int(memory.get("used_memory", 0))}
