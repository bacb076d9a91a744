"""`rate_limit`: a token bucket per key (client address, API key header, or the whole route);
an empty bucket answers 429 before the request goes anywhere.

Every answer carries the draft-ietf-httpapi-ratelimit-headers-07 fields (`RateLimit-Policy`,
`RateLimit`); a 429 adds `Retry-After`. Cluster scope keeps the buckets in Redis, one script
call per request; while Redis is down (or a call fails) the same buckets are kept in this
worker instead, so requests never fail for Redis's sake, and Redis takes over again when the
health check sees it back. See docs/resilience.md.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING

from ..core.ratelimit import (
    BucketMap,
    Decision,
    policy_field,
    ratelimit_field,
    retry_after,
)
from ..errors import RateLimitedError
from ..pipeline import Handler, ProxyRequest, ProxyResponse
from ..stores.boundary import StoreUnavailable
from ..stores.dedup import DedupService
from ..stores.ratelimit import RateLimitStore

if TYPE_CHECKING:
    from ..config import RateLimitConfig

log = logging.getLogger("sidecar.ratelimit")

# Longer keys (a forwarded address is client-supplied text) are hashed to bound memory and
# Redis key size.
MAX_KEY_LENGTH = 64
_OURS = frozenset({b"ratelimit", b"ratelimit-policy"})
_OUR_LENGTHS = frozenset(len(name) for name in _OURS)  # skips lower() for most names


class RateLimitPolicy:
    def __init__(self, route: str, config: RateLimitConfig, service: DedupService) -> None:
        self.route = route
        self.config = config
        self.service = service
        self.rate = config.rate
        self.burst = config.burst
        self.cluster = config.scope == "cluster"
        self.by_route = config.key == "route"
        self.header = config.key[len("header:"):] if config.key.startswith("header:") else None
        self.local = BucketMap(config.rate, config.burst)
        self.policy = policy_field(config.rate, config.burst)
        self._policy_bytes = self.policy.encode()
        self.counts = service.counts
        self._limited = (route, "rate_limited")
        self._fallback = (route, "rate_limit_local_fallback")
        self._store: RateLimitStore | None = None
        self._local_fallback = False  # warn once per Redis outage, not once per request

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if self.cluster:
            decision = await self._take_shared(self.key(request))
        else:
            decision = self.local.take(self.key(request), time.monotonic())
        if not decision.allowed:
            self.counts[self._limited] += 1
            raise RateLimitedError(
                f"too many requests for route {self.route!r}: at most {self.burst} at once, "
                f"refilled at {self.rate:g}/s; retry in {retry_after(decision)}s",
                headers={"Retry-After": str(retry_after(decision)),
                         "RateLimit-Policy": self.policy,
                         "RateLimit": ratelimit_field(decision)})
        response = await call_next(request)
        self._annotate(response, decision)
        return response

    def key(self, request: ProxyRequest) -> str:
        """The bucket's key: namespaced so an API key can never share a client's bucket. Header
        values are hashed: API keys are secrets, and they end up as Redis keys."""
        if self.by_route:
            return "route"
        if self.header is not None:
            value = request.head.headers.get(self.header)
            if value:
                digest = hashlib.blake2b(value.encode("utf-8", "surrogateescape"),
                                         digest_size=16).hexdigest()
                return "h:" + digest
        address = client_address(request)
        if len(address) > MAX_KEY_LENGTH:
            address = hashlib.blake2b(address.encode("utf-8", "surrogateescape"),
                                      digest_size=16).hexdigest()
        return "ip:" + address

    async def _take_shared(self, key: str) -> Decision:
        """Cluster scope: Redis's bucket, or this worker's while Redis cannot answer."""
        store = self._current_store()
        if store is not None:
            try:
                decision = await store.take(self.route, key, self.rate, self.burst)
            except StoreUnavailable as exc:
                self.service.redis_failed(exc)
                self._fall_back(exc)
            else:
                if self._local_fallback:
                    self._local_fallback = False
                    log.info("rate limits shared through redis again",
                             extra={"route": self.route})
                return decision
        else:
            self._fall_back(None)
        self.counts[self._fallback] += 1
        return self.local.take(key, time.monotonic())

    def _current_store(self) -> RateLimitStore | None:
        client = self.service.redis
        if client is None or not self.service.redis_up:
            return None
        store = self._store
        if store is None or store.client is not client:
            store = self._store = RateLimitStore(client)
        return store

    def _fall_back(self, exc: BaseException | None) -> None:
        if not self._local_fallback:
            self._local_fallback = True
            log.warning("redis unavailable; cluster rate limits are kept per worker until it "
                        "returns", extra={"route": self.route,
                                          "error": (str(exc) or type(exc).__name__)
                                          if exc is not None else "redis down"})

    def _annotate(self, response: ProxyResponse, decision: Decision) -> None:
        """Add this limit's fields; the upstream's own (another limit, further in) are dropped
        so a client never reads two conflicting `RateLimit` fields."""
        value = ratelimit_field(decision).encode()
        headers = response.headers
        for name, _ in headers:
            if len(name) in _OUR_LENGTHS and name.lower() in _OURS:
                headers = response.headers = [(n, v) for n, v in headers
                                              if n.lower() not in _OURS]
                response.wire = None
                break
        headers.append((b"RateLimit-Policy", self._policy_bytes))
        headers.append((b"RateLimit", value))
        if response.wire is not None:
            response.wire += b"RateLimit-Policy: " + self._policy_bytes + b"\r\nRateLimit: " \
                + value + b"\r\n"

    def __repr__(self) -> str:
        return (f"<RateLimitPolicy {self.route} key={self.config.key} "
                f"scope={self.config.scope} {self.policy}>")


def client_address(request: ProxyRequest) -> str:
    """The TCP peer; the first X-Forwarded-For address only when server.trust_forwarded says
    a proxy in front of the sidecar sets it."""
    head = request.head
    if request.route.trust_forwarded:
        forwarded = head.headers.get("X-Forwarded-For")
        if forwarded:
            first = forwarded.split(",", 1)[0].strip()
            if first:
                return first
    return head.client
