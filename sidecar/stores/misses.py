"""This worker's cache misses in progress: one lock per key, held by the request fetching it and
waited on by the others (sidecar/core/coalesce.py says who takes part and what a waiter does
next), and the keys whose misses skip the lock for a while.

Across workers and instances the leader of a key here also competes for a Redis lock, through
the dedup service's coordination (stores/dedup.py); that part lives in the cache policy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..core.coalesce import Outcome, PassMemo
from .entry import CachedResponse


@dataclass(frozen=True, slots=True)
class Fetched:
    """What a leader hands its waiters."""

    outcome: Outcome
    entry: CachedResponse | None = None


FAILED = Fetched(Outcome.FAILED)
UNCACHEABLE = Fetched(Outcome.UNCACHEABLE)


class Miss:
    """A key being fetched. Its leader releases it exactly once, whatever happens (a `finally`),
    so that a waiter never waits longer than its own bound."""

    __slots__ = ("done", "key", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.done: asyncio.Future[Fetched] = asyncio.get_running_loop().create_future()
        self.waiting = 0


class MissLocks:
    def __init__(self) -> None:
        self._held: dict[str, Miss] = {}
        self.passing = PassMemo()

    def holder(self, key: str) -> Miss | None:
        return self._held.get(key)

    def hold(self, key: str) -> Miss:
        """Lead the miss of `key` (no one else holds it: see `holder`)."""
        miss = self._held[key] = Miss(key)
        return miss

    def release(self, miss: Miss, fetched: Fetched) -> None:
        """The miss is over: a request coming from now on looks the key up again."""
        if self._held.get(miss.key) is miss:
            del self._held[miss.key]
        if not miss.done.done():
            miss.done.set_result(fetched)

    async def wait(self, miss: Miss, timeout: float) -> Fetched | None:
        """The leader's outcome, or None after `timeout` seconds. A waiter that is cancelled
        (its client left) leaves the others waiting."""
        miss.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(miss.done)
        except TimeoutError:
            return None
        finally:
            miss.waiting -= 1

    def __len__(self) -> int:
        return len(self._held)

    def __repr__(self) -> str:
        waiting = sum(miss.waiting for miss in self._held.values())
        return f"<MissLocks held={len(self._held)} waiting={waiting} {self.passing!r}>"
