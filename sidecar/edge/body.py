"""A request body as the client sends it: an async iterator of chunks with back-pressure.

The connection feeds chunks as the parser yields them; past `HIGH_WATER` buffered bytes it
stops reading from the socket until the reader (the upstream request the body streams into)
has taken them down to `LOW_WATER`. So a 256 MiB upload holds at most a few hundred KiB here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from ..errors import RequestBodyTooLargeError

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class FlowControl(Protocol):
    """What a body needs of its connection (edge/protocol.py): to stop and resume reading."""

    def pause_for_body(self) -> None: ...

    def resume_for_body(self) -> None: ...


class ClientGone(ConnectionResetError):
    """The client closed its connection before its request body was whole."""


class RequestBody:
    __slots__ = ("_chunks", "_conn", "_error", "_limit", "_size", "_waiter", "done", "received")

    def __init__(self, conn: FlowControl, limit: int) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0  # buffered, not yet read
        self._limit = limit  # server.limits.max_body
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.done = False  # the parser saw the body's end
        self.received = 0

    # -- the connection's side -----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self._limit:
            if self._error is None:
                self.fail(RequestBodyTooLargeError(
                    f"request body over {self._limit} bytes (server.limits.max_body)"))
            return
        if self._error is not None:
            return  # nobody will read it
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER:
            self._conn.pause_for_body()
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None and not (self.done and not self._chunks):
            self._error = error
            self._chunks.clear()
            self._size = 0
            self._wake()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the reader's side ---------------------------------------------------------------------

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self.done:
                raise StopAsyncIteration
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = chunks.popleft()
        self._size -= len(chunk)
        if self._size <= LOW_WATER:
            self._conn.resume_for_body()
        return chunk

    async def whole(self) -> bytes:
        """All of it (the caller knows it is small)."""
        parts = [chunk async for chunk in self]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __repr__(self) -> str:
        state = "done" if self.done else "error" if self._error else "open"
        return f"<RequestBody {state} received={self.received} buffered={self._size}>"

