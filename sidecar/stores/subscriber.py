"""What the Redis-backed services of a worker share: the background tasks they spawn, and one
pub/sub connection for all of them (`Bus`), kept alive (subscribed again a second after any
failure)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis

from ..aio import cancel_and_wait
from .boundary import REDIS_ERRORS

log = logging.getLogger("sidecar.redis")
__all__ = ["REDIS_ERRORS", "Bus", "Subscriber"]


class Bus:
    """One pub/sub connection for the services of a worker: each service's channels are
    subscribed on it, each message goes to the service whose channel it came on, and every
    service hears when the subscription is made again (to catch up) or lost. One connection
    instead of one per service: a worker holds three Redis connections besides the job queue's
    (the commands, this one, dedup's bulk transfers)."""

    def __init__(self, client: aioredis.Redis, name: str = "redis-bus") -> None:
        """`client` has no read timeout: a subscription is idle by nature."""
        self.client = client
        self.name = name
        self._subscribers: list[Subscriber] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, subscriber: Subscriber) -> None:
        """Before `start`: what the subscription listens to is fixed when it is made."""
        self._subscribers.append(subscriber)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name=self.name)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        await self.client.aclose()

    def _route(self) -> dict[bytes, Subscriber]:
        routes: dict[bytes, Subscriber] = {}
        for subscriber in self._subscribers:
            for channel in subscriber.channels():
                routes[channel.encode()] = subscriber
        return routes

    async def _listen(self) -> None:
        while True:
            routes = self._route()
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*routes)
                for subscriber in self._subscribers:
                    await subscriber.on_subscribed()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    channel = message["channel"]
                    owner = routes.get(channel)
                    if owner is not None:
                        await owner.on_channel_message(channel, message["data"])
            except asyncio.CancelledError:
                self._lost()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except REDIS_ERRORS as exc:
                for subscriber in self._subscribers:
                    subscriber.on_redis_error(exc)
            except Exception:
                log.exception("%s failed; subscribing again", self.name)
            self._lost()
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(1.0)

    def _lost(self) -> None:
        for subscriber in self._subscribers:
            subscriber.on_unsubscribed()


class Subscriber:
    channel: str = ""
    task_name: str = "redis-listener"

    def __init__(self) -> None:
        self.redis: aioredis.Redis | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._own_bus: Bus | None = None

    def attach(self, client: aioredis.Redis, listener: aioredis.Redis | Bus) -> None:
        """`listener`: the worker's Bus (started once every service is attached), or a client
        without a read timeout for a subscription of this service's own."""
        self.redis = client
        if isinstance(listener, Bus):
            listener.add(self)
        else:
            self._own_bus = Bus(listener, self.task_name)
            self._own_bus.add(self)
            self._own_bus.start()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        await cancel_and_wait(list(self._tasks))
        if self._own_bus is not None:
            await self._own_bus.close()

    # -- what a service does with its channel ---------------------------------------------------

    async def on_subscribed(self) -> None:
        """Subscribed (again): catch up with what may have been missed."""

    def channels(self) -> tuple[str, ...]:
        """What the subscription listens to: the service's channel, and any of its own."""
        return (self.channel,)

    async def on_message(self, data: bytes) -> None:
        raise NotImplementedError

    async def on_channel_message(self, channel: bytes, data: bytes) -> None:
        """A message on one of `channels()`; a service with one channel takes `on_message`."""
        await self.on_message(data)

    def on_unsubscribed(self) -> None:
        """The subscription is gone: publications are missed until it is back."""

    def on_redis_error(self, exc: BaseException) -> None:
        """Redis failed under the subscription."""
