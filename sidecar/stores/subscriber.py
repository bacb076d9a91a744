"""What the Redis-backed services of a worker share: the background tasks they spawn, and one
pub/sub subscription kept alive (subscribed again a second after any failure)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..aio import cancel_and_wait

log = logging.getLogger("sidecar.redis")
REDIS_ERRORS = (RedisError, OSError, TimeoutError)


class Subscriber:
    channel: str = ""
    task_name: str = "redis-listener"

    def __init__(self) -> None:
        self.redis: aioredis.Redis | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listener_client: aioredis.Redis | None = None

    def attach(self, client: aioredis.Redis, listener: aioredis.Redis) -> None:
        """`listener` is a client without a read timeout: a subscription is idle by nature."""
        self.redis = client
        self._listener_client = listener
        self._listener = asyncio.create_task(self._listen(listener), name=self.task_name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        tasks = list(self._tasks)
        if self._listener is not None:
            tasks.append(self._listener)
        await cancel_and_wait(tasks)
        if self._listener_client is not None:
            await self._listener_client.aclose()

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

    async def _listen(self, client: aioredis.Redis) -> None:
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.channels())
                await self.on_subscribed()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self.on_channel_message(message["channel"], message["data"])
            except asyncio.CancelledError:
                self.on_unsubscribed()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except REDIS_ERRORS as exc:
                self.on_redis_error(exc)
            except Exception:
                log.exception("%s failed; subscribing again", self.task_name)
            self.on_unsubscribed()
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(1.0)
