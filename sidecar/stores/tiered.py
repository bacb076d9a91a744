"""The cache as the policies see it: L1 per route in this worker, L2 in Redis, purges that reach
every instance's L1 through Redis pub/sub, the misses in progress here (stores/misses.py), and
counters for the stats interface."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis

from .entry import CachedResponse
from .memory import MemoryStore
from .misses import MissLocks
from .redis import CHANNEL, RedisStore
from .subscriber import REDIS_ERRORS, Subscriber

if TYPE_CHECKING:
    from ..config import CacheConfig

log = logging.getLogger("sidecar.cache")


class CacheService(Subscriber):
    channel = CHANNEL
    task_name = "cache-purge-listener"

    def __init__(self) -> None:
        super().__init__()
        self.memory: dict[str, MemoryStore] = {}
        self.misses = MissLocks()  # kept across reloads, as the misses in flight are
        self.store: RedisStore | None = None
        self.redis_up = False
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (route, layer, result)
        self._refreshing: set[str] = set()
        self._connected_before = False
        # The cache's wall clock, read by its policies for ages, expiries and the time an
        # entry has spent in L1: a test moves it forward instead of sleeping.
        self.clock: Callable[[], float] = time.time

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self, client: aioredis.Redis, listener: aioredis.Redis) -> None:
        super().attach(client, listener)
        self.store = RedisStore(client)
        self.spawn(self._prune())

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
            return await self.store.get(primary)
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)
            return None

    def l2_put(self, entry: CachedResponse, retention: float) -> asyncio.Task[bool] | None:
        """Write the entry to Redis in the background: the task says whether it was written
        (a coalesced miss tells the other instances to read it only then); None: Redis down."""
        if self.store is None or not self.redis_up:
            return None
        redis = self.store

        async def put() -> bool:
            try:
                await redis.put(entry, retention)
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
                return False
            return True

        return self.spawn(put())

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
        return sum(store.remove_where(match) for store in self.memory.values())

    async def purge(self, kind: str, value: str, *, wait: float = 2.0) -> dict[str, Any]:
        """Drop entries everywhere; returns once every listening instance has dropped its L1
        copies (or `wait` passed), so no instance serves a purged entry afterwards."""
        result: dict[str, Any] = {"kind": kind, "value": value,
                                  "memory_removed": self.purge_local(kind, value)}
        if self.store is None or not self.redis_up:
            result.update(redis="down", instances_notified=0, instances_acked=0)
            return result
        purge_id = os.urandom(12).hex()
        try:
            result["redis_removed"] = await self.store.purge(kind, value)
            listeners = await self.store.publish_purge(kind, value, purge_id)
            acked = (await self.store.wait_acks(purge_id, listeners, wait)
                     if listeners and wait > 0 else 0)
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)
            result.update(redis="down", instances_notified=0, instances_acked=0)
            return result
        result.update(redis="up", instances_notified=listeners, instances_acked=acked)
        return result

    async def on_subscribed(self) -> None:
        if self._connected_before:
            # Purges may have been missed while disconnected: start L1 afresh.
            for store in self.memory.values():
                store.remove_where(lambda entry: True)
        self._connected_before = True
        self.redis_up = True

    async def on_message(self, data: bytes) -> None:
        """Apply a purge published by any instance to this worker's L1, and acknowledge it."""
        try:
            body = orjson.loads(data)
            self.purge_local(body["kind"], body["value"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if self.store is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.store.ack(body["id"])

    def on_redis_error(self, exc: BaseException) -> None:
        self._redis_failed(exc)

    async def _prune(self, interval: float = 60.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.store is not None and self.redis_up:
                try:
                    while await self.store.prune() >= 1000:
                        pass
                except REDIS_ERRORS as exc:
                    self._redis_failed(exc)

    # -- stats ----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        l2: dict[str, Any] = {"status": "down"}
        if self.store is not None and self.redis_up:
            try:
                l2 = {"status": "up", **await self.store.info()}
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
        return {
            "requests": [{"route": r, "layer": layer, "result": res, "count": n}
                         for (r, layer, res), n in sorted(self.counts.items())],
            "memory": {route: {"bytes": s.bytes, "entries": s.entries, "evictions": s.evictions}
                       for route, s in self.memory.items()},
            "redis": l2,
        }
