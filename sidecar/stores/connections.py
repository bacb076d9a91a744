"""The Redis clients of one process, built in one place, each named in Redis's CLIENT LIST
(`sidecar:<role>:<pid>`) so that an operator sees who holds which connection.

Three for the request path and the services: `commands` (short commands, a read timeout sized
for them), `pubsub` (one connection for every service's channels, no read timeout: it is idle
by nature) and `bulk` (dedup's whole responses, up to dedup.max_body, with a read timeout long
enough for a big transfer). The job queue has two more of its own (`job_clients`). Whether Redis
answers (`ping`) and the embedded Redis's memory bound (`set_maxmemory`) are asked here, so the
runtime above never handles a Redis error: `StoreUnavailable` or nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import DataError

from .boundary import redis_boundary


def client_name(role: str) -> str:
    """How a connection of this process shows in Redis's CLIENT LIST."""
    return f"sidecar:{role}:{os.getpid()}"


# The read timeout of the short commands: at least a second, whatever redis.connect_timeout.
MIN_COMMAND_TIMEOUT = 1.0
# Dedup's bulk transfers: a read timeout sized for small commands would turn a big, slow
# transfer into a second upstream call.
MIN_BULK_TIMEOUT = 10.0


def command_timeout(connect_timeout: float) -> float:
    """The read timeout of short commands, and the bound of a client request's Redis calls."""
    return max(connect_timeout, MIN_COMMAND_TIMEOUT)


class HiredisPackedConnection(aioredis.Connection):
    """A TCP connection that packs commands with hiredis (C) instead of redis-py's asyncio
    packer (Python; its sync client already uses hiredis's). Measured on the job path (an
    enqueue is one script call of ~40 arguments, the job's record among them): packing was a
    quarter of the sidecar's CPU per 202, about 30 us. `pack_command` is the connection's
    public hook; `pack_commands` (pipelines) calls it per command. A `unix://` or `rediss://`
    URL keeps redis-py's own connection class."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])  # "CLIENT SETNAME" -> two words
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # what redis-py's packer raises for an unencodable value
            raise DataError(str(exc)) from exc


def _client(url: str, role: str, connect_timeout: float,
            read_timeout: float | None) -> aioredis.Redis:
    if read_timeout is None:
        return aioredis.Redis.from_url(url, socket_connect_timeout=connect_timeout,
                                       client_name=client_name(role),
                                       connection_class=HiredisPackedConnection)
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=connect_timeout, socket_timeout=read_timeout,
        health_check_interval=0, client_name=client_name(role),
        connection_class=HiredisPackedConnection)


def job_clients(url: str, connect_timeout: float, *, wake_ups: bool = True
                ) -> tuple[aioredis.Redis, aioredis.Redis | None]:
    """The job queue's two, without a read timeout: saq's pub/sub of job changes shares the
    first, and the wake-up subscription (`wake_ups`: a process with job loops) is idle by
    nature. The job service bounds a client request's calls itself, with `command_timeout`.
    A process that only enqueues hears no wake-ups: every enqueue publishes one, and
    receiving them cost such a process 2-3% of its CPU under a burst of POSTs."""
    return (_client(url, "jobs", connect_timeout, None),
            _client(url, "jobs-wake", connect_timeout, None) if wake_ups else None)


@redis_boundary
class RedisConnections:
    """The three clients of one process to the Redis at `url`; none connects before its
    first use."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout(connect_timeout)
        self.commands = _client(url, "commands", connect_timeout, self.command_timeout)
        self.pubsub = _client(url, "pubsub", connect_timeout, None)
        self.bulk = _client(url, "bulk", connect_timeout, max(connect_timeout, MIN_BULK_TIMEOUT))

    async def ping(self) -> None:
        """Returns when Redis answers within the connect timeout; `StoreUnavailable` if not."""
        ping = cast(Awaitable[bool], self.commands.ping())
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the ping completes, and shutdown would then wait for this task forever.
        async with asyncio.timeout(self.connect_timeout):
            await ping

    async def set_maxmemory(self, total: int) -> None:
        await self.commands.config_set("maxmemory", total)

    async def close(self) -> None:
        """Closes the commands client; each of the others is closed by the one it was handed
        to (the bus, dedup, the job service), after the services that use it."""
        await self.commands.aclose()
