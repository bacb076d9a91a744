"""asyncio helpers the standard library lacks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("sidecar")


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, patience: float = 1.0) -> None:
    """Cancel background tasks and wait until they have ended.

    A single cancel() is not enough on Python 3.11: a cancellation that lands as an awaited
    operation completes can be swallowed inside a library (seen with redis-py commands under
    asyncio.timeout), and the task then carries on with its loop. Shutdown must not hang on
    that, so a task still running after `patience` seconds is cancelled again.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=patience)
        if pending:
            log.debug("background tasks ignored a cancellation; cancelling again",
                      extra={"tasks": [task.get_name() for task in pending]})
    for task in tasks:
        if task.done() and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()
