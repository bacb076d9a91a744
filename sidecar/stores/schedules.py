"""Which tick of each schedule was claimed and by whom, and how its last run went: the Redis
state that makes a tick run once across the cluster and survive restarts.

One hash per schedule, `sidecar:schedule:{name}`:
  tick       the newest tick claimed (Unix ms): a worker that claims a tick first checks that
             it is newer than this, in one script, so two workers never both claim it
  done       the newest tick whose run finished (or was skipped)
  holder     the worker running `tick`, until `lease` (Redis's clock, ms): a tick claimed but
             not done when its lease ran out (its worker died) is claimed again
  begun      when the last run of any kind began (ms): on_start runs only if it is a period old
  last_*     the last run's trigger, start and end times, outcome and per-request statuses
  runs, skipped   counts

Leases are on Redis's clock (TIME), so workers whose clocks disagree agree on them; ticks are
on each worker's clock, which only needs to be right to within the grace (core/schedule.py).
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from .boundary import redis_boundary

PREFIX = "sidecar:schedule:"

# KEYS[1] the hash; ARGV tick (ms), lease (ms), holder. Returns {code, previous tick or -1}:
# 1 claimed a new tick, 2 claimed again a tick whose worker's lease ran out, 0 nothing to do.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tick = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'tick', 'done', 'lease')
local claimed = tonumber(state[1])
local done = tonumber(state[2]) or -1
local lease = tonumber(state[3]) or 0
if claimed == nil or tick > claimed then
  redis.call('HSET', KEYS[1], 'tick', ARGV[1], 'holder', ARGV[3],
             'lease', now + tonumber(ARGV[2]))
  return {1, claimed or -1}
end
if tick == claimed and done < claimed and lease < now then
  redis.call('HSET', KEYS[1], 'holder', ARGV[3], 'lease', now + tonumber(ARGV[2]))
  return {2, claimed}
end
return {0, claimed}
"""

# KEYS[1]; ARGV tick, holder, lease (ms). 1 when the lease was renewed, 0 when the tick is no
# longer this worker's (a newer tick was claimed, or its lease had run out and another took it).
_RENEW = """
local state = redis.call('HMGET', KEYS[1], 'tick', 'holder')
if state[1] ~= ARGV[1] or state[2] ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[3]))
return 1
"""

# KEYS[1]; ARGV minimum gap (ms). 1 when no run began in the last `gap` ms, and marks one
# begun now: the on_start run of workers starting together happens once.
_BEGIN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local begun = tonumber(redis.call('HGET', KEYS[1], 'begun'))
if begun ~= nil and now - begun < tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'begun', now)
return 1
"""

# KEYS[1]; ARGV tick ('' for a run that is not a tick's), holder, trigger, outcome, started
# (ms), detail (JSON). Marks the tick done when it is still this worker's; records the run
# (outcome 'new': a tick that fell before the schedule existed, only marked done).
_FINISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  local state = redis.call('HMGET', KEYS[1], 'tick', 'holder')
  if state[1] == ARGV[1] and state[2] == ARGV[2] then
    redis.call('HSET', KEYS[1], 'done', ARGV[1], 'lease', 0)
  end
end
if ARGV[4] == 'new' then return 1 end  -- a tick before the schedule existed: not a run
if ARGV[4] == 'skipped' then
  redis.call('HINCRBY', KEYS[1], 'skipped', 1)
  redis.call('HSET', KEYS[1], 'last_skipped', ARGV[1])
  return 1
end
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('HSET', KEYS[1], 'last_trigger', ARGV[3], 'last_outcome', ARGV[4],
           'last_started', ARGV[5], 'last_finished', now, 'last_detail', ARGV[6],
           'last_tick', ARGV[1])
return 1
"""


@redis_boundary
class ScheduleStore:
    """The schedules' state, on a client the caller owns. Raises what redis-py raises."""

    def __init__(self, client: aioredis.Redis, prefix: str = PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._claim: Any = client.register_script(_CLAIM)
        self._renew: Any = client.register_script(_RENEW)
        self._begin: Any = client.register_script(_BEGIN)
        self._finish: Any = client.register_script(_FINISH)

    def key(self, name: str) -> str:
        return self.prefix + name

    async def claim(self, name: str, tick: float, lease: float,
                    holder: str) -> tuple[int, float | None]:
        """(1 new | 2 again | 0 nothing, the tick claimed before, in seconds, or None)."""
        code, previous = await self._claim(keys=[self.key(name)],
                                           args=[_ms(tick), _ms(lease), holder])
        previous = int(previous)
        return int(code), (None if previous < 0 else previous / 1000)

    async def renew(self, name: str, tick: float, holder: str, lease: float) -> bool:
        return int(await self._renew(keys=[self.key(name)],
                                     args=[_ms(tick), holder, _ms(lease)])) == 1

    async def begin(self, name: str, gap: float) -> bool:
        return int(await self._begin(keys=[self.key(name)], args=[_ms(gap)])) == 1

    async def finish(self, name: str, tick: float | None, holder: str, trigger: str,
                     outcome: str, started: float, detail: list[dict[str, Any]]) -> None:
        await self._finish(keys=[self.key(name)], args=[
            "" if tick is None else _ms(tick), holder, trigger, outcome, _ms(started),
            orjson.dumps(detail)])

    async def count_skipped(self, name: str, count: int) -> None:
        """Ticks that fell while nobody ran the schedule (`missed: skip`), counted."""
        await self.client.hincrby(self.key(name), "skipped", count)  # type: ignore[misc]

    async def state(self, name: str) -> dict[str, Any]:
        """What /admin/schedules shows of a schedule's runs (times in Unix seconds)."""
        raw = await self.client.hgetall(self.key(name))  # type: ignore[misc]
        fields = {k.decode(): v.decode() for k, v in raw.items()}

        def seconds(field: str) -> float | None:
            value = fields.get(field)
            return int(value) / 1000 if value not in (None, "", "0") else None

        last: dict[str, Any] | None = None
        if "last_outcome" in fields:
            last = {"trigger": fields.get("last_trigger"), "tick": seconds("last_tick"),
                    "started": seconds("last_started"), "finished": seconds("last_finished"),
                    "outcome": fields["last_outcome"],
                    "requests": orjson.loads(fields.get("last_detail") or "[]")}
        return {"last_tick": seconds("tick"), "last_done": seconds("done"),
                "runs": int(fields.get("runs", 0)), "skipped": int(fields.get("skipped", 0)),
                "last_run": last}


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
