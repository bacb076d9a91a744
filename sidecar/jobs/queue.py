"""The job queue's Redis side: saq queues (one per priority of each configured queue), the
request bodies, results and progress kept beside saq's records, the cluster-wide concurrency
slots, and a wake-up channel.

saq (docs/jobs.md says why it was chosen) owns each job's record, status, attempts, retries
with backoff, timeouts, aborts and the sweep that re-queues a job whose worker died. What it
does not do on Redis is written here, each for a reason:
- priorities: a saq Redis queue is one FIFO list, so each priority is its own saq queue (a
  "lane") and workers poll lanes lowest priority first;
- a concurrency limit across processes: a sorted set of leased slots, taken with the job
  (`_TAKE`), given back with its success (`_COMPLETE`);
- progress: saq's `Job.update` rewrites the whole record from the worker's copy, so a progress
  report written by another process (the admin listener that received it) would be undone by
  the worker's next heartbeat; progress lives in its own hash instead;
- bodies and results: bytes, kept out of the JSON record so a status poll never reads them;
- callbacks owed (jobs/callbacks.py sends them): a sorted set of job ids by when a delivery is
  due, written when the job is queued, so that a worker dying between a job's end and its
  callback loses nothing; any process takes due entries under a lease (`_CLAIM`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis.asyncio as aioredis
from saq.job import ABORT_ID_PREFIX, Job, Status
from saq.queue.redis import RedisQueue

from ..core.jobs import (
    DURATION_BUCKETS,
    SWEPT_ERROR,
    JobId,
    duration_bucket,
    iso_time,
    lane,
)
from ..crypto import Sealer
from ..stores.batching import ScriptBatcher
from ..stores.boundary import redis_boundary, within
from ..stores.dedup import SharedResult
from ..stores.subscriber import Bus, Subscriber

if TYPE_CHECKING:
    from ..config import OffloadConfig, WindowRate

log = logging.getLogger("sidecar.jobs")

PREFIX = "sidecar:jobs:"
WAKE_CHANNEL = PREFIX + "wake"
PAUSED = PREFIX + "paused"  # the set of paused queues: no job of theirs starts
CALLBACKS = PREFIX + "callbacks"  # zset: job id -> when its callback is due (ms, Redis's clock)
CALLBACK_TRIES = PREFIX + "callbacks:tries"  # hash: job id -> deliveries tried
CALLBACK_ROUTES = PREFIX + "callbacks:routes"  # hash: job id -> its route, while one is owed
CALLBACK_COUNTS = PREFIX + "callbacks:counts"  # hash: "<route>:<outcome>" -> deliveries
REPLAY = "replay"  # the one job function: replay a request to its upstream
CANCELLED_BY_CLIENT = "cancelled by the client"
CANCELLED_BY_OPERATOR = "cancelled by an operator"
# Status lookups, enqueues and aborts all share saq's per-queue semaphore: the process serving
# the status endpoints needs more than saq's default of 20.
MAX_CONCURRENT_OPS = 500

# KEYS[1] slots; ARGV lease ms, tokens...: extend the leases this worker still holds.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 1
"""


# The three steps of a job's run each take one round trip: its enqueue (`_ENQUEUE`), its start
# (`_TAKE`) and its success (`_COMPLETE`). Each does in one script what saq and the side keys
# did in nine round trips (docs/jobs.md, "Where a job's time goes"). The record stays saq's (a
# JSON string, `saq:job:<lane>:<id>`, its status published on the same key as saq does), so
# that saq's reads, aborts, retries and sweep keep working on it.

# KEYS[1] the lane's unfinished jobs, KEYS[2] the record, KEYS[3] the lane's queued list,
# KEYS[4] the abort key, KEYS[5] body, KEYS[6] the queue's lanes, KEYS[7..9] callbacks owed,
# tries, routes; ARGV record, scheduled (0: now), body ('' with ARGV[4] 0: none), has body,
# body ttl (s), priority, owes a callback, its first delay (ms), route, job key, wake channel,
# lane name, max queued (0: no bound), lane key prefix and suffix (`<prefix><priority><suffix>`
# is a lane's queued list). Returns 1 queued, 0 the id taken, -1 the queue full (max_queued,
# counted in the same step: exact, where two checks and an enqueue let bursts past it).
# A hand-off besides (JobRunner.hand_off): KEYS[10] the queue's slots, KEYS[11] paused queues,
# KEYS[12] its recent starts, KEYS[13] the lane's active list; ARGV[16] the idle loop's slot
# token ('' for none), slot limit, lease (ms), rate count, rate period (ms), worker id, queue.
# Returns {the record, marked active} when the job was handed to that loop.
_ENQUEUE = """
if redis.call('ZSCORE', KEYS[1], KEYS[2]) or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local most = tonumber(ARGV[13])
if most > 0 then
  local waiting = 0
  for _, p in ipairs(redis.call('SMEMBERS', KEYS[6])) do
    waiting = waiting + redis.call('LLEN', ARGV[14] .. p .. ARGV[15])
  end
  if waiting >= most then return -1 end
end
if ARGV[7] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[7], now + tonumber(ARGV[8]), ARGV[10])
  redis.call('HDEL', KEYS[8], ARGV[10])
  redis.call('HSET', KEYS[9], ARGV[10], ARGV[9])
end
if ARGV[4] == '1' then redis.call('SET', KEYS[5], ARGV[3], 'EX', tonumber(ARGV[5])) end
redis.call('SADD', KEYS[6], ARGV[6])
redis.call('ZADD', KEYS[1], ARGV[2], KEYS[2])
if ARGV[2] ~= '0' then
  redis.call('SET', KEYS[2], ARGV[1])
  return 1
end
if ARGV[16] ~= '' and redis.call('SISMEMBER', KEYS[11], ARGV[22]) == 0 then
  -- handed to a loop of this process (JobRunner.hand_off), as _TAKE would take it, when
  -- nothing else waits in the queue (no job jumps the line), the rate allows and a slot is free
  local waiting = 0
  for _, p in ipairs(redis.call('SMEMBERS', KEYS[6])) do
    waiting = waiting + redis.call('LLEN', ARGV[14] .. p .. ARGV[15])
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local rate, period = tonumber(ARGV[19]), tonumber(ARGV[20])
  local room = waiting == 0
  if room and rate > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[12], '-inf', now - period)
    room = redis.call('ZCARD', KEYS[12]) < rate
  end
  if room then
    redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now)
    room = redis.call('ZSCORE', KEYS[10], ARGV[16])
      or redis.call('ZCARD', KEYS[10]) < tonumber(ARGV[17])
  end
  if room then
    local job = cjson.decode(ARGV[1])
    job['status'] = 'active'
    job['started'] = now
    job['touched'] = now
    job['attempts'] = (job['attempts'] or 0) + 1
    job['worker_id'] = ARGV[21]
    local raw = cjson.encode(job)
    redis.call('SET', KEYS[2], raw)
    redis.call('RPUSH', KEYS[13], KEYS[2])
    redis.call('ZADD', KEYS[10], now + tonumber(ARGV[18]), ARGV[16])
    redis.call('PEXPIRE', KEYS[10], tonumber(ARGV[18]) * 2)
    if rate > 0 then
      redis.call('ZADD', KEYS[12], now, KEYS[2])
      redis.call('PEXPIRE', KEYS[12], period + 1000)
    end
    redis.call('PUBLISH', KEYS[2], 'active')
    return {raw}
  end
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], KEYS[2])
redis.call('PUBLISH', ARGV[11], ARGV[12])
return 1
"""

# KEYS[1] the queue's slots, KEYS[2] paused queues, KEYS[3] the queue's recent starts (scored by
# ms), then per lane, lowest priority first: its queued list, active list, unfinished jobs.
# ARGV queue, slot token, slot limit, lease (ms), rate count (0: no rate), rate period (ms),
# worker id, body key prefix, then the lanes' names.
# Take a slot and the next job of the queue's lanes, mark it active and read its body, in one
# step. Marking it active in the same step as the move also keeps a sweep from finding a job in
# the active list that is not active yet (it would take it for a dead worker's and abort it).
# The pause and rate checks are in the same step: a pause answered to an operator, or a start
# over the rate, cannot slip in between. Replies: {'job', lane index, record, body or nil, jobs
# left in that lane}; {'none'} (the slot is given back); {'full'} (no slot free); {'paused'};
# {'rate', ms until a start is allowed}.
_TAKE = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return {'paused'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[5])
local period = tonumber(ARGV[6])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - period)
  if redis.call('ZCARD', KEYS[3]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {'rate', math.max(1, tonumber(oldest[2]) + period - now + 1)}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2])
    and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return {'full'}
end
for i = 1, (#KEYS - 3) / 3 do
  local queued, active = KEYS[1 + 3 * i], KEYS[2 + 3 * i]
  while true do
    local id = redis.call('LMOVE', queued, active, 'LEFT', 'RIGHT')
    if not id then break end
    local raw = redis.call('GET', id)
    if raw then
      local job = cjson.decode(raw)
      job['status'] = 'active'
      job['started'] = now
      job['touched'] = now
      job['attempts'] = (job['attempts'] or 0) + 1
      job['worker_id'] = ARGV[7] .. ':' .. ARGV[8 + i]
      raw = cjson.encode(job)
      redis.call('SET', id, raw)
      redis.call('PUBLISH', id, 'active')
      redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
      redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) * 2)
      if limit > 0 then
        redis.call('ZADD', KEYS[3], now, id)
        redis.call('PEXPIRE', KEYS[3], period + 1000)
      end
      local body = false
      if job['kwargs'] and job['kwargs']['has_body'] then
        body = redis.call('GET', ARGV[8] .. job['key'])
      end
      return {'job', i, raw, body, redis.call('LLEN', queued)}
    end
    redis.call('LREM', active, 0, id)  -- its record expired: nothing to run
    redis.call('ZREM', KEYS[3 + 3 * i], id)
  end
end
redis.call('ZREM', KEYS[1], ARGV[2])
return {'none'}
"""

# KEYS[1] the lane's active list, KEYS[2] its unfinished jobs, KEYS[3] the record, KEYS[4]
# result, KEYS[5] body, KEYS[6] progress, KEYS[7] history, KEYS[8] the queue's counters, KEYS[9]
# its slots, KEYS[10] callbacks owed, KEYS[11] their routes, KEYS[12] the queue's lanes.
# ARGV the final record, its ttl (s, 0: none), the side keys' ttl, result, history line,
# duration (ms, -1: none), its bucket's counter, slot token, owes a callback, job key, route,
# lane key prefix and suffix, wake channel, queue, slot limit.
# A job succeeded: what saq's finish, the result's write, JobService.finished and the slot's
# release did in five round trips. Other processes' loops are woken only when one may have
# been refused a slot while jobs wait (the slots were all taken and some job is queued).
# Returns how many jobs of the queue wait: the loop looks again only when some do.
_COMPLETE = """
redis.call('LREM', KEYS[1], 1, KEYS[3])
redis.call('ZREM', KEYS[2], KEYS[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[3], tonumber(ARGV[2]), ARGV[1])
else
  redis.call('SET', KEYS[3], ARGV[1])
end
redis.call('PUBLISH', KEYS[3], 'complete')
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[4], ARGV[4], 'EX', ttl)
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('EXPIRE', KEYS[6], ttl)
redis.call('RPUSH', KEYS[7], ARGV[5])
redis.call('EXPIRE', KEYS[7], ttl)
redis.call('HINCRBY', KEYS[8], 'succeeded', 1)
if tonumber(ARGV[6]) >= 0 then
  redis.call('HINCRBY', KEYS[8], 'duration_ms_sum', tonumber(ARGV[6]))
  redis.call('HINCRBY', KEYS[8], 'duration_count', 1)
  redis.call('HINCRBY', KEYS[8], ARGV[7], 1)
end
local taken = redis.call('ZCARD', KEYS[9])
redis.call('ZREM', KEYS[9], ARGV[8])
if ARGV[9] == '1' then
  redis.call('ZADD', KEYS[10], 0, ARGV[10])
  redis.call('HSET', KEYS[11], ARGV[10], ARGV[11])
end
local waiting = 0
for _, p in ipairs(redis.call('SMEMBERS', KEYS[12])) do
  waiting = waiting + redis.call('LLEN', ARGV[12] .. p .. ARGV[13])
end
if waiting > 0 and taken >= tonumber(ARGV[16]) then redis.call('PUBLISH', ARGV[14], ARGV[15]) end
return waiting
"""


# KEYS[1] sweep lock, KEYS[2] active list; ARGV lock seconds. The active jobs and their
# records, once per lock period across the cluster.
_SNAPSHOT = """
local found = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SETEX', KEYS[1], ARGV[1], 1)
  for i, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    found[i] = {id, redis.call('GET', id)}
  end
end
return found
"""


# KEYS[1] the lane's schedule lock, KEYS[2] its unfinished jobs (scored by when they may run, 0
# for now), KEYS[3] its queued list; ARGV lock (ms), now (s). saq's own script, with a lock in
# ms rather than whole seconds (see SidecarQueue.schedule).
_SCHEDULE = """
if redis.call('SET', KEYS[1], 1, 'PX', ARGV[1], 'NX') then
  local jobs = redis.call('ZRANGEBYSCORE', KEYS[2], 1, ARGV[2])
  for _, v in ipairs(jobs) do
    redis.call('ZADD', KEYS[2], 0, v)
    redis.call('RPUSH', KEYS[3], v)
  end
  return jobs
end
return {}
"""
SCHEDULE_EVERY = 0.25  # how often due jobs (delayed starts, retries) move to their queue


# Callbacks owed. Every score is on Redis's clock (ms). A claim moves a due entry's score to the
# end of its lease, and the claimer's later writes apply only while the score is still that
# lease (someone else may have re-owed the entry meanwhile: a job run again by the admin). The
# route is kept beside the entry so that a callback dropped after its job's record expired is
# still counted under its route.

# KEYS[1] callbacks, KEYS[2] tries, KEYS[3] routes; ARGV job id, delay ms, route: owe a
# callback, due after the delay, its deliveries counted from none.
_OWE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
return 1
"""

# KEYS[1] callbacks, KEYS[2] tries, KEYS[3] routes; ARGV lease ms, limit. Returns the lease's
# end, then for each due job id: the id, the deliveries tried so far, the route.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = now + tonumber(ARGV[1])
local out = {lease}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], lease, id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or '0'
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or ''
end
return out
"""

# KEYS[1] callbacks, KEYS[2] tries, KEYS[3] routes, KEYS[4] the counts; ARGV job id, lease,
# delay ms (-1: done, forget it), 1 when an attempt was made, the outcome to count ('' for
# none), counted as `<route>:<outcome>`.
_SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
local route = redis.call('HGET', KEYS[3], ARGV[1]) or ''
if tonumber(ARGV[3]) < 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[2], ARGV[1], 1) end
end
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[4], route .. ':' .. ARGV[5], 1) end
return 1
"""


class SidecarQueue(RedisQueue):
    """saq's Redis queue for one lane, with the sidecar's schedule and sweep, and the names of
    its keys for the scripts above."""

    @property
    def queued_key(self) -> str:
        return self.namespace("queued")

    @property
    def active_key(self) -> str:
        return self.namespace("active")

    @property
    def incomplete_key(self) -> str:
        return self.namespace("incomplete")

    async def schedule(self, lock: int = 1) -> list[str]:
        """Move the jobs that became due (a delayed start, a retry's backoff) to the queue.
        saq's version locks whole seconds across the cluster, polled every second: the two
        periods drift and a due job waited up to two seconds (1.5 s measured for a delayed
        start). A 250 ms lock polled as often keeps a job within about half a second of its
        time, and still one script per lane per 250 ms for the whole cluster."""
        script = self._schedule_script
        if script is None:
            script = self._schedule_script = self.redis.register_script(_SCHEDULE)
        moved = await script(keys=[self.namespace("schedule"), self.incomplete_key,
                                   self.queued_key], args=[int(SCHEDULE_EVERY * 1000), time.time()])
        return [job_id.decode() for job_id in moved or []]

    _schedule_script: Any = None
    _snapshot_script: Any = None

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        """Give the jobs of workers that stopped heart-beating to another worker.

        saq's sweep marks such a job aborting, takes it out of the active list, waits up to
        `abort` seconds, then queues it again: a sweeping process that dies during that wait
        leaves the job in no list, "aborting" for ever, and it is lost. Here the job is queued
        again (or failed, out of attempts) in one transaction. A worker that was only late
        may still finish its run: at least once, as documented."""
        script = self._snapshot_script
        if script is None:
            script = self._snapshot_script = self.redis.register_script(_SNAPSHOT)
        swept = []
        active = await script(keys=[self.namespace("sweep"), self.active_key], args=[lock])
        for job_id, raw in active:
            job = self.deserialize(raw)
            if job is None:  # its record expired: nothing to run
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lrem(self.active_key, 0, job_id)
                    pipe.zrem(self.incomplete_key, job_id)
                    await pipe.execute()
                swept.append(job_id.decode())
                continue
            if job.status == Status.ACTIVE and not _abandoned(job):
                continue
            if job.status not in (Status.ACTIVE, Status.NEW, Status.QUEUED):
                continue  # being aborted or finished by its worker right now
            if job.status != Status.ACTIVE and time.time() * 1000 - job.touched < (
                    max(job.heartbeat, 1) * 1000):
                continue  # moved here an instant ago by an older dequeue; give it time
            log.warning("job requeued: its worker stopped answering" if job.retryable else
                        "job failed: its worker stopped answering, no attempt left", extra={
                            "job_id": job.key, "attempt": job.attempts})
            queue = job.key.split(".", 1)[0]
            pipe = self.redis.pipeline(transaction=False)
            if job.retryable:
                await self.retry(job, error=SWEPT_ERROR)
                pipe.hincrby(stats_key(queue), "requeued", 1)
            else:
                # Out of attempts: the job failed (JobService.finished, which no worker will
                # call for it: the one running it is gone).
                await self.finish(job, Status.ABORTED, error=SWEPT_ERROR)
                ttl = max(job.ttl, 1)
                pipe.expire(body_key(job.key), ttl)
                pipe.expire(progress_key(job.key), ttl)
                pipe.hincrby(stats_key(queue), "failed", 1)
                if owes_callback(job):
                    callback_due_now(pipe, job)
            await pipe.execute()
            swept.append(job_id.decode())
            if owes_callback(job) and self.on_callback_due is not None:
                self.on_callback_due()
        return swept

    on_callback_due: Callable[[], None] | None = None  # set by the JobService that made it


def body_key(job_id: str) -> str:
    return PREFIX + "body:" + job_id


def result_key(job_id: str) -> str:
    return PREFIX + "result:" + job_id


def spec_where(job_id: str, field: str) -> str:
    """What a sealed field of a job's record is bound to (crypto.Sealer: associated data)."""
    return f"{PREFIX}job:{job_id}:{field}"


def history_key(job_id: str) -> str:
    return PREFIX + "history:" + job_id


def history_entry(job: Job, outcome: str, error: str | None, started: int | None = None
                  ) -> bytes:
    """One line of a job's history: an attempt (or a cancellation before any). `started`
    (ms) when the record no longer says (saq clears it when it queues a retry)."""
    started = started or job.started
    spec = job.kwargs or {}
    attempt = job.attempts + int(spec.get("attempts_before", 0))
    ran = job.attempts > 0  # not a job cancelled while it waited for its first attempt
    return orjson.dumps({
        "attempt": attempt if ran else None, "outcome": outcome,
        "started_at": iso_time(started) if started else None,
        "ended_at": iso_time(int(time.time() * 1000)),
        "error": error, "worker": job.worker_id if ran else None})


def progress_key(job_id: str) -> str:
    return PREFIX + "progress:" + job_id


def lanes_key(queue: str) -> str:
    return PREFIX + "lanes:" + queue


def rate_key(queue: str) -> str:
    return PREFIX + "starts:" + queue


def owes_callback(job: Job) -> bool:
    """The job's route had `offload.callback` when the job was queued."""
    return bool((job.kwargs or {}).get("callback"))


def callback_due_now(pipe: Any, job: Job) -> None:
    """The job is over: its callback (owed since it was queued) is due at once."""
    pipe.zadd(CALLBACKS, {job.key: 0})
    pipe.hset(CALLBACK_ROUTES, job.key, str((job.kwargs or {}).get("route", "")))


def stats_key(queue: str) -> str:
    return PREFIX + "stats:" + queue


def slots_key(queue: str) -> str:
    return PREFIX + "slots:" + queue


def lane_key_parts(queue: str) -> tuple[str, str]:
    """`prefix + str(priority) + suffix` is the queued list of a lane of `queue`, for the
    scripts that count a queue's waiting jobs over lanes they learn from Redis."""
    return f"saq:{lane(queue, 0)[:-1]}", ":queued"  # saq's RedisQueue.namespace("queued")


class QueueFull(Exception):
    """The queue holds `max_queued` jobs waiting: this one was not queued."""


@dataclass(slots=True)
class Taken:
    """What a loop's look at its queue gave (JobService.take): a job marked active, with its
    lane, its body as stored (sealed) and how many jobs are left in that lane; or why not."""

    job: Job | None = None
    body: bytes | None = None
    left: int = 0
    held: str | None = None  # "paused", "full" (no slot free), "rate"; None: nothing waits
    rate_wait: float = 0.0  # "rate": seconds until a start is allowed


@dataclass(slots=True)
class HandOff:
    """An idle loop of this process offered a job being enqueued (JobRunner.hand_off): what
    the enqueue's script needs to take it for that loop, and where to give it."""

    token: str
    waiter: asyncio.Future[Taken | None]
    limit: int
    lease: float
    rate: WindowRate | None
    worker_id: str

    def give(self, taken: Taken | None) -> None:
        """The enqueue's answer: the job taken for the loop, or None (queued as usual, or the
        enqueue failed): the loop then looks for itself."""
        if not self.waiter.done():
            self.waiter.set_result(taken)


# Each field of saq's Job and its default, for `saq_record`.
_JOB_DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(Job)}


def saq_record(**fields: Any) -> dict[str, Any]:
    """The record saq's `Job(**fields).to_dict()` gives (a field at its default left out,
    the queue by its name), built without the dataclass: constructing a Job and walking its
    27 fields was 5% of a 202's CPU. tests/test_script_batching.py pins it to saq's own."""
    return {name: value for name, value in fields.items()
            if not (name in _JOB_DEFAULTS and value == _JOB_DEFAULTS[name])}


@redis_boundary
class JobService(Subscriber):
    """Every Redis operation on jobs, for the offload policy, the job endpoints and workers."""

    channel = WAKE_CHANNEL
    task_name = "jobs-listener"

    def __init__(self) -> None:
        super().__init__()
        self.redis_up = False
        # Seals a job's request (head, target, body) and its result in Redis (crypto.py).
        self.sealer = Sealer()
        self._queues: dict[str, SidecarQueue] = {}
        self._wake_callbacks: list[Callable[[str], None]] = []
        self._callback_due: list[Callable[[], None]] = []
        self._renew: Any = None
        self._owe: Any = None
        self._claim: Any = None
        self._settle: Any = None
        self._enqueue: Any = None
        self._take: Any = None
        self._complete: Any = None
        self._batch: ScriptBatcher | None = None
        self._hand_off: Callable[[str, int], HandOff | None] | None = None
        self.command_timeout = 1.0  # what a client's request waits for Redis (`bounded`)

    def attach(self, client: aioredis.Redis, listener: aioredis.Redis | Bus | None, *,
               command_timeout: float = 1.0) -> None:
        """`client` has no read timeout: saq's pub/sub for job changes shares it. A client's
        request bounds its own calls instead (`bounded`). `listener` None: no wake-ups are
        heard (a process without job loops, which only enqueues)."""
        if listener is None:
            self.redis = client
        else:
            super().attach(client, listener)
        self._renew = client.register_script(_RENEW)
        self._owe = client.register_script(_OWE)
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)
        self._enqueue = client.register_script(_ENQUEUE)
        self._take = client.register_script(_TAKE)
        self._complete = client.register_script(_COMPLETE)
        # The scripts on every job's path: the calls of many requests and loops at once share
        # one write to Redis (stores/batching.py says what that saves).
        self._batch = ScriptBatcher(client)
        self.command_timeout = command_timeout

    async def batched(self, script: Any, keys: list[Any], args: list[Any], *,
                      bounded: bool = False) -> Any:
        """`script` called in the batch of this event-loop turn; `bounded`: within the
        command timeout, as `bounded()` does for a client's request."""
        if self._batch is None:
            raise RuntimeError("the job service is not attached to Redis yet")
        return await self._batch(script, keys, args,
                                 within=self.command_timeout if bounded else None)

    def bounded(self, extra: float = 0.0) -> within:
        """The longest a client's request waits for Redis here (plus `extra`), then
        `StoreUnavailable` (stores/boundary.py says why)."""
        return within(self.command_timeout + extra)

    async def close(self) -> None:
        if self._batch is not None:
            await self._batch.close()
        for queue in self._queues.values():
            # Not saq's disconnect(): it would close the client every lane shares.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await queue._pubsub.close()
            with contextlib.suppress(Exception):
                await queue._pubsub.pubsub.aclose()  # type: ignore[no-untyped-call]
        await super().close()
        if self.redis is not None:
            await self.redis.aclose()

    @property
    def client(self) -> aioredis.Redis:
        if self.redis is None:
            raise RuntimeError("the job service is not attached to Redis yet")
        return self.redis

    def queue(self, name: str) -> SidecarQueue:
        """The saq queue of one lane (`core.jobs.lane`), made once per process."""
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = SidecarQueue(
                self.client, name=name, dump=orjson.dumps, load=orjson.loads,
                max_concurrent_ops=MAX_CONCURRENT_OPS, swept_error_message=SWEPT_ERROR)
            queue.on_callback_due = self._callbacks_due
        return queue

    def queue_of(self, job_id: JobId) -> SidecarQueue:
        return self.queue(lane(job_id.queue, job_id.priority))

    # -- enqueue --------------------------------------------------------------------------------

    async def enqueue(self, job_id: JobId, spec: dict[str, Any], body: bytes | None,
                      config: OffloadConfig, *, heartbeat: float, max_age: float,
                      start_at: float | None = None, max_queued: int | None = None) -> None:
        """Queue a job, in one round trip bounded by the command timeout (a client waits
        for it); `start_at` (Unix seconds) for one that must not start before then.
        QueueFull when `max_queued` jobs of the queue wait already. `spec["callback"]`
        true: the job owes a callback, recorded with the job, first due a `heartbeat` (the
        visibility timeout) from now; the job's end makes it due at once."""
        key = str(job_id)
        lane_name = lane(job_id.queue, job_id.priority)
        sealer = self.sealer
        if sealer.enabled:  # the client's headers (Authorization...) and target, not in clear
            spec = {**spec, "head": sealer.seal_text(spec["head"], spec_where(key, "head")),
                    "target": sealer.seal_text(spec["target"], spec_where(key, "target"))}
        queue = self.queue(lane_name)
        # saq keeps a job with `scheduled` in its sorted set of unfinished jobs, scored by it,
        # until the schedule timer (SidecarQueue.schedule) finds it due; it types the field
        # int but takes any number, and a float keeps the start to the ms.
        scheduled = start_at if start_at is not None else 0
        # What saq's enqueue sets before its own script, which _ENQUEUE does the work of.
        record = saq_record(
            function=REPLAY, kwargs=spec, queue=lane_name, key=key,
            timeout=math.ceil(config.timeout), heartbeat=math.ceil(heartbeat),
            retries=config.attempts, ttl=math.ceil(config.result_ttl),
            retry_delay=config.backoff, retry_backoff=True, scheduled=scheduled,
            queued=int(time.time() * 1000), status=Status.QUEUED.value)
        callback = bool(spec.get("callback"))
        sealed = None if body is None else sealer.seal(body, body_key(key))
        hand = (self._hand_off(job_id.queue, job_id.priority)
                if self._hand_off is not None and start_at is None else None)
        handed: Taken | None = None
        try:
            rate = hand.rate if hand is not None else None
            done = await self.batched(
                self._enqueue,
                [queue.incomplete_key, queue.job_id(key), queue.queued_key, ABORT_ID_PREFIX + key,
                 body_key(key),
                 lanes_key(job_id.queue), CALLBACKS, CALLBACK_TRIES, CALLBACK_ROUTES,
                 slots_key(job_id.queue), PAUSED, rate_key(job_id.queue), queue.active_key],
                [orjson.dumps(record), scheduled, b"" if sealed is None else sealed,
                 0 if body is None else 1, math.ceil(max_age + config.result_ttl),
                 job_id.priority, 1 if callback else 0, int(heartbeat * 1000),
                 str(spec.get("route", "")), key, WAKE_CHANNEL, lane_name,
                 max_queued or 0, *lane_key_parts(job_id.queue),
                 hand.token if hand is not None else "", hand.limit if hand else 0,
                 int(hand.lease * 1000) if hand else 0, rate.starts if rate else 0,
                 int(rate.period * 1000) if rate else 0, hand.worker_id if hand else "",
                 job_id.queue], bounded=True)
            if isinstance(done, list):
                handed = Taken(queue.deserialize(done[0]), sealed)
        finally:
            if hand is not None:
                hand.give(handed)
        if done == -1:
            raise QueueFull(job_id.queue)
        if done == 0:
            raise RuntimeError(f"job id {key} is already taken")  # 144 random bits: never

    # -- reading --------------------------------------------------------------------------------

    async def lookup(self, job_id: JobId) -> tuple[Job | None, dict[bytes, bytes]]:
        """The saq record and the progress hash, in one round trip."""
        queue = self.queue_of(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(queue.job_id(str(job_id)))
        pipe.hgetall(progress_key(str(job_id)))
        record, progress = await pipe.execute()
        return queue.deserialize(record), progress

    async def progress_of(self, job_ids: list[str]) -> list[dict[bytes, bytes]]:
        """The progress hashes of several jobs, in one round trip (the admin API's list)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(progress_key(job_id))
        return list(await pipe.execute()) if job_ids else []

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        entries = await cast(Any, self.client.lrange(history_key(job_id), 0, -1))
        return [orjson.loads(entry) for entry in entries]

    def open_body(self, job_id: str, stored: bytes | None) -> bytes | None:
        """A job's request body from its stored (sealed) bytes; crypto.SealError when it does
        not open."""
        return None if stored is None else self.sealer.open(stored, body_key(job_id))

    async def result(self, job_id: str) -> SharedResult | None:
        """The job's stored response; crypto.SealError when it does not open."""
        data = cast("bytes | None", await self.client.get(result_key(job_id)))
        if data is None:
            return None
        return SharedResult.unpack(self.sealer.open(data, result_key(job_id)))

    async def has_result(self, job_id: str) -> bool:
        return bool(await self.client.exists(result_key(job_id)))

    def request_field(self, job: Job, name: str) -> str:
        """A job's `head` or `target` as the client sent it; crypto.SealError when sealed with
        a key no longer listed (or altered)."""
        return self.sealer.open_text(str((job.kwargs or {}).get(name, "")),
                                     spec_where(job.key, name))

    async def wait_finished(self, job_id: JobId, timeout: float) -> None:
        """Return when the job reaches a final state, or after `timeout` seconds."""
        if timeout <= 0:
            return
        queue = self.queue_of(job_id)

        def finished(_key: str, status: Status) -> bool:
            return status in (Status.COMPLETE, Status.FAILED, Status.ABORTED)

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            job = await queue.job(str(job_id))
            if job is None or finished("", job.status):
                return
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            # Bounded, then looked at again: a change published before the subscription took
            # effect is not waited for until the deadline.
            # (saq's own timeout restarts at every message, and heartbeats are messages.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await queue.listen([str(job_id)], finished, timeout=None)

    # -- progress -------------------------------------------------------------------------------

    async def set_progress(self, job: Job, progress: float, message: str | None,
                           ttl: float) -> None:
        """Store a progress report and tell the job's listeners (saq's channel for the job,
        with its current state, which is what saq's listeners expect there)."""
        key = progress_key(job.key)
        mapping = {"progress": repr(progress), "message": message or ""}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, math.ceil(ttl))
        pipe.publish(job.id, job.status.value)
        await pipe.execute()

    # -- changes --------------------------------------------------------------------------------

    async def cancel(self, job: Job, reason: str = CANCELLED_BY_CLIENT) -> None:
        """Cancel a job: a queued one at once; a running one when its worker sees the abort
        (saq's upkeep checks every second) and stops the upstream call."""
        waiting = job.status in (Status.NEW, Status.QUEUED)
        queue = job.get_queue()
        await queue.abort(job, reason)
        if not waiting:
            return  # the worker running it finishes it, and counts it
        if job.status != Status.ABORTED:
            # Waiting out a retry's backoff: in no list saq's abort looks at, so it would stay
            # "aborting" forever.
            await queue.finish(job, Status.ABORTED, error=reason)
            await self.client.delete(job.abort_id)
        await self.finished(job, "cancelled", None)

    async def lane_exists(self, queue: str, priority: int) -> bool:
        """Whether a job was ever queued in this lane (the lanes set of its queue)."""
        return bool(await cast(Any, self.client.sismember(lanes_key(queue), str(priority))))

    async def put_back_completed(self, job: Job) -> None:
        """A job that succeeded while saq aborted it was written back as "aborting" over its
        finished record: put its record right (the worker counted it already)."""
        await job.get_queue().finish(job, Status.COMPLETE)
        await self.client.delete(job.abort_id)

    async def abandon(self, job: Job) -> None:
        """Finish a cancelled job that no worker finished."""
        await job.get_queue().finish(job, Status.ABORTED, error=CANCELLED_BY_CLIENT)
        await self.client.delete(job.abort_id)
        await self.finished(job, "cancelled", None)

    async def retry(self, job: Job) -> None:
        """Queue a finished job again from its first attempt (admin)."""
        queue = job.get_queue()
        spec = job.kwargs = dict(job.kwargs or {})
        spec["attempts_before"] = int(spec.get("attempts_before", 0)) + job.attempts
        spec.setdefault("created", job.queued)
        job.attempts = 0
        job.error = None
        job.result = None
        job.started = job.completed = job.touched = 0
        job.progress = 0.0
        job.queue = None
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(progress_key(job.key), result_key(job.key), job.abort_id)
        pipe.persist(body_key(job.key))
        pipe.persist(history_key(job.key))
        if owes_callback(job):
            # A new end, a new callback, its deliveries counted afresh; one of the previous end
            # still waiting to be sent is superseded (the new one says more).
            await self._owe(keys=[CALLBACKS, CALLBACK_TRIES, CALLBACK_ROUTES],
                            args=[job.key, int(max(job.heartbeat, 1) * 1000),
                                  str(spec.get("route", ""))], client=pipe)
        await pipe.execute()
        if await queue.enqueue(job) is None:
            raise RuntimeError(f"job {job.key} is already queued")
        await self.client.publish(WAKE_CHANNEL, queue.name)

    async def finished(self, job: Job, outcome: str, duration_ms: int | None,
                       started: int | None = None) -> None:
        """A job reached a final state: its side keys now live as long as its record, the
        queue's counters move, and its callback (if it owes one) is due now."""
        client = self.client
        queue = job.key.split(".", 1)[0]
        ttl = max(job.ttl, 1)
        pipe = client.pipeline(transaction=False)
        pipe.expire(body_key(job.key), ttl)
        pipe.expire(progress_key(job.key), ttl)
        pipe.rpush(history_key(job.key), history_entry(
            job, outcome, job.error if outcome != "succeeded" else None, started))
        pipe.expire(history_key(job.key), ttl)
        pipe.hincrby(stats_key(queue), outcome, 1)
        if duration_ms is not None:
            pipe.hincrby(stats_key(queue), "duration_ms_sum", duration_ms)
            pipe.hincrby(stats_key(queue), "duration_count", 1)
            slot = duration_bucket(duration_ms / 1000)
            pipe.hincrby(stats_key(queue), f"duration_bucket_{slot}", 1)
        callback = owes_callback(job)
        if callback:
            callback_due_now(pipe, job)
        await pipe.execute()
        if callback:
            self._callbacks_due()

    async def count_retry(self, job: Job, started: int | None = None) -> None:
        """A failed attempt went back to its queue: count it, and forget its progress (the next
        attempt starts from the beginning; a poller must not see the lost one's 60%)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(stats_key(job.key.split(".", 1)[0]), "retried", 1)
        pipe.delete(progress_key(job.key))
        pipe.rpush(history_key(job.key), history_entry(job, "retried", job.error, started))
        pipe.expire(history_key(job.key), max(job.ttl, 1) + 7 * 86400)
        await pipe.execute()

    # -- queue operations (admin) ---------------------------------------------------------------

    async def pause(self, queue: str) -> None:
        """No job of `queue` starts from now on, on any worker (the dequeue checks, in the same
        script that takes the job); jobs running finish. Held in Redis: restarts keep it."""
        await cast(Any, self.client.sadd(PAUSED, queue))

    async def resume(self, queue: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.srem(PAUSED, queue)
        pipe.publish(WAKE_CHANNEL, queue)
        await pipe.execute()

    async def paused(self) -> set[str]:
        return {m.decode() for m in await cast(Any, self.client.smembers(PAUSED))}

    async def unfinished(self, queue: str) -> list[Job]:
        """Every job of `queue` not yet over (queued, delayed, in backoff, running), from
        saq's per-lane index of them."""
        found: list[Job] = []
        for priority in await self.lanes(queue):
            saq_queue = self.queue(lane(queue, priority))
            ids = await cast(Any, self.client.zrange(saq_queue.incomplete_key, 0, -1))
            for start in range(0, len(ids), 500):
                records = await self.client.mget(ids[start:start + 500])
                found += [job for job in map(saq_queue.deserialize, records) if job is not None]
        return found

    async def drain(self, queue: str) -> int:
        """Cancel every job of `queue` waiting to run (queued, delayed or in backoff); running
        ones go on. How many were cancelled."""
        cancelled = 0
        for job in await self.unfinished(queue):
            if job.status in (Status.NEW, Status.QUEUED):
                await self.cancel(job, CANCELLED_BY_OPERATOR)
                cancelled += 1
        return cancelled

    async def all_jobs(self, queue: str, statuses: list[Status]) -> list[Job]:
        """Every job of `queue` in one of `statuses`, finished ones included (a scan of saq's
        records: what listing and bulk operations cost grows with the jobs kept)."""
        found: list[Job] = []
        for priority in await self.lanes(queue):
            async for job in self.queue(lane(queue, priority)).iter_jobs(statuses, 500):
                found.append(job)
        return found

    # -- callbacks owed (jobs/callbacks.py) ------------------------------------------------------

    def on_callback_due(self, callback: Callable[[], None]) -> None:
        """`callback()`: this process made a callback due (a job it finished, cancelled or
        swept); the sender looks at once instead of at its next poll."""
        self._callback_due.append(callback)

    def _callbacks_due(self) -> None:
        for callback in self._callback_due:
            callback()

    async def claim_callbacks(self, lease: float, limit: int
                              ) -> tuple[int, list[tuple[str, int, str]]]:
        """Due callbacks, each held by this process for `lease` seconds: (the lease's end,
        [(job id, deliveries tried, route)])."""
        reply = await self._claim(keys=[CALLBACKS, CALLBACK_TRIES, CALLBACK_ROUTES],
                                  args=[int(lease * 1000), limit])
        lease_end = int(reply[0])
        rest = reply[1:]
        return lease_end, [(rest[i].decode(), int(rest[i + 1]), rest[i + 2].decode())
                           for i in range(0, len(rest), 3)]

    async def settle_callback(self, job_id: str, lease_end: int, *, delay: float | None,
                              tried: bool = False, count: str | None = None) -> bool:
        """After an attempt (`tried`) or a look: due again in `delay` seconds, or forgotten
        (`delay` None); `count` adds one to the route's count of that outcome. False when the
        entry was owed again by someone else meanwhile (nothing was changed)."""
        args = [job_id, lease_end, -1 if delay is None else int(delay * 1000),
                1 if tried else 0, count or ""]
        return bool(await self._settle(
            keys=[CALLBACKS, CALLBACK_TRIES, CALLBACK_ROUTES, CALLBACK_COUNTS], args=args))

    async def callbacks_pending(self) -> int:
        """Callbacks owed, across the cluster: jobs not over yet that have one to send, and
        those being sent or waiting to be sent again."""
        return int(await self.client.zcard(CALLBACKS))

    async def callback_counts(self) -> dict[tuple[str, str], int]:
        """Callback outcomes across the cluster, by (route, outcome)."""
        counts = await cast(Any, self.client.hgetall(CALLBACK_COUNTS))
        found: dict[tuple[str, str], int] = {}
        for field, value in counts.items():
            route, _, outcome = field.decode().rpartition(":")
            found[route, outcome] = int(value)
        return found

    # -- lanes and slots (workers) --------------------------------------------------------------

    async def lanes(self, queue: str) -> list[int]:
        members = await cast(Any, self.client.smembers(lanes_key(queue)))
        return sorted(int(m) for m in members)

    async def take(self, queue: str, priorities: list[int], token: str, *, limit: int,
                   lease: float, rate: WindowRate | None, worker_id: str) -> Taken:
        """A slot of `queue` (held by `token` for `lease` seconds, renewed by the runner) and
        the next job of its lanes, lowest priority first, marked active: one round trip."""
        keys = [slots_key(queue), PAUSED, rate_key(queue)]
        lanes = [self.queue(lane(queue, priority)) for priority in priorities]
        for saq_queue in lanes:
            keys += [saq_queue.queued_key, saq_queue.active_key, saq_queue.incomplete_key]
        reply = await self.batched(self._take, keys, [
            queue, token, limit, int(lease * 1000), rate.starts if rate else 0,
            int(rate.period * 1000) if rate else 0, worker_id, PREFIX + "body:",
            *(saq_queue.name for saq_queue in lanes)])
        kind = reply[0]
        if kind == b"job":
            _, index, record, body, left = reply
            return Taken(lanes[int(index) - 1].deserialize(record), body, int(left))
        if kind == b"rate":
            return Taken(held="rate", rate_wait=int(reply[1]) / 1000)
        return Taken(held=None if kind == b"none" else kind.decode())

    async def complete(self, job: Job, result: SharedResult, *, token: str, limit: int,
                       duration_ms: int | None, started: int | None) -> int:
        """The job succeeded: its record, result, history, counters, side keys' lifetime,
        callback and slot, in one round trip. How many jobs of the queue wait to start."""
        queue = cast(SidecarQueue, job.get_queue())
        name = job.key.split(".", 1)[0]
        ttl = max(job.ttl, 1)
        job.status = Status.COMPLETE
        job.error = None
        job.completed = int(time.time() * 1000)
        job.progress = 1.0
        callback = owes_callback(job)
        slot = duration_bucket(duration_ms / 1000) if duration_ms is not None else 0
        waiting = await self.batched(
            self._complete,
            [queue.active_key, queue.incomplete_key, job.id, result_key(job.key),
             body_key(job.key), progress_key(job.key), history_key(job.key), stats_key(name),
             slots_key(name), CALLBACKS, CALLBACK_ROUTES, lanes_key(name)],
            [queue.serialize(job), job.ttl if job.ttl > 0 else 0, ttl,
             self.sealer.seal(result.pack(), result_key(job.key)),
             history_entry(job, "succeeded", None, started),
             -1 if duration_ms is None else duration_ms, f"duration_bucket_{slot}",
             token, 1 if callback else 0, job.key, str((job.kwargs or {}).get("route", "")),
             *lane_key_parts(name), WAKE_CHANNEL, name, limit])
        if callback:
            self._callbacks_due()
        return int(waiting)

    async def renew_slots(self, queue: str, tokens: list[str], lease: float) -> None:
        if tokens:
            await self._renew(keys=[slots_key(queue)], args=[int(lease * 1000), *tokens])

    async def release_slot(self, queue: str, token: str, *, wake: bool) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(slots_key(queue), token)
        if wake:
            pipe.publish(WAKE_CHANNEL, queue)
        await pipe.execute()

    def on_hand_off(self, offer: Callable[[str, int], HandOff | None]) -> None:
        """`offer(queue, priority)`: an idle loop of this process to hand a job being
        enqueued to (the runner's), or None."""
        self._hand_off = offer

    def on_wake(self, callback: Callable[[str], None]) -> None:
        """`callback(name)`: a lane got a job, or a queue freed a slot (name is a queue)."""
        self._wake_callbacks.append(callback)

    async def on_message(self, data: bytes) -> None:
        name = data.decode("latin-1") if isinstance(data, bytes) else str(data)
        for callback in self._wake_callbacks:
            callback(name)

    async def on_subscribed(self) -> None:
        for callback in self._wake_callbacks:
            callback("*")  # publications may have been missed: everyone looks again

    # -- inspection -----------------------------------------------------------------------------

    async def queue_stats(self, queue: str) -> dict[str, Any]:
        """Depth, running and outcomes of one configured queue, across the cluster."""
        priorities = await self.lanes(queue)
        client = self.client
        pipe = client.pipeline(transaction=False)
        for priority in priorities:
            saq_queue = self.queue(lane(queue, priority))
            pipe.llen(saq_queue.queued_key)
            pipe.llen(saq_queue.active_key)
            pipe.zcard(saq_queue.incomplete_key)
        pipe.hgetall(stats_key(queue))
        pipe.zcard(slots_key(queue))
        replies = await pipe.execute()
        counters = {k.decode(): int(v) for k, v in replies[-2].items()}
        queued = sum(replies[0:-2:3])
        active = sum(replies[1:-2:3])
        incomplete = sum(replies[2:-2:3])
        count = counters.pop("duration_count", 0)
        total = counters.pop("duration_ms_sum", 0)
        buckets = [counters.pop(f"duration_bucket_{i}", 0)
                   for i in range(len(DURATION_BUCKETS) + 1)]
        return {
            "queued": queued,
            "running": active,
            "waiting_retry": max(0, incomplete - queued - active),
            "slots_in_use": replies[-1],
            "priorities": priorities,
            "outcomes": {k: counters.get(k, 0)
                         for k in ("succeeded", "failed", "cancelled", "retried", "requeued")},
            "duration_ms": {"count": count, "mean": round(total / count, 1) if count else None,
                            "sum": total, "buckets": buckets},
        }

    async def jobs(self, queue: str, statuses: list[Status], limit: int) -> list[Job]:
        found: list[Job] = []
        for priority in await self.lanes(queue):
            async for job in self.queue(lane(queue, priority)).iter_jobs(statuses):
                found.append(job)
                if len(found) >= limit:
                    return found
        return found


def _abandoned(job: Job) -> bool:
    """An active job whose worker stopped answering: no heartbeat for `heartbeat` seconds, or
    still running one heartbeat period past its own timeout. (saq's `stuck` also says so the
    instant the timeout passes; but the worker enforces that timeout itself and records it as
    such, and a sweep at that same instant would take the job from it, recording a "worker
    stopped answering" instead.)"""
    elapsed = time.time() * 1000
    if job.heartbeat and elapsed - job.touched > job.heartbeat * 1000:
        return True
    grace = max(job.heartbeat, 1)
    return bool(job.timeout) and elapsed - job.started > (job.timeout + grace) * 1000


# The job record and its states, as the rest of the sidecar sees them: saq's own types, named
# here so that this adapter (with the runner that drives saq's records) is the only code that
# imports saq.
__all__ = ["CALLBACKS", "CANCELLED_BY_CLIENT", "CANCELLED_BY_OPERATOR", "REPLAY",
           "SCHEDULE_EVERY", "HandOff", "Job", "JobService", "QueueFull", "SidecarQueue",
           "Status", "Taken", "lane_key_parts", "saq_record"]
