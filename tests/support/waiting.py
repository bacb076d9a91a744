"""Waiting on conditions (never on sleeps), and bounded concurrency for many requests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def gather_limited(coros: list[Awaitable[Any]], limit: int = 50) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def run(coro: Awaitable[Any]) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    """Poll `check` (a plain or an async function) every 20 ms until it is true;
    AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await _truth(check()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def _truth(value: Awaitable[bool] | bool) -> bool:
    return await value if inspect.isawaitable(value) else bool(value)
