"""Token buckets shared by every instance through Redis: one EVALSHA per request.

The script refills by the time elapsed on Redis's own clock (`TIME`), so instances whose clocks
disagree still agree on a bucket. A bucket is a hash (`t` tokens, `s` stamp in microseconds)
that expires when it would be full again: an expired bucket and a full one are the same thing,
and idle keys cost no memory. A refusal writes nothing, so a flood of refused requests costs
Redis reads only. Needs Redis 5 or later (writes after `TIME` in a script).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from ..core.ratelimit import Decision, decide
from .boundary import redis_boundary

PREFIX = "sidecar:ratelimit:"

# KEYS[1] bucket; ARGV rate (tokens/s), burst. Returns {allowed 0|1, tokens left as a string}:
# Lua numbers come back from Redis truncated to integers.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = burst
elseif now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) / 1000000 * rate)
else
  tokens = math.min(burst, tokens)
end
if tokens < 1 - 1e-9 then
  return {0, string.format('%.17g', tokens)}
end
tokens = math.max(0, tokens - 1)
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((burst - tokens) / rate * 1000)))
return {1, string.format('%.17g', tokens)}
"""


@redis_boundary
class RateLimitStore:
    """The cluster's buckets, on a client the caller owns (and watches for outages)."""

    def __init__(self, client: aioredis.Redis, prefix: str = PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._take: Any = client.register_script(_TAKE)

    async def take(self, route: str, key: str, rate: float, burst: int) -> Decision:
        """Take a token from `route`'s bucket for `key`. Raises what redis-py raises."""
        allowed, tokens = await self._take(keys=[self.prefix + route + ":" + key],
                                           args=[repr(rate), burst])
        return decide(allowed == 1, float(tokens), rate, burst)

    def __repr__(self) -> str:
        return f"<RateLimitStore prefix={self.prefix!r}>"
