"""An upstream of several servers (`upstreams.<name>.servers`): a keep-alive pool per server
(upstream.UpstreamPool), one chosen per request, servers that fail left out for a while.

What the rest of the sidecar sees is one upstream: the same `request()` as a single pool, and
errors named after the upstream, so breakers and retries judge it as a whole. A retry still
lands elsewhere: a server that failed in the last second is chosen only when every other has
too (round robin would mostly move on anyway; least requests would not, a failed server
having nothing in flight).

- **Balance**: `round_robin` takes the servers in turn; `least_requests` the one with the
  fewest requests in flight from this worker (ties in turn).
- **Passive ejection**: `eject.failures` failures in a row (no answer, or 502, 503, 504) take a
  server out for `eject.backoff`. With health checks, it comes back when they pass, not before.
- **Active health checks** (`health:`): every `interval`, each server gets `GET <path>`;
  `unhealthy` failures in a row take it out, `healthy` passes in a row bring it back. Each
  worker checks for itself (a few requests a second at most: no coordination is worth it).
- With every server out, requests still go to one (the one out the longest): an upstream that
  is down answers with errors, not with the sidecar refusing to try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import UpstreamError
from .upstream import Body, Interim, UpstreamPool, UpstreamResponse

if TYPE_CHECKING:
    from .config import UpstreamConfig

log = logging.getLogger("sidecar.upstream")

RECENT_FAILURE = 1.0  # seconds a failed server is passed over while others have not failed
_FAILING_STATUS = frozenset({502, 503, 504})


class Upstream(Protocol):
    """What callers need of an upstream: one pool, or several servers balanced."""

    name: str
    config: UpstreamConfig

    async def request(self, head: bytes, body: Body = None, chunked: bool = False,
                      timeout: float | None = None, is_head: bool = False,
                      upgrade: bool = False, interim: Interim | None = None,
                      ) -> UpstreamResponse: ...

    async def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


def make_upstream(name: str, config: UpstreamConfig) -> Upstream:
    return BalancedPool(name, config) if config.servers else UpstreamPool(name, config)


class Server:
    """One server of a balanced upstream, and what is known of its health."""

    def __init__(self, name: str, url: str, config: UpstreamConfig) -> None:
        self.url = url
        self.pool = UpstreamPool(name, config.model_copy(update={"url": url, "servers": []}))
        self.inflight = 0
        self.requests = 0
        self.failures = 0  # in a row
        self.failed_at = 0.0  # monotonic; 0: never
        self.out_until = 0.0  # ejected until then (monotonic); inf: until health checks pass
        self.checks_passed = 0  # in a row
        self.checks_failed = 0  # in a row
        self.ejections = 0

    def available(self, now: float) -> bool:
        return now >= self.out_until

    def failed_recently(self, now: float) -> bool:
        """A failure in the last RECENT_FAILURE seconds that no ejection has paid for (a
        server back from its back-off is as good as the others)."""
        return now - self.failed_at < RECENT_FAILURE and self.out_until <= self.failed_at

    def view(self, now: float) -> dict[str, Any]:
        out = self.out_until
        return {"url": self.url, "healthy": self.available(now), "inflight": self.inflight,
                "requests": self.requests, "failures_in_a_row": self.failures,
                "ejections": self.ejections,
                "back_in_s": None if now >= out else (None if out == float("inf")
                                                      else round(out - now, 1)),
                **self.pool.stats()}


class BalancedPool:
    def __init__(self, name: str, config: UpstreamConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.servers = [Server(name, url, config) for url in config.servers]
        self._next = 0
        self._checks: list[asyncio.Task[None]] = []
        if config.health is not None:
            loop = asyncio.get_running_loop()
            self._checks = [loop.create_task(self._check(server), name=f"health-{server.url}")
                            for server in self.servers]

    # -- choosing -------------------------------------------------------------------------------

    def choose(self) -> Server:
        now = self.clock()
        servers = self.servers
        count = len(servers)
        start = self._next
        candidates = [servers[(start + i) % count] for i in range(count)]
        up = [s for s in candidates if s.available(now)]
        if not up:  # all out: the one out the longest
            chosen = min(candidates, key=lambda s: (s.out_until, s.failed_at))
        else:
            fresh = [s for s in up if not s.failed_recently(now)] or up
            if self.config.balance == "least_requests":
                chosen = min(fresh, key=lambda s: s.inflight)  # min keeps the first of ties
            else:
                chosen = fresh[0]
        # The turn goes on from the one chosen: with a server out, the others still share
        # evenly (moving on by one would give its turns to the server after it).
        self._next = (servers.index(chosen) + 1) % count
        return chosen

    async def request(self, head: bytes, body: Body = None, chunked: bool = False,
                      timeout: float | None = None, is_head: bool = False,
                      upgrade: bool = False, interim: Interim | None = None,
                      ) -> UpstreamResponse:
        server = self.choose()
        server.inflight += 1
        server.requests += 1
        try:
            response = await server.pool.request(head, body, chunked, timeout, is_head,
                                                 upgrade, interim)
        except UpstreamError:
            self._failed(server)
            raise
        finally:
            server.inflight -= 1
        if response.status in _FAILING_STATUS:
            self._failed(server)
        else:
            server.failures = 0
        return response

    def _failed(self, server: Server) -> None:
        now = self.clock()
        server.failures += 1
        server.failed_at = now
        eject = self.config.eject
        if server.failures >= eject.failures and server.available(now):
            self._eject(server, now, f"{server.failures} failures in a row")

    def _eject(self, server: Server, now: float, reason: str) -> None:
        # With health checks, it is back when they pass; else after the back-off.
        server.out_until = (float("inf") if self.config.health is not None
                            else now + self.config.eject.backoff)
        server.ejections += 1
        server.checks_passed = 0
        log.warning("upstream server taken out", extra={
            "upstream": self.name, "server": server.url, "reason": reason,
            "back_in": "when its health checks pass" if self.config.health is not None
            else f"{self.config.eject.backoff:g}s"})

    # -- health checks --------------------------------------------------------------------------

    async def _check(self, server: Server) -> None:
        health = self.config.health
        assert health is not None
        netloc = server.pool.config.netloc
        head = (f"GET {health.path} HTTP/1.1\r\nHost: {netloc}\r\n"
                "User-Agent: sidecar-health-check\r\n\r\n").encode("latin-1")
        while True:
            passed = await self._probe(server, head, health.timeout)
            now = self.clock()
            if passed:
                server.checks_failed = 0
                server.checks_passed += 1
                if not server.available(now) and server.checks_passed >= health.healthy:
                    server.out_until = 0.0
                    server.failures = 0
                    server.failed_at = 0.0
                    log.info("upstream server back in", extra={
                        "upstream": self.name, "server": server.url,
                        "checks_passed": server.checks_passed})
            else:
                server.checks_passed = 0
                server.checks_failed += 1
                if server.available(now) and server.checks_failed >= health.unhealthy:
                    self._eject(server, now, f"{server.checks_failed} health checks failed")
            await asyncio.sleep(health.interval)

    @staticmethod
    async def _probe(server: Server, head: bytes, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                response = await server.pool.request(head, None, timeout=timeout)
                while await response.read():
                    pass
        except (UpstreamError, TimeoutError, OSError):
            return False
        return 200 <= response.status < 400

    # -- the rest of the pool's interface -------------------------------------------------------

    async def close(self) -> None:
        for task in self._checks:
            task.cancel()
        for task in self._checks:
            with contextlib.suppress(BaseException):
                await task
        for server in self.servers:
            await server.pool.close()

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        views = [server.view(now) for server in self.servers]
        return {"open": sum(v["open"] for v in views), "idle": sum(v["idle"] for v in views),
                "waiting": sum(v["waiting"] for v in views), "balance": self.config.balance,
                "servers": views}

    def __repr__(self) -> str:
        return f"<BalancedPool {self.name} servers={len(self.servers)}>"
