"""The cache as the policies see it: L1 per route in this worker, L2 in Redis, purges that reach
every instance's L1 through Redis pub/sub, and counters for the stats interface."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..aio import cancel_and_wait
from .entry import CachedResponse
from .memory import MemoryStore
from .redis import CHANNEL, RedisStore

if TYPE_CHECKING:
    from ..config import CacheConfig

log = logging.getLogger("sidecar.cache")
REDIS_ERRORS = (RedisError, OSError, TimeoutError)


class CacheService:
    def __init__(self) -> None:
        self.memory: dict[str, MemoryStore] = {}
        self.redis: RedisStore | None = None
        self.redis_up = False
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (route, layer, result)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refreshing: set[str] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listener_client: aioredis.Redis | None = None
        self._pruner: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self, client: aioredis.Redis, listener: aioredis.Redis) -> None:
        """`listener` is a client without a read timeout: a subscription is idle by nature."""
        self.redis = RedisStore(client)
        self._listener_client = listener
        self._listener = asyncio.create_task(self._listen(listener), name="cache-purge-listener")
        self._pruner = asyncio.create_task(self._prune(), name="cache-index-pruner")

    async def close(self) -> None:
        tasks = list(self._tasks)
        tasks += [task for task in (self._listener, self._pruner) if task is not None]
        await cancel_and_wait(tasks)
        if self._listener_client is not None:
            await self._listener_client.aclose()

    def memory_for(self, route: str, config: CacheConfig) -> MemoryStore:
        """The route's L1, kept across reloads unless its bounds change."""
        store = self.memory.get(route)
        if store is None or (store.max_bytes, store.max_entry) != (
                config.memory.max_bytes, config.memory.max_entry):
            store = MemoryStore(config.memory.max_bytes, config.memory.max_entry)
            self.memory[route] = store
        return store

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- L2 -------------------------------------------------------------------------------------

    async def l2_get(self, primary: str) -> list[CachedResponse] | None:
        if self.redis is None or not self.redis_up:
            return None
        try:
            return await self.redis.get(primary)
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)
            return None

    def l2_put(self, entry: CachedResponse, retention: float) -> None:
        if self.redis is None or not self.redis_up:
            return
        redis = self.redis

        async def put() -> None:
            try:
                await redis.put(entry, retention)
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)

        self.spawn(put())

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
        if self.redis is not None and self.redis_up:
            try:
                if not await self.redis.try_refresh_lock(primary, seconds):
                    return False
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
        self._refreshing.add(primary)
        return True

    def refresh_done(self, primary: str) -> None:
        """Release the claim at once, so the refreshed entry's next expiry can refresh too."""
        self._refreshing.discard(primary)
        if self.redis is not None and self.redis_up:
            redis = self.redis

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
        if self.redis is None or not self.redis_up:
            result.update(redis="down", instances_notified=0, instances_acked=0)
            return result
        purge_id = os.urandom(12).hex()
        try:
            result["redis_removed"] = await self.redis.purge(kind, value)
            listeners = await self.redis.publish_purge(kind, value, purge_id)
            acked = (await self.redis.wait_acks(purge_id, listeners, wait)
                     if listeners and wait > 0 else 0)
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)
            result.update(redis="down", instances_notified=0, instances_acked=0)
            return result
        result.update(redis="up", instances_notified=listeners, instances_acked=acked)
        return result

    async def _listen(self, client: aioredis.Redis) -> None:
        """Apply purges published by any instance to this worker's L1, and acknowledge them."""
        connected_before = False
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                if connected_before:
                    # Purges may have been missed while disconnected: start L1 afresh.
                    for store in self.memory.values():
                        store.remove_where(lambda entry: True)
                connected_before = True
                self.redis_up = True
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        body = orjson.loads(message["data"])
                        self.purge_local(body["kind"], body["value"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue
                    if self.redis is not None:
                        with contextlib.suppress(*REDIS_ERRORS):
                            await self.redis.ack(body["id"])
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(1.0)

    async def _prune(self, interval: float = 60.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.redis is not None and self.redis_up:
                try:
                    while await self.redis.prune() >= 1000:
                        pass
                except REDIS_ERRORS as exc:
                    self._redis_failed(exc)

    # -- stats ----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        l2: dict[str, Any] = {"status": "down"}
        if self.redis is not None and self.redis_up:
            try:
                l2 = {"status": "up", **await self.redis.info()}
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
        return {
            "requests": [{"route": r, "layer": layer, "result": res, "count": n}
                         for (r, layer, res), n in sorted(self.counts.items())],
            "memory": {route: {"bytes": s.bytes, "entries": s.entries, "evictions": s.evictions}
                       for route, s in self.memory.items()},
            "redis": l2,
        }
