"""The upstreams tests put the sidecar in front of: the example backend, a scriptable origin,
and a raw TCP upstream that writes exact bytes."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.examples.backend import CALLS


@dataclass
class Backend:
    url: str
    port: int
    app: web.Application

    def calls(self, key: str) -> int:
        return int(self.app[CALLS][key])


class Origin:
    """An upstream whose answers each test scripts per path, counting calls and keeping the
    headers of the last request it saw on each path."""

    def __init__(self) -> None:
        self.scripts: dict[str, Callable[[web.Request, int], Awaitable[web.StreamResponse]]] = {}
        self.calls: Counter[str] = Counter()
        self.seen: dict[str, Any] = {}
        self.url = ""
        self.port = 0

    def reply(self, path: str, *, status: int = 200, headers: dict[str, str] | None = None,
              body: str | None = None) -> None:
        """A fixed answer; the body defaults to `<path> #<call number>` so tests can tell
        a fresh response from a stored one."""
        fixed = dict(headers or {})

        async def answer(request: web.Request, n: int) -> web.Response:
            text = body if body is not None else f"{path} #{n}"
            return web.Response(status=status, headers=fixed, text=text)

        self.scripts[path] = answer

    def script(self, path: str,
               handler: Callable[[web.Request, int], Awaitable[web.StreamResponse]]) -> None:
        self.scripts[path] = handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls[request.path] += 1
        self.seen[request.path] = request.headers.copy()
        script = self.scripts.get(request.path)
        if script is None:
            return web.Response(status=404, text="not scripted")
        return await script(request, self.calls[request.path])


@dataclass
class Conn:
    """One accepted upstream connection, as the scripted server sees it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read_request(self) -> bytes | None:
        """The next request head and its Content-Length body, or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await self.reader.readexactly(int(match.group(1))) if match else b""
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def finish(self) -> None:
        """Close after every byte written has gone: the end of a body framed by the close."""
        self.writer.close()
        await self.writer.wait_closed()

    def reset(self) -> None:
        """Reset the connection (RST, not FIN): an upstream that died mid-response."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Conn], Awaitable[None]]


@dataclass
class ScriptedUpstream:
    """A real TCP server whose every connection runs `script`; counts connections and requests."""

    script: Script
    port: int = 0
    connections: int = 0
    dropped: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = Conn(self.connections, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            self.tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):  # hanging connections end here
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
