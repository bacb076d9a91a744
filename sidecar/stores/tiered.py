"""The cache as the policies see it: L1 per route in this worker, L2 in Redis within the
cluster's quota, purges that reach every instance's L1 through Redis pub/sub, the misses in
progress here (stores/misses.py), and counters for the stats interface.

One view across workers (docs/caching.md, "One cache across workers"):
- an answer that stored an entry waits for its L2 write (WRITE_WAIT at most), so the next
  request on any worker finds it;
- a purge returns once every worker that may be serving from L1 has dropped its copies, or
  after LEASE. A worker serves from L1 only while it holds a lease: LEASE from the moment it
  sent a heartbeat that came back on its subscription, which proves every purge published
  before that heartbeat reached it. A worker cut off from Redis stops serving L1 within LEASE,
  and a purge that does not hear from it waits that long; an L1 hit costs a clock read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from ..crypto import Sealer
from .entry import CachedResponse
from .memory import MemoryStore
from .misses import MissLocks
from .redis import CHANNEL, EVICT_BATCH, RedisStore, worker_channel
from .subscriber import REDIS_ERRORS, Bus, Subscriber

if TYPE_CHECKING:
    from ..config import CacheConfig

log = logging.getLogger("sidecar.cache")

DEFAULT_QUOTA = 256 * 1024**2  # cache.redis.max_bytes
RECENCY_INTERVAL = 1.0  # how often the hits of the last interval reach L2's LRU index
HEARTBEAT = 0.1  # how often a worker renews its L1 lease
LEASE = 0.5  # how long after sending a heartbeat that came back a worker serves from L1
# How long a worker stays registered, on Redis's clock, after a heartbeat: longer than LEASE,
# so that a purge counts every worker that may still hold one.
REGISTRATION = 2 * LEASE
WRITE_WAIT = 0.5  # how long an answer waits for its entry's L2 write at most


class CacheService(Subscriber):
    channel = CHANNEL
    task_name = "cache-purge-listener"

    def __init__(self) -> None:
        super().__init__()
        self.memory: dict[str, MemoryStore] = {}
        self.misses = MissLocks()  # kept across reloads, as the misses in flight are
        self.store: RedisStore | None = None
        self.sealer = Sealer()  # L2 entries sealed in Redis (redis.encryption_keys)
        self.redis_up = False
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (route, layer, result)
        self._refreshing: set[str] = set()
        self._connected_before = False
        # The cache's wall clock, read by its policies for ages, expiries and the time an
        # entry has spent in L1: a test moves it forward instead of sleeping.
        self.clock: Callable[[], float] = time.time
        # L2's quota, the whole cluster's (cache.redis.max_bytes); the app sets it from the
        # config at start and on each reload.
        self.quota = DEFAULT_QUOTA
        # Primary keys hit (in L1 or L2) since the last recency write: a set add is all a hit
        # pays for L2's LRU order, the write is one command a second (`_recency`).
        self.touched: set[str] = set()
        self.refused = 0  # L2 stores Redis refused for want of memory (maxmemory reached)
        # Redis's wall clock for what Redis keeps (TTLs, expiries, recency), not `clock`:
        # moving the cache's clock in a test must not make Redis's entries look stale.
        self.wall: Callable[[], float] = time.time
        self.worker_id = os.urandom(8).hex()
        # L1 is served while time.monotonic() is below this. Without Redis there is no other
        # worker to agree with: for ever; with Redis, from the first heartbeat back.
        self.l1_until = math.inf
        self.serve_cut_off = False  # cache.l1_without_redis: serve
        # Purges applied here so far: an L2 read that was under way while one arrived does not
        # fill L1 (it may have read what the purge deleted).
        self.generation = 0
        self.late_writes = 0  # answers sent before their L2 write was done (WRITE_WAIT)

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self, client: aioredis.Redis, listener: aioredis.Redis | Bus) -> None:
        self.store = RedisStore(client, self.sealer)
        if not self.serve_cut_off:
            self.l1_until = 0.0
        super().attach(client, listener)
        self.spawn(self._prune())
        self.spawn(self._recency())
        self.spawn(self._heartbeats())

    def set_l1_without_redis(self, mode: str) -> None:
        """cache.l1_without_redis, from the config at start and on each reload."""
        serve = mode == "serve"
        if serve != self.serve_cut_off:
            self.serve_cut_off = serve
            # Serving: for ever. Stopping: from the next heartbeat back, when there is Redis.
            self.l1_until = math.inf if serve or self.store is None else 0.0

    def channels(self) -> tuple[str, ...]:
        return (CHANNEL, worker_channel(self.worker_id))

    async def close(self) -> None:
        if self.store is not None and self.redis_up:
            with contextlib.suppress(*REDIS_ERRORS):
                async with asyncio.timeout(WRITE_WAIT):
                    await self.store.unregister(self.worker_id)
        await super().close()

    def set_quota(self, quota: int) -> None:
        """A reload's cache.redis.max_bytes: a lower one evicts at once, not at the next put."""
        lowered = quota < self.quota
        self.quota = quota
        if lowered and self.store is not None:  # before attach, the first subscription trims
            self.spawn(self._trim())

    def memory_for(self, route: str, config: CacheConfig) -> MemoryStore:
        """The route's L1, kept across reloads unless its bounds change."""
        memory = config.memory
        store = self.memory.get(route)
        if store is None or (store.max_bytes, store.max_entry, store.max_ttl) != (
                memory.max_bytes, memory.max_entry, memory.max_ttl):
            store = MemoryStore(memory.max_bytes, memory.max_entry, memory.max_ttl)
            self.memory[route] = store
        return store

    # -- L2 -------------------------------------------------------------------------------------

    async def l2_get(self, primary: str) -> list[CachedResponse] | None:
        if self.store is None or not self.redis_up:
            return None
        try:
            variants = await self.store.get(primary)
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)
            return None
        if variants:
            self.touched.add(primary)
        return variants

    def l2_put(self, entry: CachedResponse, retention: float) -> asyncio.Task[bool] | None:
        """Write the entry to Redis in the background: the task says whether it was written
        (a coalesced miss tells the other instances to read it only then); None: Redis down."""
        if self.store is None or not self.redis_up:
            return None
        redis = self.store
        quota, now = self.quota, self.wall()

        async def put() -> bool:
            try:
                if await redis.put(entry, retention, quota=quota, now=now) >= EVICT_BATCH:
                    self.spawn(self._trim())
            except OutOfMemoryError:
                # Redis is at its maxmemory (filled by jobs or idempotency records: the cache
                # keeps within its quota): skip this store, Redis itself is fine.
                self.refused += 1
                return False
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
                return False
            return True

        return self.spawn(put())

    async def written(self, write: asyncio.Task[bool] | None) -> bool:
        """Wait for an L2 write (l2_put's task) before the answer goes, WRITE_WAIT at most
        (the write goes on behind), so that a request on another worker right after it finds
        the entry; False when the wait ran out or the write failed."""
        if write is None:
            return True  # Redis down: nothing to wait for
        done, _ = await asyncio.wait((write,), timeout=WRITE_WAIT)
        if not done:
            self.late_writes += 1
            return False
        return not write.cancelled() and write.exception() is None and write.result()

    def _redis_failed(self, exc: BaseException) -> None:
        if self.redis_up:
            log.warning("redis cache layer unavailable; serving from memory only",
                        extra={"error": str(exc) or type(exc).__name__})
        self.redis_up = False

    async def try_refresh(self, primary: str, seconds: float) -> bool:
        """Claim the background refresh of a key: once per worker, and once across instances
        while Redis is up."""
        if primary in self._refreshing:
            return False
        if self.store is not None and self.redis_up:
            try:
                if not await self.store.try_refresh_lock(primary, seconds):
                    return False
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
        self._refreshing.add(primary)
        return True

    def refresh_done(self, primary: str) -> None:
        """Release the claim at once, so the refreshed entry's next expiry can refresh too."""
        self._refreshing.discard(primary)
        if self.store is not None and self.redis_up:
            redis = self.store

            async def release() -> None:
                with contextlib.suppress(*REDIS_ERRORS):
                    await redis.release_refresh_lock(primary)

            self.spawn(release())

    # -- purge ----------------------------------------------------------------------------------

    def purge_local(self, kind: str, value: str) -> int:
        if kind == "key":
            def match(entry: CachedResponse) -> bool:
                return entry.uri == value
        elif kind == "prefix":
            def match(entry: CachedResponse) -> bool:
                return entry.uri.startswith(value)
        else:
            def match(entry: CachedResponse) -> bool:
                return value in entry.tags
        self.generation += 1
        return sum(store.remove_where(match) for store in self.memory.values())

    async def purge(self, kind: str, value: str) -> dict[str, Any]:
        """Drop entries everywhere; returns once every worker that may serve from L1 has
        dropped its copies, or after LEASE, when those that did not answer have stopped
        serving L1: either way no worker serves a purged entry afterwards."""
        result: dict[str, Any] = {"kind": kind, "value": value,
                                  "memory_removed": self.purge_local(kind, value)}
        if self.store is None or not self.redis_up:
            result.update(redis="down", instances_notified=0, instances_acked=0)
            return result
        purge_id = os.urandom(12).hex()
        try:
            result["redis_removed"] = await self.store.purge(kind, value)
            workers = await self.store.publish_purge(kind, value, purge_id)
            acked = await self.store.wait_acks(purge_id, workers, LEASE)
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)
            result.update(redis="down", instances_notified=0, instances_acked=0)
            return result
        result.update(redis="up", instances_notified=len(workers), instances_acked=len(acked))
        return result

    async def on_subscribed(self) -> None:
        if self._connected_before:
            # Purges may have been missed while disconnected: start L1 afresh.
            self.generation += 1
            for store in self.memory.values():
                store.remove_where(lambda entry: True)
        self._connected_before = True
        self.redis_up = True
        self.spawn(self._heartbeat())  # the lease at once, not a heartbeat later
        # The quota may have been lowered while this instance was away; in a task of its own,
        # so that purges are not left waiting behind a long trim.
        self.spawn(self._trim())

    def on_unsubscribed(self) -> None:
        if not self.serve_cut_off:
            self.l1_until = 0.0  # purges no longer arrive

    async def on_channel_message(self, channel: bytes, data: bytes) -> None:
        if channel == CHANNEL.encode():
            await self.on_message(data)
            return
        # One of this worker's heartbeats: every purge published before it has been applied.
        if self.serve_cut_off:
            return
        with contextlib.suppress(ValueError):
            self.l1_until = max(self.l1_until, float(data) + LEASE)

    async def on_message(self, data: bytes) -> None:
        """Apply a purge published by any worker to this worker's L1, and acknowledge it."""
        try:
            body = orjson.loads(data)
            self.purge_local(body["kind"], body["value"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if self.store is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.store.ack(body["id"], self.worker_id)

    def on_redis_error(self, exc: BaseException) -> None:
        self._redis_failed(exc)

    async def _heartbeat(self) -> None:
        """Register this worker and send itself its send time, which renews the lease when it
        comes back on the subscription."""
        if self.store is None or not self.redis_up:
            return
        try:
            await self.store.heartbeat(self.worker_id, REGISTRATION,
                                       repr(time.monotonic()).encode())
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self._heartbeat()

    async def _prune(self, interval: float = 60.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.store is not None and self.redis_up:
                try:
                    while await self.store.prune(self.wall()) >= 1000:
                        pass
                except REDIS_ERRORS as exc:
                    self._redis_failed(exc)

    async def _trim(self) -> None:
        if self.store is not None and self.redis_up:
            try:
                await self.store.trim(self.quota)
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)

    async def flush_recency(self) -> None:
        """Write the hits since the last call to L2's LRU index."""
        if not self.touched:
            return
        touched = list(self.touched)
        self.touched.clear()  # with Redis down too: the set must not grow meanwhile
        if self.store is None or not self.redis_up:
            return
        try:
            for start in range(0, len(touched), 1000):
                await self.store.touch(touched[start:start + 1000], self.wall())
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)

    async def _recency(self) -> None:
        while True:
            await asyncio.sleep(RECENCY_INTERVAL)
            await self.flush_recency()

    # -- stats ----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        l2: dict[str, Any] = {"status": "down"}
        if self.store is not None and self.redis_up:
            try:
                l2 = {"status": "up", **await self.store.info(), "quota": self.quota,
                      "refused": self.refused}
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
        return {
            "requests": [{"route": r, "layer": layer, "result": res, "count": n}
                         for (r, layer, res), n in sorted(self.counts.items())],
            "memory": {route: {"bytes": s.bytes, "entries": s.entries, "evictions": s.evictions}
                       for route, s in self.memory.items()},
            "redis": l2,
            "l1_serving": time.monotonic() < self.l1_until,
            "late_writes": self.late_writes,
        }
