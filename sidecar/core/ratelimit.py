"""Token buckets, with time passed in: the decisions behind the `rate_limit` policy.

A bucket holds up to `burst` tokens and gains `rate` tokens a second; a request takes one or is
refused. The same arithmetic runs in Redis for cluster scope (stores/ratelimit.py), which hands
its result to `decide`, so both scopes answer clients with identical numbers.

The response fields follow draft-ietf-httpapi-ratelimit-headers-07: `RateLimit-Policy:
<burst>;w=<seconds>` and `RateLimit: limit=<burst>, remaining=<n>, reset=<seconds>`, where reset
is the time until the bucket is full again.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# Refills are sums of float products: 0.1 s at 10/s may come out a hair under one token.
EPSILON = 1e-9
# Past this many keys a map sheds buckets down to three quarters of it (see BucketMap).
DEFAULT_MAX_KEYS = 50_000


class Decision(NamedTuple):
    """What one take decided; a tuple because one is built per request."""

    allowed: bool
    limit: int  # the burst: what a full bucket holds
    remaining: int  # whole tokens left after this request
    retry_after: float  # seconds until one request would be allowed; 0.0 when allowed
    reset: float  # seconds until the bucket is full again


def decide(allowed: bool, tokens: float, rate: float, burst: int) -> Decision:
    """The decision for a bucket left holding `tokens` by a take (or a refusal)."""
    if tokens < 0.0:
        tokens = 0.0
    elif tokens > burst:
        tokens = float(burst)
    return Decision(allowed, burst, int(tokens + EPSILON),
                    0.0 if allowed else max(0.0, 1.0 - tokens) / rate,
                    (burst - tokens) / rate)


class TokenBucket:
    """One key's bucket; starts full. `now` is any monotonic clock, in seconds."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp: float | None = None  # when `tokens` was last brought up to date

    def level(self, now: float) -> float:
        """Tokens held at `now`. A clock that steps back refills nothing rather than failing."""
        if self.stamp is None:
            return self.tokens
        return min(float(self.burst), self.tokens + max(0.0, now - self.stamp) * self.rate)

    def take(self, now: float) -> Decision:
        # level(), inlined: this runs once per request.
        tokens = self.tokens
        stamp = self.stamp
        if stamp is not None and now > stamp:
            tokens += (now - stamp) * self.rate
            if tokens > self.burst:
                tokens = float(self.burst)
        allowed = tokens >= 1.0 - EPSILON
        if allowed:
            tokens = tokens - 1.0 if tokens > 1.0 else 0.0
        self.tokens = tokens
        self.stamp = now
        return decide(allowed, tokens, self.rate, self.burst)

    def full_at(self) -> float:
        """When the bucket is full again, and so no different from a new one."""
        if self.stamp is None:
            return -math.inf
        return self.stamp + (self.burst - self.tokens) / self.rate

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.3f}/{self.burst} rate={self.rate:g}/s>"


class BucketMap:
    """Buckets per key (client address, API key) with bounded memory.

    A full bucket is the same as no bucket, so it can be forgotten without changing a decision.
    When the map reaches `max_keys` it drops every full bucket; if that is not enough (more keys
    active at once than the bound), it also drops those that will be full soonest, down to three
    quarters of the bound: they lose least, and the heaviest users keep their empty buckets.
    Shedding costs one sort every quarter-bound of new keys, O(log n) per new key amortized.
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        TokenBucket(rate, burst)  # validates rate and burst once, here
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> Decision:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self.shed(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(now)

    def shed(self, now: float) -> None:
        """Forget every full bucket, then the soonest-full ones past three quarters of the
        bound."""
        keep = self.max_keys * 3 // 4
        by_full = sorted(self._buckets.items(), key=lambda item: item[1].full_at())
        excess = len(by_full) - keep
        for index, (key, bucket) in enumerate(by_full):
            if index >= excess and bucket.full_at() > now:
                break
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def __repr__(self) -> str:
        return f"<BucketMap keys={len(self._buckets)}/{self.max_keys} rate={self.rate:g}/s " \
               f"burst={self.burst}>"


# -- response fields (draft-ietf-httpapi-ratelimit-headers-07) ----------------------------------


def policy_field(rate: float, burst: int) -> str:
    """`RateLimit-Policy`: the quota and the window it refills in (whole seconds, at least 1)."""
    return f"{burst};w={max(1, _whole_seconds(burst / rate))}"


def ratelimit_field(decision: Decision) -> str:
    """`RateLimit`: the quota, what is left of it, and the seconds until it is whole again."""
    return (f"limit={decision.limit}, remaining={decision.remaining}, "
            f"reset={_whole_seconds(decision.reset)}")


def retry_after(decision: Decision) -> int:
    """`Retry-After` for a refusal: whole seconds, rounded up, at least 1."""
    return max(1, _whole_seconds(decision.retry_after))


def _whole_seconds(seconds: float) -> int:
    # Round up, but not for float noise: 1.0000000002 s is 1 s.
    return max(0, math.ceil(seconds - 1e-6))
