"""Deduplication state of one worker: the flights in progress here, the Redis side shared by
every instance (leader locks, published results), and counters for the stats interface.

Across instances a flight works like this: the instance that wins `SET lock NX PX lease` is the
leader; it renews the lease while the upstream call runs, stores the result under a short-lived
key and publishes the flight's key on one channel. Every worker listens on that channel and
wakes the followers waiting for that key, which then read the result. A follower that sees the
lock vanish without a result (its leader died) takes the lock and becomes the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from ..crypto import Sealer, SealError
from .subscriber import REDIS_ERRORS, Bus, Subscriber

log = logging.getLogger("sidecar.dedup")

PREFIX = "sidecar:dedup:"
CHANNEL = PREFIX + "done"
RESULT_TTL_MS = 30_000  # followers read the result right after the publication
NOT_SHARED = b"not-shared"  # published instead of a result followers may not have
# Published by a cache that coalesces its misses: the response is in the shared cache, read it
# there (the entry itself is not copied a second time into the result key).
CACHED = b"cached"
_MARKERS = frozenset({NOT_SHARED, CACHED})

# Delete the lock only if this leader still holds it (a lease that expired may be someone
# else's by now).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Take the lock, or say who holds it, in one step: a leader that releases in between cannot
# leave a follower without either.
_LEAD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return redis.call('GET', KEYS[1]) or 1
"""
_FINISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return redis.call('PUBLISH', ARGV[4], ARGV[5])
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class Coordination(enum.Enum):
    """What `DedupService.coordinate` tells a flight when it brings no result."""

    LEAD = "lead"  # this flight holds the lock: it calls the upstream and publishes
    ALONE = "alone"  # no coordination (Redis failed, the wait ran out): call the upstream


@dataclass(frozen=True, slots=True)
class SharedResult:
    """A whole response as a leader hands it to its followers."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    vary_values: tuple[str | None, ...] = ()  # the leader's, for the Vary'd request headers

    def pack(self) -> bytes:
        meta = orjson.dumps({"s": self.status, "r": self.reason,
                             "h": [[n.decode("latin-1"), v.decode("latin-1")]
                                   for n, v in self.headers],
                             "vv": self.vary_values})
        return struct.pack("!I", len(meta)) + meta + self.body

    @classmethod
    def unpack(cls, data: bytes) -> SharedResult:
        (length,) = struct.unpack_from("!I", data)
        meta = orjson.loads(data[4:4 + length])
        headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"])
        return cls(meta["s"], meta["r"], headers, data[4 + length:], tuple(meta["vv"]))


class DedupService(Subscriber):
    channel = CHANNEL
    task_name = "dedup-listener"

    def __init__(self) -> None:
        super().__init__()
        self.redis_up = False
        # What seals the responses it hands to other instances, and the idempotency records
        # of the policies that reach Redis through this service (crypto.py).
        self.sealer = Sealer()
        self.counts: Counter[tuple[str, str]] = Counter()  # (route, event)
        self.flights: dict[str, Any] = {}  # key -> policies.dedup.Flight, this worker
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._subscribed = asyncio.Event()
        self._bulk: aioredis.Redis | None = None
        self._own_bulk = False
        self._release: Any = None
        self._finish: Any = None
        self._lead: Any = None
        self._renew: Any = None
        self.command_timeout = 1.0  # the read timeout of `client`'s small commands

    # -- lifecycle ------------------------------------------------------------------------------

    def attach(self, client: aioredis.Redis, listener: aioredis.Redis | Bus,
               bulk: aioredis.Redis | None = None, *, command_timeout: float = 1.0) -> None:
        """`bulk` (this service's own, closed with it) carries whole responses: its read
        timeout is sized for them, not for the small commands of `client`."""
        super().attach(client, listener)
        self.command_timeout = command_timeout
        self._bulk = bulk if bulk is not None else client
        self._own_bulk = bulk is not None
        self._finish = self._bulk.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._lead = client.register_script(_LEAD)
        self._renew = client.register_script(_RENEW)

    async def close(self) -> None:
        await super().close()
        if self._own_bulk and self._bulk is not None:
            await self._bulk.aclose()

    @property
    def cluster_ready(self) -> bool:
        """Redis reachable and this worker subscribed: a cluster flight can be coordinated."""
        return self.redis is not None and self.redis_up and self._subscribed.is_set()

    def redis_failed(self, exc: BaseException) -> None:
        if self.redis_up:
            log.warning("redis unavailable; dedup works per worker, Idempotency-Key unenforced",
                        extra={"error": str(exc) or type(exc).__name__})
        self.redis_up = False

    # -- cluster flights ------------------------------------------------------------------------

    def waiter(self, key: str) -> asyncio.Future[None]:
        """Resolved when some instance publishes that the flight `key` is done."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        return future

    def forget(self, key: str, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(future)
            if not waiters:
                del self._waiters[key]

    async def lead_or_holder(self, key: str, token: str, lease: float) -> str | None:
        """Take the lock (None), or learn which leader's token holds it."""
        holder = await self._lead(keys=[PREFIX + "lock:" + key], args=[token, int(lease * 1000)])
        return None if holder == 1 else cast(bytes, holder).decode()

    async def lock_held(self, key: str) -> bool:
        assert self.redis is not None
        return bool(await self.redis.exists(PREFIX + "lock:" + key))

    async def renew(self, key: str, token: str, lease: float) -> bool:
        return bool(await self._renew(keys=[PREFIX + "lock:" + key],
                                      args=[token, int(lease * 1000)]))

    async def release(self, key: str, token: str) -> None:
        await self._release(keys=[PREFIX + "lock:" + key], args=[token])

    async def publish(self, key: str, token: str, result: SharedResult | bytes | None) -> None:
        """Store this leader's result (None: followers must ask for themselves; or a marker
        such as CACHED), let go of the lock and wake every instance's followers, in one step:
        a request arriving after it starts a flight of its own, never joins the finished one."""
        assert self._bulk is not None
        where = PREFIX + "result:" + key + ":" + token
        await self._finish(
            keys=[where, PREFIX + "lock:" + key],
            args=[self.sealer.seal(result.pack(), where) if isinstance(result, SharedResult)
                  else result or NOT_SHARED, RESULT_TTL_MS, token, CHANNEL, key])

    async def wake(self, key: str) -> None:
        """Wake the followers of `key` without a result: they look at the lock again."""
        assert self.redis is not None
        await self.redis.publish(CHANNEL, key)

    async def result(self, key: str, token: str) -> SharedResult | bytes | None:
        """What the leader holding `token` published: a result, a marker (NOT_SHARED,
        CACHED), or None (yet)."""
        assert self._bulk is not None
        where = PREFIX + "result:" + key + ":" + token
        data = cast("bytes | None", await self._bulk.get(where))
        if data is None or data in _MARKERS:
            return data
        try:
            return SharedResult.unpack(self.sealer.open(data, where))
        except SealError as exc:  # the follower asks for itself, as without a result
            log.warning("a shared response did not open", extra={"error": str(exc)})
            return NOT_SHARED

    # -- a flight's part in the cluster, Redis errors handled -----------------------------------

    async def coordinate(self, key: str, token: str, *, wait: float, lease: float,
                         note: Callable[[str], None],
                         on_wait: Callable[[], None] | None = None
                         ) -> Coordination | SharedResult | bytes:
        """Lead (LEAD: the lock is this flight's), or wait at most `wait` for the instance that
        does and take what it published: a result or a marker. ALONE: call the upstream
        without coordination (Redis failed, or `wait` ran out). `note` counts the events
        `wait_expired` and `takeover` (a dead leader's lock found gone); `on_wait` is called
        once, when this flight starts waiting for another one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while True:
                woken = self.waiter(key)
                try:
                    holder = await self.lead_or_holder(key, token, lease)
                    if holder is None:
                        return Coordination.LEAD
                    result = await self.result(key, holder)
                    if result is None:
                        if on_wait is not None:
                            on_wait()
                            on_wait = None
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            note("wait_expired")
                            return Coordination.ALONE
                        try:
                            async with asyncio.timeout(min(remaining, lease / 2)):
                                await asyncio.shield(woken)
                        except TimeoutError:
                            if not await self.lock_held(key):
                                note("takeover")
                            continue
                        result = await self.result(key, holder)
                        if result is None:
                            continue  # the leader failed, or this worker lost its subscription
                finally:
                    self.forget(key, woken)
                return result
        except REDIS_ERRORS as exc:
            self.redis_failed(exc)
            return Coordination.ALONE

    async def keep(self, key: str, token: str, lease: float, note: Callable[[str], None]
                   ) -> None:
        """Keep a leader's lock while its upstream call runs (cancel the task when it is done);
        a Redis hiccup is retried until the lease would have lapsed anyway (`lease_lost`)."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(lease / 3)
            try:
                if not await self.renew(key, token, lease):
                    note("lease_lost")
                    return
                renewed = loop.time()
            except REDIS_ERRORS:
                if loop.time() - renewed > lease:
                    note("lease_lost")
                    return

    async def finish(self, key: str, token: str, result: SharedResult | bytes | None) -> None:
        """`publish`, a Redis failure only noted: followers then find the lock gone."""
        try:
            await self.publish(key, token, result)
        except REDIS_ERRORS as exc:
            self.redis_failed(exc)

    async def give_up(self, key: str, token: str) -> None:
        """A leader that failed: let go of the lock and wake the other instances' followers at
        once, so that one of them takes over."""
        try:
            await self.release(key, token)
            await self.wake(key)
        except REDIS_ERRORS as exc:
            self.redis_failed(exc)

    async def on_subscribed(self) -> None:
        self._subscribed.set()

    async def on_message(self, data: bytes) -> None:
        key = data.decode("latin-1") if isinstance(data, bytes) else str(data)
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(None)

    def on_unsubscribed(self) -> None:
        self._subscribed.clear()
        # Followers waiting here would miss publications: wake them to look for themselves.
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_result(None)
        self._waiters.clear()

    def on_redis_error(self, exc: BaseException) -> None:
        self.redis_failed(exc)

    # -- stats ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "events": [{"route": route, "event": event, "count": n}
                       for (route, event), n in sorted(self.counts.items())],
            "in_flight": len(self.flights),
            "redis": "up" if self.cluster_ready else "down",
        }
