"""Where Redis's errors stop: every service that talks to Redis raises `StoreUnavailable`, and
only that, when Redis cannot answer, so the code above the stores (policies, the admin
interface, metrics, the job API, callbacks and schedules) handles one exception of ours and
never names Redis's (tests/test_imports.py checks it; jobs/runner.py, which drives saq's
records directly, is the one exception).

A service class is marked with `@redis_boundary`: each of its public coroutine methods turns
the errors a Redis call raises (redis-py's, a socket's, a timeout) into `StoreUnavailable`,
the original kept as its cause. Code inside the stores keeps catching `REDIS_ERRORS`, which
includes `StoreUnavailable`, so a store calling another store's method sees either.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from redis.exceptions import RedisError

_RAISED_BY_REDIS = (RedisError, OSError, TimeoutError)


class StoreUnavailable(Exception):
    """Redis did not answer (down, unreachable, timed out, or refused the command): what
    depended on it degrades as its policy says (bypass, local state, a 503)."""


REDIS_ERRORS: tuple[type[BaseException], ...] = (*_RAISED_BY_REDIS, StoreUnavailable)

_Class = TypeVar("_Class", bound=type)


def _guarded(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except _RAISED_BY_REDIS as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
    return guarded


def redis_boundary(cls: _Class) -> _Class:
    """Marks `cls` as a Redis boundary: its public coroutine methods (those it defines, not
    inherited ones) raise `StoreUnavailable` instead of Redis's errors."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, _guarded(member))
    return cls


class within:
    """`async with within(seconds)`: the Redis calls inside get `seconds` to answer, else
    `StoreUnavailable`. A Redis that hangs (stopped, swapping) still accepts connections and
    commands, and without a bound a client's request would wait as long as it hangs. What was
    sent may still be carried out once Redis answers again. (The enqueue's own call is bounded
    by its batch instead: stores/batching.py.)"""

    __slots__ = ("_seconds", "_timeout")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._timeout = asyncio.timeout(seconds)

    async def __aenter__(self) -> within:
        await self._timeout.__aenter__()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        try:
            await self._timeout.__aexit__(kind, exc, traceback)
        except TimeoutError as expired:
            raise StoreUnavailable(
                f"Redis did not answer within {self._seconds:g}s") from expired
