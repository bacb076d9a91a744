"""`breaker`: stop sending to an upstream that keeps failing, answer at once meanwhile.

While the breaker is open the request fails fast with 503 `breaker_open` (JSON naming the
upstream, `Retry-After`), or, with `fallback: stale`, the cache policy outside this one answers
with a stale entry when it has one (`Cache-Status: sidecar; fwd=stale; detail=breaker-open`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from ..pipeline import Handler, ProxyRequest, ProxyResponse

if TYPE_CHECKING:
    from ..config import BreakerConfig
    from ..stores.breakers import BreakerService


class BreakerOpenError(UpstreamError):
    status = 503
    code = "breaker_open"

    def __init__(self, upstream: str, breaker: str, retry_after: float, *,
                 serve_stale: bool) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(upstream, f"the circuit breaker {breaker} of upstream {upstream!r} is "
                                   f"open after repeated failures; retry in {seconds}s",
                         headers={"Retry-After": str(seconds)})
        self.serve_stale = serve_stale  # the cache may answer with a stale entry instead


class BreakerPolicy:
    def __init__(self, name: str, upstream: str, config: BreakerConfig,
                 service: BreakerService) -> None:
        self.name = name
        self.upstream = upstream
        self.breaker = service.breaker(name, failures=config.failures, reset=config.reset,
                                       half_open_trials=config.half_open_trials,
                                       cluster=config.scope == "cluster")
        self.failure_on = frozenset(config.failure_on)
        self.exclude = frozenset(config.exclude_status)
        self.serve_stale = config.fallback == "stale"
        self.counts = service.counts
        self.service = service  # its clock: the time the breaker's reset is measured in

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        breaker = self.breaker
        clock = self.service.clock
        now = clock()
        if not breaker.allow(now):
            self.counts[(self.name, "rejected")] += 1
            raise BreakerOpenError(self.upstream, self.name, breaker.retry_after(now),
                                   serve_stale=self.serve_stale)
        generation = breaker.transitions
        try:
            response = await call_next(request)
        except UpstreamTimeoutError:
            self._report("timeout", generation)
            raise
        except UpstreamConnectError:
            self._report("connect", generation)
            raise
        except UpstreamUnavailableError:
            # this worker's pool is full: not the upstream's fault
            breaker.ignored(clock(), generation)
            raise
        except UpstreamError:
            self._report("5xx", generation)  # an invalid response
            raise
        except BaseException:
            breaker.ignored(clock(), generation)
            raise
        status = response.status
        if status >= 500:
            if status in self.exclude:
                breaker.ignored(clock(), generation)
            else:
                self._report("5xx", generation)
        else:
            breaker.success(clock(), generation)
        return response

    def _report(self, kind: str, generation: int) -> None:
        now = self.service.clock()
        if kind in self.failure_on:
            self.breaker.failure(now, generation)
        else:
            self.breaker.ignored(now, generation)
