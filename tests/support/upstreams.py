"""The upstreams tests put the sidecar in front of: the example backend, and a scriptable origin."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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
