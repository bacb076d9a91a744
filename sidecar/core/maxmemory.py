"""How much memory the embedded Redis may take (its `maxmemory`, with `noeviction`).

Redis's own eviction cannot tell a cached response from a job record: `allkeys-lru` would drop
queued jobs, `volatile-lru` idempotency keys and dedup locks (they have TTLs). So the sidecar
bounds the cache itself (stores/redis.py), and `maxmemory` is only the wall that keeps the whole
server from growing without end. It is sized so that what the config bounds always fits:

    maxmemory = cache quota + the largest L2 entry    (written before the oldest are evicted)
              + for each queue with max_queued that a route sends jobs to:
                    max_queued  x (max_body + head)       waiting: request body and record
                  + concurrency x (2 x max_body + head)   running: and the result being stored
              + headroom                                  what no setting bounds

`head` is the largest job record: the request head at its limits (server.limits), twice over
for its latin-1 turned JSON, and saq's own fields. What no setting bounds comes out of
`headroom`: idempotency records, dedup hand-offs, results of finished jobs (kept result_ttl),
jobs in backoff between attempts, jobs of queues without max_queued, breakers, rate limits, and
Redis's own buffers. Pure arithmetic, so the sizing is tested and documented without a Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# saq's JSON fields around the head (ids, status, timings, the spec's other keys) and the small
# side keys of a job (progress hash, slot lease, lane set member), generously.
JOB_FIELDS = 4096


@dataclass(frozen=True, slots=True)
class QueueNeed:
    """What one queue may hold at most: `max_body` is the largest `offload.max_body` of the
    routes that send jobs to it (None: no route does)."""

    name: str
    max_queued: int | None
    concurrency: int
    max_body: int | None


@dataclass(frozen=True, slots=True)
class Budget:
    cache: int
    jobs: int
    headroom: int
    # Queues that routes send jobs to without a max_queued: nothing bounds them, so no room is
    # set aside for them; they take from headroom, then submissions get 503.
    unbounded: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.cache + self.jobs + self.headroom


def job_head(max_request_line: int, max_header_size: int, max_headers: int) -> int:
    """The largest record of one job: its head as the edge lets it in, each byte of it up to
    two in JSON (latin-1 above 0x7f becomes two bytes of UTF-8; quotes are escaped), plus
    saq's fields."""
    return 2 * (max_request_line + max_headers * (max_header_size + 2)) + JOB_FIELDS


def budget(*, cache_quota: int, largest_entry: int, queues: Iterable[QueueNeed], head: int,
           headroom: int) -> Budget:
    jobs = 0
    unbounded = []
    for queue in queues:
        if queue.max_body is None:
            continue  # no route sends jobs to it
        if queue.max_queued is None:
            unbounded.append(queue.name)
            continue
        jobs += queue.max_queued * (queue.max_body + head)
        jobs += queue.concurrency * (2 * queue.max_body + head)
    return Budget(cache=cache_quota + largest_entry, jobs=jobs, headroom=headroom,
                  unbounded=tuple(sorted(unbounded)))
