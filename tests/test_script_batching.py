"""stores/batching.py against a real redis-server: the calls of one event-loop turn go as one
pipeline, each caller gets its own reply or its own error, and a script Redis forgot is loaded
again."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.retry import Retry
from saq.job import Job, Status
from support import RedisServer

from sidecar.core.jobs import lane
from sidecar.jobs.queue import SidecarQueue, lane_key_parts, saq_record
from sidecar.stores.batching import ScriptBatcher

PUSH = "redis.call('RPUSH', KEYS[1], ARGV[1]); return redis.call('LLEN', KEYS[1])"
FAIL_ON_X = "if ARGV[1] == 'x' then return redis.error_reply('no x') end; return ARGV[1]"


async def test_calls_of_one_turn_share_a_pipeline_and_each_gets_its_reply(redis_url: str
                                                                           ) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = ScriptBatcher(client)
    push = client.register_script(PUSH)
    try:
        replies = await asyncio.gather(*(batcher(push, ["list"], [str(i)]) for i in range(50)))
        assert sorted(replies) == list(range(1, 51))  # each call ran once, in one order
        assert await client.lrange("list", 0, -1) == [str(i).encode() for i in range(50)]
        assert batcher.batches == 1 and batcher.batched_calls == 50
        # A lone call goes on its own, no pipeline.
        assert await batcher(push, ["list"], ["last"]) == 51
        assert batcher.batches == 1
    finally:
        await batcher.close()
        await client.aclose()


async def test_an_error_reaches_only_its_caller(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = ScriptBatcher(client)
    echo = client.register_script(FAIL_ON_X)
    try:
        results = await asyncio.gather(batcher(echo, [], ["a"]), batcher(echo, [], ["x"]),
                                       batcher(echo, [], ["b"]), return_exceptions=True)
        assert results[0] == b"a" and results[2] == b"b"
        assert isinstance(results[1], ResponseError) and "no x" in str(results[1])
    finally:
        await batcher.close()
        await client.aclose()


async def test_a_script_redis_forgot_is_loaded_again(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    batcher = ScriptBatcher(client)
    push = client.register_script(PUSH)
    try:
        assert await batcher(push, ["l"], ["0"]) == 1  # loaded now
        await client.script_flush()  # as after a restart of Redis
        replies = await asyncio.gather(*(batcher(push, ["l"], [str(i)]) for i in range(5)))
        assert sorted(replies) == [2, 3, 4, 5, 6]
    finally:
        await batcher.close()
        await client.aclose()


async def test_a_connection_lost_fails_every_call_of_the_batch() -> None:
    # Nothing listens there; no retries, as the sidecar's own clients bound their waits.
    client = aioredis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    batcher = ScriptBatcher(client)
    push = client.register_script(PUSH)
    try:
        results = await asyncio.gather(*(batcher(push, ["l"], ["v"]) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results), results
    finally:
        await batcher.close()
        await client.aclose()


@pytest.mark.parametrize("priority", [0, 5, 12])
def test_lane_key_parts_name_saqs_queued_list(priority: int) -> None:
    """The scripts count a queue's waiting jobs from lanes named in Redis: the key they build
    must be the one saq's queue of that lane pushes to."""
    prefix, suffix = lane_key_parts("reports")
    queue = SidecarQueue(aioredis.Redis(), name=lane("reports", priority))
    assert f"{prefix}{priority}{suffix}" == queue.queued_key


async def test_a_hung_redis_fails_the_bounded_callers_only(own_redis: RedisServer) -> None:
    """A redis-server stopped (SIGSTOP) accepts nothing and answers nothing: the callers with
    a bound get TimeoutError when it is up, the one without keeps waiting and gets its reply
    once Redis runs again."""
    client = aioredis.Redis.from_url(own_redis.url)
    batcher = ScriptBatcher(client)
    push = client.register_script(PUSH)
    try:
        await batcher(push, ["hung"], ["warm"])  # connected, script loaded
        own_redis.pause()
        try:
            bounded = [asyncio.ensure_future(batcher(push, ["hung"], ["b"], within=0.2))
                       for _ in range(2)]
            patient = asyncio.ensure_future(batcher(push, ["hung"], ["p"]))
            results = await asyncio.gather(*bounded, return_exceptions=True)
            assert all(isinstance(r, TimeoutError) for r in results), results
            assert not patient.done()
        finally:
            own_redis.resume()
        assert await asyncio.wait_for(patient, 5) >= 2
    finally:
        await client.delete("hung")
        await batcher.close()
        await client.aclose()


@pytest.mark.parametrize("scheduled", [0, 1_800_000_000.25])
@pytest.mark.parametrize("backoff", [0, 0.0, 1.5])
def test_saq_record_is_what_saqs_job_gives(scheduled: float, backoff: float) -> None:
    """The enqueue builds saq's record without saq's Job: it must be the same record, which
    saq then reads back into the same Job."""
    queue = SidecarQueue(aioredis.Redis(), name=lane("reports", 5), dump=orjson.dumps,
                         load=orjson.loads)
    spec = {"route": "r", "head": "POST / HTTP/1.1\r\n\r\n", "has_body": True}
    fields: dict[str, Any] = dict(
        kwargs=spec, key="reports.5.abc", timeout=30, heartbeat=10, retries=3, ttl=600,
        retry_delay=backoff, retry_backoff=True, scheduled=scheduled, queued=1_700_000_000_123)
    job = Job("replay", **fields)
    job.queue = queue
    job.status = Status.QUEUED
    ours = saq_record(function="replay", queue=queue.name, status=Status.QUEUED.value, **fields)
    assert ours == job.to_dict()
    assert orjson.loads(queue.serialize(job)) == orjson.loads(orjson.dumps(ours))
    read = queue.deserialize(orjson.dumps(ours))
    assert read is not None and read.to_dict() == job.to_dict()
