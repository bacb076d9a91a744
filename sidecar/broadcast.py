"""One streamed upstream body read once and handed to many clients.

Chunks are kept only until every reader has taken them, and the upstream is read no further
ahead of the slowest reader than `window` bytes: one copy in memory, not one per client, and
bounded. Written by hand: asyncio has no multi-consumer stream, and each reader must see the
whole body from its first byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Source(Protocol):
    async def read(self) -> bytes: ...

    def close(self) -> None: ...


class Broadcast:
    def __init__(self, source: Source, *, window: int = 4 * 1024**2,
                 collect_up_to: int = 0) -> None:
        self._source = source
        self._window = window
        self._chunks: list[bytes] = []
        self._needed: list[int] = []  # per kept chunk: readers that have not taken it yet
        self._base = 0  # index of _chunks[0] in the whole body
        self._buffered = 0
        self._readers: set[Reader] = set()
        self._next: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._space = asyncio.Event()
        self.done = False
        self.error: BaseException | None = None
        # The whole body, kept by reference while it fits (for publishing it elsewhere).
        self._collect_up_to = collect_up_to
        self.collected: list[bytes] | None = [] if collect_up_to > 0 else None
        self._collected_size = 0
        # Called once, when the broadcast stops taking new readers (first chunk dropped, or
        # the body fully read, or abandoned).
        self.on_closed: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        # While this says no, nothing is dropped: readers are still on their way to register.
        self.may_trim: Callable[[], bool] | None = None

    @property
    def joinable(self) -> bool:
        """False once a chunk was dropped or the pump ended: a new reader would miss bytes."""
        return self._base == 0 and not self._finished.is_set()

    def reader(self) -> Reader:
        """A new reader from the first byte; the first one starts reading the upstream."""
        if not self.joinable:
            raise RuntimeError("the broadcast has dropped its first chunks")
        reader = Reader(self)
        self._readers.add(reader)
        for i in range(len(self._needed)):
            self._needed[i] += 1
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name="broadcast-pump")
        return reader

    def abandon_if_unread(self) -> None:
        """Nobody came to read (every client left before the response arrived): let go of the
        upstream connection."""
        if self._task is None and not self._finished.is_set():
            self.error = ConnectionResetError("the shared response was abandoned")
            self._source.close()
            self._close()

    async def finished(self) -> None:
        await self._finished.wait()

    def _close(self) -> None:
        self._finished.set()
        self._wake()
        if self.on_closed is not None:
            callback, self.on_closed = self.on_closed, None
            callback()

    async def _pump(self) -> None:
        try:
            while chunk := await self._source.read():
                if not self._readers:
                    break
                self._chunks.append(chunk)
                self._needed.append(len(self._readers))
                self._buffered += len(chunk)
                if self.collected is not None:
                    self._collected_size += len(chunk)
                    if self._collected_size <= self._collect_up_to:
                        self.collected.append(chunk)
                    else:
                        self.collected = None
                self._wake()
                while self._buffered > self._window and self._readers:
                    self._space.clear()
                    await self._space.wait()
            else:
                self.done = True
        except asyncio.CancelledError:
            self.error = ConnectionResetError("the shared response was abandoned")
            raise
        except BaseException as exc:
            self.error = exc
        finally:
            if not self.done and self.error is None:
                self.error = ConnectionResetError("every reader left")
            if not self.done:
                self.collected = None
                self._source.close()
            self._close()

    def _wake(self) -> None:
        future, self._next = self._next, asyncio.get_running_loop().create_future()
        future.set_result(None)

    def _took(self, index: int) -> None:
        self._needed[index - self._base] -= 1
        self._trim()

    def retrim(self) -> None:
        """Drop what every reader has taken, now that `may_trim` may have changed its mind."""
        self._trim()

    def _trim(self) -> None:
        if self.may_trim is not None and not self.may_trim():
            return
        dropped = False
        while self._needed and self._needed[0] <= 0:
            self._buffered -= len(self._chunks[0])
            del self._chunks[0], self._needed[0]
            self._base += 1
            dropped = True
        if dropped:
            self._space.set()
            if self.on_closed is not None:
                callback, self.on_closed = self.on_closed, None
                callback()

    def _leave(self, reader: Reader) -> None:
        if reader not in self._readers:
            return
        self._readers.discard(reader)
        for i in range(max(0, reader.position - self._base), len(self._needed)):
            self._needed[i] -= 1
        self._trim()
        self._space.set()
        if not self._readers and not self._finished.is_set():
            # Nobody left to read: let go of the upstream now, and take no new readers (a
            # pump cancelled before its first step would never run its own clean-up).
            self.error = ConnectionResetError("every reader left")
            self.collected = None
            self._source.close()
            self._close()
            if self._task is not None:
                self._task.cancel()


class Reader:
    """One client's view: `read()` returns the next chunk, b"" at the end."""

    __slots__ = ("_broadcast", "position")

    def __init__(self, broadcast: Broadcast) -> None:
        self._broadcast = broadcast
        self.position = broadcast._base

    async def read(self) -> bytes:
        broadcast = self._broadcast
        while True:
            index = self.position
            offset = index - broadcast._base
            if offset < len(broadcast._chunks):
                chunk = broadcast._chunks[offset]
                self.position += 1
                broadcast._took(index)
                return chunk
            if broadcast.error is not None:
                self.close()
                raise broadcast.error
            if broadcast.done:
                self.close()
                return b""
            try:
                await asyncio.shield(broadcast._next)
            except asyncio.CancelledError:
                self.close()  # a reader that stopped must not hold the others back
                raise

    def close(self) -> None:
        self._broadcast._leave(self)
