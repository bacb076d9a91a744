"""The breakers of one worker, and (scope: cluster) their open/closed state shared through Redis.

Sharing: when a cluster-scoped breaker opens here, the worker writes `opened_at` under the
breaker's key (expiring after `reset`) and publishes it on one channel; every worker of every
instance listens and opens its own copy with the same `opened_at`, so all of them stop sending
within a publication's delay (milliseconds), and half-open together when `reset` has passed. A
close (a trial succeeded, or an operator reset it) is published the same way. A worker that
(re)subscribes reads the keys of its cluster breakers, so it does not miss an opening made
while it was away. Failures are counted per worker; only the verdict is shared.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import orjson

from ..core.breaker import Breaker, State
from .subscriber import REDIS_ERRORS, Subscriber

log = logging.getLogger("sidecar.breaker")
PREFIX = "sidecar:breaker:"
CHANNEL = PREFIX + "events"


class BreakerService(Subscriber):
    channel = CHANNEL
    task_name = "breaker-listener"

    def __init__(self) -> None:
        super().__init__()
        self.breakers: dict[str, Breaker] = {}
        self.cluster: set[str] = set()  # names of cluster-scoped breakers
        self.counts: Counter[tuple[str, str]] = Counter()  # (breaker, event)
        self.redis_up = False
        self._instance = os.urandom(8).hex()
        self._applying_remote = False
        self._changed_at: dict[str, float] = {}  # when the shared state last changed, by name
        # The breakers' wall clock (openings are shared between instances as wall times): a
        # test moves it forward instead of sleeping through a reset.
        self.clock: Callable[[], float] = time.time

    def breaker(self, name: str, *, failures: int, reset: float, half_open_trials: int,
                cluster: bool) -> Breaker:
        """The worker's breaker of that name: kept, with its state, across reloads that do not
        change its settings."""
        current = self.breakers.get(name)
        if current is not None and (current.failures, current.reset,
                                    current.half_open_trials) == (failures, reset,
                                                                  half_open_trials):
            breaker = current
        else:
            breaker = Breaker(name, failures=failures, reset=reset,
                              half_open_trials=half_open_trials)
            breaker.on_transition.append(self._transition)
            self.breakers[name] = breaker
        if cluster:
            self.cluster.add(name)
        else:
            self.cluster.discard(name)
        return breaker

    # -- transitions ----------------------------------------------------------------------------

    def _transition(self, breaker: Breaker, old: State, new: State, now: float) -> None:
        self.counts[(breaker.name, new.value)] += 1
        log.warning("circuit breaker %s", new.value, extra={
            "breaker": breaker.name, "from": old.value, "to": new.value,
            "remote": self._applying_remote})
        if self._applying_remote or breaker.name not in self.cluster:
            return
        if new is State.OPEN:
            self._changed_at[breaker.name] = breaker.opened_at
            self.spawn(self._share(breaker.name, "open", breaker.opened_at, breaker.reset))
        elif new is State.CLOSED:
            self._changed_at[breaker.name] = now
            self.spawn(self._share(breaker.name, "closed", now, breaker.reset))

    def reset(self, name: str) -> bool:
        """Close a breaker now (the admin endpoint); False when there is no such breaker.
        A cluster-scoped one is closed everywhere, even if this worker had it closed already."""
        breaker = self.breakers.get(name)
        if breaker is None:
            return False
        now = self.clock()
        was_closed = breaker.state is State.CLOSED
        breaker.force_close(now)
        if was_closed and name in self.cluster:
            self._changed_at[name] = now
            self.spawn(self._share(name, "closed", now, breaker.reset))
        return True

    async def _share(self, name: str, state: str, at: float, reset: float) -> None:
        if self.redis is None or not self.redis_up:
            return
        message = orjson.dumps({"name": name, "state": state, "at": at,
                                "from": self._instance})
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if state == "open":
                    pipe.set(PREFIX + name, str(at), px=max(1, int(reset * 1000)))
                else:
                    pipe.delete(PREFIX + name)
                pipe.publish(CHANNEL, message)
                await pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("could not share a breaker's state; it holds in this worker only",
                        extra={"breaker": name, "error": str(exc) or type(exc).__name__})

    def _apply(self, name: str, state: str, at: float) -> None:
        breaker = self.breakers.get(name)
        if breaker is None or name not in self.cluster:
            return
        # Last writer wins: a worker whose trial failed after another's succeeded must not be
        # closed by the older news, nor leave the other one closed.
        if at < self._changed_at.get(name, 0.0):
            return
        self._changed_at[name] = at
        self._applying_remote = True
        try:
            if state == "open":
                breaker.force_open(at, self.clock())
            elif breaker.state is not State.CLOSED:
                breaker.force_close(self.clock())
        finally:
            self._applying_remote = False

    async def on_subscribed(self) -> None:
        """Adopt the openings recorded while this worker was not listening."""
        if self.redis is None or not self.cluster:
            return
        names = sorted(self.cluster)
        values = cast("list[bytes | None]", await self.redis.mget([PREFIX + n for n in names]))
        for name, value in zip(names, values, strict=True):
            if value is not None:
                self._apply(name, "open", float(value))

    async def on_message(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            if event["from"] != self._instance:
                self._apply(str(event["name"]), str(event["state"]), float(event["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return

    # -- stats ----------------------------------------------------------------------------------

    def stats(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [{
            "name": name, "state": b.state.value,
            "scope": "cluster" if name in self.cluster else "local",
            "consecutive_failures": b.consecutive_failures, "failures_to_open": b.failures,
            "reset_s": b.reset, "retry_after_s": round(b.retry_after(now), 3),
            "opened_at": b.opened_at if b.state is not State.CLOSED else None,
            "transitions": b.transitions,
            "events": {event: n for (bname, event), n in sorted(self.counts.items())
                       if bname == name},
        } for name, b in sorted(self.breakers.items())]
