"""`retry`: an upstream that fails now and then should not fail the client's request.

An attempt that ends in an outcome named by `retry.on` (a refused connection, a timeout, a
502/503/504) is tried again, up to `attempts` more times, after a jittered exponential backoff,
while the route's retry budget allows (sidecar/core/retry.py decides all of this). Never retried:
unsafe methods without an idempotency key, and request bodies that were streamed to the
upstream, since they cannot be sent again. The budget is per route and per worker, and starts
afresh when a config reload builds new policies.

The policy sits just outside the upstream call, inside the breaker and cache/dedup: a breaker
counts the final outcome, a dedup flight waits for the retries. See docs/resilience.md.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.retry import IDEMPOTENT_METHODS, RetryBudget, RetryOn, backoff_delay
from ..errors import UpstreamConnectError, UpstreamError, UpstreamTimeoutError
from ..pipeline import Handler, ProxyRequest, ProxyResponse

if TYPE_CHECKING:
    from ..config import RetryConfig

DEFAULT_KEY_HEADER = "Idempotency-Key"


class RetryPolicy:
    def __init__(self, route: str, config: RetryConfig, counts: Counter[tuple[str, str]], *,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        self.route = route
        self.config = config
        self.counts = counts
        self.on = RetryOn.parse(config.on)
        self.budget = RetryBudget(config.budget)
        self.clock = clock
        self.rand = rand
        self._events = {e: (route, e) for e in (
            "retry", "retry_budget_exhausted", "retry_gave_up", "retry_skipped_body")}

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        # Every request counts as traffic that earns budget, retryable or not.
        self.budget.record_request(self.clock())
        if request.method not in IDEMPOTENT_METHODS and not _has_key(request):
            return await call_next(request)
        retries = 0
        while True:
            failure: UpstreamError | None = None
            response: ProxyResponse | None = None
            try:
                response = await call_next(request)
            except UpstreamError as exc:
                if not self.on.error(_error_kind(exc)):
                    raise
                failure = exc
            else:
                if not self.on.status(response.status):
                    return response
            if not self._may_retry(request, retries):
                if failure is not None:
                    raise failure
                assert response is not None
                return response
            # Only status and headers have arrived: the edge has written nothing to the client
            # yet (it does once this policy returns), so the client cannot have seen a byte of
            # this response and a retry is still invisible to it. Drop the unread body first;
            # a whole one is simply let go.
            if response is not None and response.body is None and response.stream is not None:
                response.stream.close()
            retries += 1
            self.counts[self._events["retry"]] += 1
            await asyncio.sleep(backoff_delay(retries, base=self.config.backoff,
                                              cap=self.config.max_backoff, rand=self.rand))

    def _may_retry(self, request: ProxyRequest, retries: int) -> bool:
        """After a retryable outcome: is there an attempt left that may be spent?"""
        body = request.body
        if body is not None and not isinstance(body, bytes):
            # A streamed upload has gone to the upstream chunk by chunk: nothing to send again.
            self.counts[self._events["retry_skipped_body"]] += 1
            return False
        if retries >= self.config.attempts:
            self.counts[self._events["retry_gave_up"]] += 1
            return False
        if not self.budget.try_spend(self.clock()):
            self.counts[self._events["retry_budget_exhausted"]] += 1
            return False
        return True

    def __repr__(self) -> str:
        return f"<RetryPolicy {self.route} attempts={self.config.attempts} {self.budget!r}>"


def _has_key(request: ProxyRequest) -> bool:
    idempotency = request.route.config.idempotency
    header = idempotency.header if idempotency is not None else DEFAULT_KEY_HEADER
    return bool(request.head.headers.get(header))


def _error_kind(exc: UpstreamError) -> str | None:
    """The `retry.on` name of a failure. A protocol error (a garbled response) or a busy pool
    has none: retrying the first rarely helps, retrying the second adds load where there is
    too much already."""
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    return None
