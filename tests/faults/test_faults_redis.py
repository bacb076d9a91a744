"""Redis killed, paused and restarted under load: a real redis-server process (SIGKILL, SIGSTOP,
SIGCONT, a new process on the same port), an in-process sidecar, clients sending a mix of
cached, coalesced, breaker-guarded, plain and offloaded requests the whole time.

What must hold (docs/architecture.md "Redis", docs/jobs.md "Redis durability"): proxied requests
never fail for Redis's sake and a Redis that hangs delays them by a bounded time; the shared
features come back within seconds of Redis; a job answered 202 is never lost, and no job is
answered 202 while Redis is down.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from support import InProcessSidecar, Origin, RedisServer, make_config, until
from test_jobs import Reply, call, error_of

Factory = Callable[..., Awaitable[InProcessSidecar]]

KINDS = ("cached", "dedup", "guarded", "plain", "job")
KEYS = 6  # paths per kind
# The documented deployment for jobs (docs/jobs.md): nothing acknowledged is lost when the
# redis-server process dies.
DURABLE = ["--appendonly", "yes", "--appendfsync", "always"]
# A proxied request may wait for a hung Redis at most its command timeout (redis.connect_timeout,
# at least 1 s) before the sidecar goes on without it; the rest is slack for a busy machine.
HUNG_REDIS_BOUND = 3.0
PAUSE = 6.0  # long enough that a request waiting for the paused Redis shows beyond the bound
WAIT = 2  # the Prefer: wait=N of a client willing to wait for its job


def fault_config(origin: Origin, redis_url: str) -> dict[str, Any]:
    routes = [
        {"name": "cached", "match": {"path": "/cached/**"}, "upstream": "app",
         "cache": {"ttl": "60s"}},
        {"name": "dedup", "match": {"path": "/dedup/**"}, "upstream": "app",
         # A leader's lock outlives a Redis restart (persisted) by at most `lease`: keep it short.
         "dedup": {"scope": "cluster", "lease": "1s"}},
        {"name": "guarded", "match": {"path": "/guarded/**"}, "upstream": "app",
         "breaker": {"failures": 3, "scope": "cluster"}},
        {"name": "job", "match": {"path": "/job/**", "methods": ["POST"]}, "upstream": "app",
         "offload": {"queue": "work", "backoff": "50ms"}},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    return make_config(origin.url, redis_url, routes=routes,
                       queues={"work": {"concurrency": 4}},
                       jobs={"visibility_timeout": "2s", "sweep_interval": "1s"})


def script_origin(origin: Origin) -> set[str]:
    """Every answer is derived from the request (path and query, or a job's body), so a wrong
    body cannot pass for a right one; returns the job ids the origin ran."""
    ran: set[str] = set()

    async def answer(request: web.Request, n: int) -> web.Response:
        if request.path.startswith("/dedup/"):
            await asyncio.sleep(0.03)  # long enough for identical requests to coalesce
        return web.Response(text="origin " + request.path_qs)

    async def job(request: web.Request, n: int) -> web.Response:
        ran.add(request.headers["X-Sidecar-Job-Id"])
        return web.Response(text="done " + (await request.text()))

    for kind in KINDS:
        for key in range(KEYS):
            origin.script(f"/{kind}/{key}", job if kind == "job" else answer)
    return ran


def script_held_job(origin: Origin, ran: set[str], release: asyncio.Event) -> None:
    """/job/held: the origin runs such a job once `release` is set."""
    async def held_job(request: web.Request, n: int) -> web.Response:
        ran.add(request.headers["X-Sidecar-Job-Id"])
        await release.wait()
        return web.Response(text="done " + (await request.text()))

    origin.script("/job/held", held_job)


@dataclass
class Outcome:
    kind: str
    target: str
    started: float  # time.monotonic()
    seconds: float
    status: int | None = None  # None: the request raised
    headers: CIMultiDictProxy[str] = field(
        default_factory=lambda: CIMultiDictProxy(CIMultiDict()))
    body: bytes = b""
    expected: bytes = b""
    error: str = ""


async def send(session: aiohttp.ClientSession, url: str, kind: str, target: str) -> Outcome:
    """One request of the mix, timed; a job's body is new each time."""
    data: bytes | None = None
    if kind == "job":
        data = uuid.uuid4().hex.encode()
        expected = b"done " + data
    else:
        expected = b"origin " + target.encode()
    outcome = Outcome(kind, target, time.monotonic(), 0.0, expected=expected)
    try:
        async with session.request("POST" if data else "GET", url + target,
                                   data=data) as response:
            outcome.body = await response.read()
            outcome.status = response.status
            outcome.headers = response.headers
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        outcome.error = repr(exc)
    outcome.seconds = time.monotonic() - outcome.started
    return outcome


class Mix:
    """`loops` clients sending the mix of KINDS back to back until stopped; every outcome is
    kept. `gen` goes into the query of cached requests: bumping it makes fresh cache keys."""

    def __init__(self, url: str, loops: int = 6) -> None:
        self.url = url
        self.loops = loops
        self.gen = 0
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Mix:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.loops)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._session is not None
        await self._session.close()

    async def _loop(self, index: int) -> None:
        assert self._session is not None
        for n in itertools.count(index):
            if self._stop.is_set():
                return
            kind = KINDS[n % len(KINDS)]
            key = (n // len(KINDS)) % KEYS
            target = f"/{kind}/{key}" + (f"?gen={self.gen}" if kind == "cached" else "")
            self.outcomes.append(await send(self._session, self.url, kind, target))
            await asyncio.sleep(0.005)

    def of(self, *kinds: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind in kinds]

    def assert_proxied_clean(self, bound: float | None = None) -> None:
        """Every non-offloaded request answered 2xx with its own body (within `bound`)."""
        proxied = self.of("cached", "dedup", "guarded", "plain")
        assert len(proxied) >= 100, f"only {len(proxied)} proxied requests went through"
        failed = [o for o in proxied if o.status is None or o.status >= 300
                  or o.body != o.expected]
        assert failed == [], failed[:5]
        if bound is not None:
            slow = [o for o in self.outcomes if o.seconds > bound]
            assert slow == [], [(o.kind, o.target, o.status, round(o.seconds, 2))
                                for o in slow[:10]]


async def readyz(admin_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def redis_is(sidecar: InProcessSidecar, state: str) -> bool:
    return (await readyz(sidecar.admin_url))["redis"] == state


async def members(redis_url: str, pattern: str) -> set[bytes]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        return {key async for key in client.scan_iter(pattern)}
    finally:
        await client.aclose()


async def cached_uris(redis_url: str) -> set[str]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        index = await client.zrange("sidecar:cache:uris", 0, -1)
    finally:
        await client.aclose()
    return {m.decode().split("\0", 1)[0] for m in index}


async def assert_shared_state_resumes(sidecar: InProcessSidecar, mix: Mix,
                                      redis_url: str) -> None:
    """Within a few seconds of Redis answering again: /readyz says up, the cache writes L2
    entries for keys it had never seen, cluster dedup publishes results again, jobs are
    accepted again."""
    await until(lambda: redis_is(sidecar, "up"), 5)
    dedup_before = await members(redis_url, "sidecar:dedup:result:*")
    accepted_before = len([o for o in mix.of("job") if o.status == 202])
    mix.gen += 1
    gen = mix.gen

    async def l2_written() -> bool:
        return any(f"gen={gen}" in uri for uri in await cached_uris(redis_url))

    async def dedup_published() -> bool:
        return bool(await members(redis_url, "sidecar:dedup:result:*") - dedup_before)

    async def jobs_accepted() -> bool:
        return len([o for o in mix.of("job") if o.status == 202]) > accepted_before + 2

    await until(l2_written, 10)
    await until(dedup_published, 10)
    await until(jobs_accepted, 10)


async def result_when_succeeded(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                                job: dict[str, Any]) -> Reply:
    """The job's result, once its status says succeeded (its only way to end here)."""
    async def done() -> bool:
        reply = await call(client, "GET", sidecar.url + job["status_url"])
        assert reply.status in (200, 503), reply.body
        return reply.status == 200 and reply.json()["status"] == "succeeded"

    await until(done, 40)
    return await call(client, "GET", sidecar.url + job["result_url"])


async def assert_no_job_lost(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                             mix: Mix, ran: set[str]) -> None:
    """Every submission was a 202 or a 503 job_queue_unavailable; every 202 ends succeeded,
    run by the origin, with the result of its own request."""
    jobs = mix.of("job")
    other = [(o.status, o.body[:200], o.error) for o in jobs if o.status not in (202, 503)]
    assert other == []
    for refused in (o for o in jobs if o.status == 503):
        assert error_of(_reply(refused)) == "job_queue_unavailable"
    accepted = [o for o in jobs if o.status == 202]
    assert len(accepted) >= 10

    async def succeeded(outcome: Outcome) -> None:
        job = _reply(outcome).json()
        result = await result_when_succeeded(client, sidecar, job)
        assert (result.status, result.body) == (200, outcome.expected)
        assert job["id"] in ran

    await asyncio.gather(*(succeeded(o) for o in accepted))


def _reply(outcome: Outcome) -> Reply:
    assert outcome.status is not None
    return Reply(outcome.status, outcome.headers, outcome.body)


@pytest.fixture
def durable_redis(own_redis: RedisServer) -> RedisServer:
    own_redis.options = DURABLE
    own_redis.restart()
    return own_redis


@pytest.mark.slow
async def test_redis_killed_and_restarted_under_load(
        sidecar_factory: Factory, origin: Origin, durable_redis: RedisServer,
        client: aiohttp.ClientSession) -> None:
    ran = script_origin(origin)
    release = asyncio.Event()
    script_held_job(origin, ran, release)
    sidecar = await sidecar_factory(fault_config(origin, durable_redis.url))
    async with Mix(sidecar.url) as mix:
        await until(lambda: asyncio.sleep(0, len(mix.of("job")) >= 10), 10)
        # Jobs in Redis when it dies: four running (the queue's concurrency), two queued.
        held = [await call(client, "POST", sidecar.url + "/job/held", data=b"held %d" % i)
                for i in range(6)]
        assert [reply.status for reply in held] == [202] * 6
        await until(lambda: asyncio.sleep(0, origin.calls["/job/held"] == 4))
        durable_redis.kill()
        await until(lambda: redis_is(sidecar, "down"), 5)
        down_since = time.monotonic()
        await asyncio.sleep(1.5)
        down_until = time.monotonic()
        await asyncio.to_thread(durable_redis.start)  # the same port, its data reloaded
        await assert_shared_state_resumes(sidecar, mix, durable_redis.url)
        release.set()
    mix.assert_proxied_clean()
    while_down = [o for o in mix.of("job")
                  if o.started >= down_since and o.started + o.seconds <= down_until]
    assert while_down and {o.status for o in while_down} == {503}
    await assert_no_job_lost(client, sidecar, mix, ran)
    for i, reply in enumerate(held):
        result = await result_when_succeeded(client, sidecar, reply.json())
        assert (result.status, result.body) == (200, b"done held %d" % i)
        assert reply.json()["id"] in ran


async def timed(reply: Awaitable[Reply]) -> tuple[float, Reply]:
    started = time.monotonic()
    answer = await reply
    return time.monotonic() - started, answer


@pytest.mark.slow
async def test_a_paused_redis_delays_requests_a_bounded_time(
        sidecar_factory: Factory, origin: Origin, durable_redis: RedisServer,
        client: aiohttp.ClientSession) -> None:
    ran = script_origin(origin)
    release = asyncio.Event()

    async def held(request: web.Request, n: int) -> web.Response:
        await release.wait()
        return web.Response(text="origin " + request.path_qs)

    origin.script("/dedup/held", held)
    script_held_job(origin, ran, release)
    sidecar = await sidecar_factory(fault_config(origin, durable_redis.url))
    async with Mix(sidecar.url) as mix:
        await until(lambda: asyncio.sleep(0, len(mix.of("job")) >= 10), 10)
        job = _reply(next(o for o in mix.of("job") if o.status == 202)).json()
        # A cluster flight that took its lock, and publishes its answer once Redis is paused.
        leader = asyncio.create_task(send(client, sidecar.url, "dedup", "/dedup/held"))
        # A client waiting for its job (Prefer: wait), which looks at it once Redis is paused.
        waiting = asyncio.create_task(timed(call(
            client, "POST", sidecar.url + "/job/held", data=b"held",
            headers={"Prefer": f"wait={WAIT}"})))
        await until(lambda: asyncio.sleep(0, origin.calls["/dedup/held"] == 1
                                          and origin.calls["/job/held"] == 1))
        durable_redis.pause()  # connections hang: nothing is refused, nothing answers
        try:
            # Before the health check notices: both wait for the paused Redis.
            submitted = asyncio.create_task(send(client, sidecar.url, "job", "/job/0"))
            polled = asyncio.create_task(timed(call(client, "GET",
                                                    sidecar.url + job["status_url"])))
            released = time.monotonic()
            release.set()
            await until(lambda: redis_is(sidecar, "down"), 5)
            await asyncio.sleep(PAUSE)
        finally:
            durable_redis.resume()
        await assert_shared_state_resumes(sidecar, mix, durable_redis.url)
    # The leader answered although its publication waits for Redis.
    answered = await leader
    assert (answered.status, answered.body) == (200, answered.expected)
    after_release = answered.started + answered.seconds - released
    assert after_release < HUNG_REDIS_BOUND, after_release
    # The job queue is refused after a bounded wait, not after the pause.
    refused = await submitted
    assert refused.status == 503, (refused.status, refused.seconds)
    assert refused.seconds < HUNG_REDIS_BOUND, refused.seconds
    assert error_of(_reply(refused)) == "job_queue_unavailable"
    seconds, status = await polled
    assert status.status == 503, (status.status, seconds)
    assert seconds < HUNG_REDIS_BOUND, seconds
    assert error_of(status) == "job_queue_unavailable"
    # The client willing to wait WAIT seconds got its 202 after about that, not after the pause.
    seconds, accepted = await waiting
    assert accepted.status == 202, (accepted.status, accepted.body)
    assert seconds < WAIT + HUNG_REDIS_BOUND, seconds
    mix.assert_proxied_clean(bound=HUNG_REDIS_BOUND)
    await assert_no_job_lost(client, sidecar, mix, ran)
    result = await result_when_succeeded(client, sidecar, accepted.json())
    assert (result.status, result.body) == (200, b"done held")
    assert accepted.json()["id"] in ran
