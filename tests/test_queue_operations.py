"""What an operator does to queues and jobs (docs/jobs.md, "Queue operations"): pause, resume
and drain a queue, retry and cancel jobs in bulk, page through them, a queue's start rate, and
a client's delayed start.
Two in-process sidecars (workers both) on one real Redis, a real upstream."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import Origin, make_config, write_config
from test_jobs import Factory, admin, jobs_config, status_of, submit, wait_for

from sidecar.config import ConfigError, load_config


async def post(client: aiohttp.ClientSession, url: str, body: Any = None) -> dict[str, Any]:
    async with client.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


async def queues(client: aiohttp.ClientSession, sidecar: Any) -> dict[str, Any]:
    reply = await admin(client, sidecar, "GET", "/admin/queues")
    assert reply.status == 200
    return {q["name"]: q for q in reply.json()["queues"]}


async def test_pause_holds_a_queue_across_instances_and_restarts_and_resume_starts_it(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/api/r", body="done")
    a = await sidecar_factory(jobs_config(origin.url, redis_url), "a.yaml")
    b = await sidecar_factory(jobs_config(origin.url, redis_url), "b.yaml")
    assert await post(client, a.admin_url + "/admin/queues/work/pause") == {
        "queue": "work", "paused": True}
    accepted = [await submit(client, side, "/api/r") for side in (a, b, a, b, a)]
    # Each worker's loops look at the queue at least once a second: give them two.
    await asyncio.sleep(2.0)
    assert origin.calls["/api/r"] == 0
    listed = await queues(client, b)
    assert listed["work"]["paused"] is True and listed["work"]["queued"] == 5
    await a.runtime.stop()            # a restart keeps the pause (it is in Redis)
    c = await sidecar_factory(jobs_config(origin.url, redis_url), "c.yaml")
    assert (await queues(client, c))["work"]["paused"] is True
    await post(client, c.admin_url + "/admin/queues/work/resume")
    for job in accepted:
        assert (await wait_for(client, b, job))["status"] == "succeeded"
    assert origin.calls["/api/r"] == 5


async def test_drain_cancels_every_waiting_job_and_says_how_many(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/api/r", body="done")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url))
    await post(client, sidecar.admin_url + "/admin/queues/work/pause")
    accepted = [await submit(client, sidecar, "/api/r") for _ in range(4)]
    drained = await post(client, sidecar.admin_url + "/admin/queues/work/drain")
    assert drained == {"queue": "work", "cancelled": 4}
    for job in accepted:
        state = await wait_for(client, sidecar, job)
        assert state["status"] == "cancelled"
    await post(client, sidecar.admin_url + "/admin/queues/work/resume")
    assert (await post(client, sidecar.admin_url + "/admin/queues/work/drain"))["cancelled"] == 0
    assert origin.calls["/api/r"] == 0
    missing = await admin(client, sidecar, "POST", "/admin/queues/nope/pause")
    assert missing.status == 404 and "known: work" in missing.json()["detail"]


async def test_bulk_retry_and_cancel_take_the_filter_and_report_counts(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/api/a", status=500)
    origin.reply("/api/b", status=500)
    extra = [{"name": "other", "match": {"path": "/api/b"}, "upstream": "app",
              "offload": {"queue": "work", "attempts": 1}}]
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=1,
                                                extra_routes=extra))
    failing = [await submit(client, sidecar, "/api/a") for _ in range(3)]
    other = await submit(client, sidecar, "/api/b")
    for job in [*failing, other]:
        assert (await wait_for(client, sidecar, job))["status"] == "failed"
    origin.reply("/api/a", body="fixed")
    retried = await post(client, sidecar.admin_url + "/admin/jobs/retry",
                         {"route": "offloaded", "status": "failed"})
    assert retried == {"matched": 3, "retried": 3}
    for job in failing:
        assert (await wait_for(client, sidecar, job))["status"] == "succeeded"
    assert (await wait_for(client, sidecar, other))["status"] == "failed"  # another route

    await post(client, sidecar.admin_url + "/admin/queues/work/pause")
    waiting = [await submit(client, sidecar, "/api/a") for _ in range(2)]
    cancelled = await post(client, sidecar.admin_url + "/admin/jobs/cancel", {"queue": "work"})
    assert cancelled == {"matched": 2, "cancelled": 2}
    for job in waiting:
        assert (await wait_for(client, sidecar, job))["status"] == "cancelled"
    bad = await admin(client, sidecar, "POST", "/admin/jobs/retry?status=running")
    assert bad.status == 400 and "failed, cancelled" in bad.json()["detail"]


async def test_the_jobs_list_pages_newest_first_and_filters_by_time(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/api/r", body="done")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url))
    await post(client, sidecar.admin_url + "/admin/queues/work/pause")
    made = []
    for _ in range(7):
        made.append((await submit(client, sidecar, "/api/r"))["id"])
        await asyncio.sleep(0.002)   # distinct creation times, in ms
    seen, cursor, pages = [], None, 0
    while True:
        query = "/admin/jobs?status=queued&limit=3" + (f"&cursor={cursor}" if cursor else "")
        reply = (await admin(client, sidecar, "GET", query)).json()
        seen += [job["id"] for job in reply["jobs"]]
        pages += 1
        cursor = reply["next"]
        if cursor is None:
            break
    assert pages == 3 and seen == made[::-1]
    # Jobs created after the first page was read do not shift the next ones.
    created = [(await admin(client, sidecar, "GET", f"/admin/jobs/{i}")).json()["created_at"]
               for i in made]
    since = created[4]
    reply = (await admin(client, sidecar, "GET",
                         f"/admin/jobs?status=any&since={since}")).json()
    assert [job["id"] for job in reply["jobs"]] == made[:3:-1]
    bad = await admin(client, sidecar, "GET", "/admin/jobs?since=yesterday")
    assert bad.status == 400 and "RFC 3339" in bad.json()["detail"]


async def test_a_queue_rate_bounds_the_starts_in_any_period(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/api/r", body="done")
    def config() -> dict[str, Any]:
        return jobs_config(origin.url, redis_url,
                           queues={"work": {"concurrency": 20, "rate": "5/s"}})
    a = await sidecar_factory(config(), "a.yaml")
    b = await sidecar_factory(config(), "b.yaml")
    accepted = [await submit(client, side, "/api/r") for side in itertools.islice(
        itertools.cycle((a, b)), 14)]
    for job in accepted:
        assert (await wait_for(client, a, job))["status"] == "succeeded"
    starts = []
    for job in accepted:
        detail = (await admin(client, a, "GET", f"/admin/jobs/{job['id']}")).json()
        [attempt] = detail["history"]
        starts.append(datetime.fromisoformat(attempt["started_at"].replace("Z", "+00:00"))
                      .timestamp())
    starts.sort()
    # The window is kept on Redis's clock at the dequeue; a start as recorded is a few ms
    # after it (on the worker's clock): any 6 consecutive starts span about a second or more.
    assert all(later - first >= 0.95 for first, later in zip(starts, starts[5:], strict=False)
               ), [round(s - starts[0], 3) for s in starts]
    assert starts[-1] - starts[0] >= 2.0  # 14 starts at 5 a second: three windows at least
    assert (await queues(client, a))["work"]["rate"] == "5/s"


def test_a_queue_rate_must_be_whole_starts_per_period(tmp_path: Path) -> None:
    config = make_config("http://127.0.0.1:1", "redis://127.0.0.1:1",
                         queues={"work": {"rate": "2.5/s"}})
    with pytest.raises(ConfigError, match=r"queues\.work\.rate: expected a whole number"):
        load_config(write_config(tmp_path / "c.yaml", config))


# -- a later start ------------------------------------------------------------------------------


async def test_a_delayed_job_is_scheduled_and_starts_no_earlier_than_asked(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    arrived: list[float] = []

    async def answer(request: Any, n: int) -> Any:
        arrived.append(time.time())
        return web.Response(text="done")
    origin.script("/api/later", answer)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, max_delay="1h"))
    asked = time.time()
    accepted = await submit(client, sidecar, "/api/later",
                            headers={"Prefer": "respond-async, delay=1.5"})
    run_at = datetime.fromisoformat(accepted["run_at"].replace("Z", "+00:00")).timestamp()
    assert accepted["status"] == "scheduled" and abs(run_at - (asked + 1.5)) < 0.2
    state = await status_of(client, sidecar, accepted)
    assert state["status"] == "scheduled" and state["run_at"] == accepted["run_at"]
    assert state["started_at"] is None
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    [at] = arrived
    assert run_at <= at < run_at + 1.25, at - run_at
    assert "delay" not in origin.seen["/api/later"].get("Prefer", "")

    moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 600))
    later = await submit(client, sidecar, "/api/later",
                         headers={"Prefer": f"respond-async, run-at={moment}"})
    assert later["status"] == "scheduled" and later["run_at"] == moment.replace("Z", ".000Z")
    listed = (await admin(client, sidecar, "GET", "/admin/jobs?status=queued")).json()
    assert [job["id"] for job in listed["jobs"]] == [later["id"]]


@pytest.mark.parametrize(("prefer", "detail"), [
    ("delay=soon", "a number of seconds"),
    ("run-at=2026-12-07T02:00:00", "with its offset"),
    ("delay=7200", "at most 3600s (offload.max_delay)"),
])
async def test_a_start_the_route_cannot_give_is_refused(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession, prefer: str, detail: str) -> None:
    origin.reply("/api/later", body="done")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, max_delay="1h"))
    async with client.post(sidecar.url + "/api/later",
                           headers={"Prefer": f"respond-async, {prefer}"}) as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"] == "job_schedule_invalid" and detail in body["detail"]
    assert origin.calls["/api/later"] == 0
