"""Offloaded jobs end to end, from the client's side and the operator's: real Redis, the job
workers inside an in-process sidecar, the example backend (a report that takes seconds and
posts its progress) or a scripted origin, real HTTP clients. docs/jobs.md."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy
from support import Backend, InProcessSidecar, Origin, RedisServer, free_port, make_config, until
from yarl import URL

from sidecar.config import ConfigError, load_config

Factory = Callable[..., Awaitable[InProcessSidecar]]
FAST_JOBS = {"visibility_timeout": "2s", "sweep_interval": "1s"}
TERMINAL = ("succeeded", "failed", "cancelled")
VIEW_KEYS = {"id", "status", "progress", "message", "attempts", "created_at", "started_at",
             "finished_at", "error", "status_url", "result_url", "events_url"}


def jobs_config(upstream_url: str, redis_url: str, *, concurrency: int = 4,
                jobs: dict[str, Any] | None = None, queues: dict[str, Any] | None = None,
                extra_routes: list[dict[str, Any]] | None = None,
                **offload: Any) -> dict[str, Any]:
    """`/api/**` is offloaded to the queue `work`; everything else is proxied as usual."""
    offload.setdefault("queue", "work")
    offload.setdefault("backoff", "50ms")
    routes = [
        *(extra_routes or []),
        {"name": "offloaded", "match": {"path": "/api/**"}, "upstream": "app",
         "offload": offload},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    return make_config(upstream_url, redis_url, routes=routes,
                       queues=queues or {"work": {"concurrency": concurrency}},
                       jobs={**FAST_JOBS, **(jobs or {})})


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(client: aiohttp.ClientSession, method: str, url: str, *,
               data: Any = None, headers: dict[str, str] | None = None,
               json_body: Any = None) -> Reply:
    async with client.request(method, URL(url, encoded=True), data=data,
                              headers=headers or {}, json=json_body) as response:
        return Reply(response.status, response.headers, await response.read())


async def submit(client: aiohttp.ClientSession, sidecar: InProcessSidecar, path: str,
                 body: bytes = b"{}", headers: dict[str, str] | None = None,
                 method: str = "POST") -> dict[str, Any]:
    """Send a request to an offloaded route; the 202's JSON."""
    reply = await call(client, method, sidecar.url + path, data=body, headers=headers)
    assert reply.status == 202, reply.body
    accepted: dict[str, Any] = reply.json()
    assert reply.headers["Location"] == accepted["status_url"]
    return accepted


async def status_of(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                    accepted: dict[str, Any], headers: dict[str, str] | None = None
                    ) -> dict[str, Any]:
    reply = await call(client, "GET", sidecar.url + accepted["status_url"], headers=headers)
    assert reply.status == 200, reply.body
    found: dict[str, Any] = reply.json()
    return found


async def wait_for(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                   accepted: dict[str, Any], statuses: tuple[str, ...] = TERMINAL,
                   headers: dict[str, str] | None = None,
                   timeout: float = 20.0) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses`; its last view."""
    last: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal last
        last = await status_of(client, sidecar, accepted, headers)
        return last["status"] in statuses

    await until(reached, timeout)
    return last


async def result_of(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                    accepted: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    return await call(client, "GET", sidecar.url + accepted["result_url"], headers=headers)


async def admin(client: aiohttp.ClientSession, sidecar: InProcessSidecar, method: str,
                path: str) -> Reply:
    return await call(client, method, sidecar.admin_url + path)


async def queue_stats(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                      queue: str = "work") -> dict[str, Any]:
    reply = await admin(client, sidecar, "GET", "/admin/stats")
    assert reply.status == 200
    stats: dict[str, Any] = reply.json()["jobs"]["queues"][queue]
    return stats


async def read_events(client: aiohttp.ClientSession, url: str,
                      headers: dict[str, str] | None = None,
                      timeout: float = 20.0) -> list[tuple[str, str, dict[str, Any]]]:
    """Every SSE frame of a stream, read until the server ends it: (event, id, data). A
    `status` event's id must be the ETag of its data, unquoted (docs/jobs.md)."""
    frames: list[tuple[str, str, dict[str, Any]]] = []
    async with client.get(url, headers=headers or {}) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        event, number = "", ""
        async with asyncio.timeout(timeout):  # the stream must end by itself
            async for raw in stream.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("id: "):
                    number = line[len("id: "):]
                elif line.startswith("data: "):
                    data = line[len("data: "):].encode()
                    if event == "status":
                        assert number == hashlib.blake2b(data, digest_size=12).hexdigest()
                    frames.append((event, number, json.loads(data)))
                    event, number = "", ""
    return frames


def error_of(reply: Reply) -> str:
    data = reply.json()
    assert set(data) == {"error", "detail", "request_id"}, data
    assert data["request_id"] == reply.headers["X-Request-ID"]
    return str(data["error"])


def holding(release: asyncio.Event, started: asyncio.Event | None = None,
            closed: asyncio.Event | None = None, text: str = "held"
            ) -> Callable[[web.Request, int], Awaitable[web.StreamResponse]]:
    """An origin answer held back until `release`; notes when the sidecar hangs up.

    aiohttp does not cancel a handler whose client went away, so the transport is watched."""
    async def answer(request: web.Request, n: int) -> web.Response:
        await request.read()
        if started is not None:
            started.set()
        while not release.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                if closed is not None:
                    closed.set()
                break
            await asyncio.sleep(0.02)
        return web.Response(text=f"{text} #{n}")

    return answer


# -- the client's flow ------------------------------------------------------------------------


async def test_full_flow_with_progress_etag_and_the_upstreams_result(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url))
    body = os.urandom(64 * 1024)
    reply = await call(client, "POST", sidecar.url + "/api/reports?seconds=1.5", data=body,
                       headers={"Content-Type": "application/octet-stream"})
    assert reply.status == 202, reply.body
    accepted = reply.json()
    job_id = accepted["id"]
    assert set(accepted) == {"id", "status", "status_url", "result_url", "events_url"}
    assert accepted["status"] == "queued"
    assert reply.headers["Location"] == accepted["status_url"] == f"/_sidecar/jobs/{job_id}"
    assert accepted["result_url"] == f"/_sidecar/jobs/{job_id}/result"
    assert accepted["events_url"] == f"/_sidecar/jobs/{job_id}/events"
    assert int(reply.headers["Retry-After"]) >= 1
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["X-Sidecar-Job-Id"] == job_id

    statuses: list[str] = []
    progress: list[int] = []
    etag: str | None = None
    state: dict[str, Any] = {}
    for _ in range(1500):
        step = await call(client, "GET", sidecar.url + accepted["status_url"])
        assert step.status == 200
        state = step.json()
        assert set(state) == VIEW_KEYS
        etag = step.headers["ETag"]
        if not statuses or statuses[-1] != state["status"]:
            statuses.append(state["status"])
        if not progress or progress[-1] != state["progress"]:
            progress.append(state["progress"])
        if state["status"] in TERMINAL:
            break
        await asyncio.sleep(0.02)
    assert statuses in (["queued", "running", "succeeded"], ["running", "succeeded"]), statuses
    assert progress == sorted(progress) and len(set(progress)) == len(progress), progress
    assert progress[-1] == 100
    assert len([p for p in progress if 0 < p < 100]) >= 2, progress
    assert state["attempts"] == 1 and state["error"] is None
    assert state["message"] == "step 5/5"
    assert state["created_at"] <= state["started_at"] <= state["finished_at"]

    # Nothing changes any more: the last ETag gives 304, another one the full view.
    assert etag is not None
    same = await call(client, "GET", sidecar.url + accepted["status_url"],
                      headers={"If-None-Match": etag})
    assert same.status == 304 and same.body == b""
    assert same.headers["ETag"] == etag
    for listed in (f'"other", {etag}', "W/" + etag, "*"):
        also = await call(client, "GET", sidecar.url + accepted["status_url"],
                          headers={"If-None-Match": listed})
        assert also.status == 304, listed
    other = await call(client, "GET", sidecar.url + accepted["status_url"],
                       headers={"If-None-Match": '"something-else"'})
    assert other.status == 200 and other.json() == state

    result = await result_of(client, sidecar, accepted)
    assert result.status == 200
    assert result.headers["Content-Type"] == "application/json; charset=utf-8"
    assert result.headers["X-Sidecar-Job-Id"] == job_id
    assert int(result.headers["Content-Length"]) == len(result.body)
    assert result.json() == {"report": "ready", "request_bytes": len(body),
                             "digest": hashlib.sha256(body).hexdigest()}
    again = await result_of(client, sidecar, accepted)
    assert (again.status, again.body) == (200, result.body)  # read as often as wanted
    assert backend.calls("POST /api/reports") == 1


async def test_the_result_keeps_a_non_200_status_headers_and_bytes(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    payload = bytes(range(256)) * 300 + b"\r\n\r\n\x00"
    sent = os.urandom(5000)
    seen: dict[str, Any] = {}

    async def created(request: web.Request, n: int) -> web.StreamResponse:
        seen["method"] = request.method
        seen["raw_path"] = request.raw_path
        seen["headers"] = request.headers.copy()
        seen["body"] = await request.read()
        response = web.Response(status=201, reason="Made It", body=payload, headers={
            "Content-Type": "application/x-export", "X-Export": "e-42",
            "Location": "/exports/42"})
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    origin.script("/api/exports/42", created)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url))
    accepted = await submit(client, sidecar, "/api/exports/42?format=bin&x=%2F&y=a+b", sent, {
        "Prefer": "respond-async", "X-Client": "c-1",
        "Content-Type": "application/octet-stream"}, method="PUT")
    state = await wait_for(client, sidecar, accepted)
    assert state["status"] == "succeeded", state
    result = await result_of(client, sidecar, accepted)
    assert result.status == 201
    assert result.headers["Content-Type"] == "application/x-export"
    assert result.headers["X-Export"] == "e-42"
    assert result.headers["Location"] == "/exports/42"
    assert result.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert result.body == payload

    # What the upstream got: the client's request, plus the job's headers.
    assert seen["method"] == "PUT"
    assert seen["raw_path"] == "/api/exports/42?format=bin&x=%2F&y=a+b"
    assert seen["body"] == sent
    headers = seen["headers"]
    assert headers["Content-Length"] == str(len(sent))
    assert headers["X-Client"] == "c-1"
    assert headers["X-Sidecar-Job-Id"] == accepted["id"]
    assert headers["X-Sidecar-Progress-URL"] == (
        f"{sidecar.admin_url}/internal/jobs/{accepted['id']}/progress")
    assert headers["X-Sidecar-Progress-Token"]
    assert "Prefer" not in headers  # respond-async is the sidecar's, not the upstream's
    assert origin.calls["/api/exports/42"] == 1


async def test_a_chunked_upstream_answer_is_stored_whole(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    pieces = [os.urandom(1000) for _ in range(20)]

    async def chunked(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-pieces"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    origin.script("/api/pieces", chunked)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url))
    accepted = await submit(client, sidecar, "/api/pieces")
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    result = await result_of(client, sidecar, accepted)
    assert result.status == 200
    assert result.body == b"".join(pieces)
    assert "Transfer-Encoding" not in result.headers
    assert result.headers["Content-Length"] == str(len(result.body))
    # The same through Prefer: wait.
    waited = await call(client, "POST", sidecar.url + "/api/pieces", headers={"Prefer": "wait=10"})
    assert waited.status == 200 and waited.body == b"".join(pieces)


async def test_a_get_with_a_query_and_no_body_is_replayed(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url))
    reply = await call(client, "GET", sidecar.url + "/api/slow?delay=0.2")
    assert reply.status == 202
    accepted = reply.json()
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    result = await result_of(client, sidecar, accepted)
    assert result.status == 200 and result.json() == {"slept": 0.2}


async def test_events_stream_the_changes_and_end_after_the_last(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url))
    accepted = await submit(client, sidecar, "/api/reports?seconds=1.5", b"x" * 100)
    frames = await read_events(client, sidecar.url + accepted["events_url"])
    assert frames, "no event at all"
    assert {event for event, _, _ in frames} == {"status"}
    ids = [number for _, number, _ in frames]
    assert len(set(ids)) == len(ids)  # each status its own id
    views = [data for _, _, data in frames]
    assert all(set(v) == VIEW_KEYS and v["id"] == accepted["id"] for v in views)
    statuses = [v["status"] for v in views]
    collapsed = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert collapsed in (["queued", "running", "succeeded"], ["running", "succeeded"]), statuses
    progress = [v["progress"] for v in views]
    assert progress == sorted(progress), progress
    assert len({p for p in progress if 0 < p < 100}) >= 2, progress
    assert all(a != b for a, b in itertools.pairwise(views))  # changes only
    # The last frame is what a poll says now, and its id that answer's ETag.
    assert views[-1] == await status_of(client, sidecar, accepted)
    polled = await call(client, "GET", sidecar.url + accepted["status_url"])
    assert polled.headers["ETag"] == f'"{ids[-1]}"'
    # A stream opened once the job is over: one frame, then the end.
    late = await read_events(client, sidecar.url + accepted["events_url"], timeout=5)
    assert [data for _, _, data in late] == [views[-1]]


async def test_events_and_polling_see_the_same_changes(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url))
    accepted = await submit(client, sidecar, "/api/reports?seconds=2")
    polled: list[tuple[str, int]] = []

    async def poll() -> None:
        while True:
            state = await status_of(client, sidecar, accepted)
            seen = (state["status"], state["progress"])
            if not polled or polled[-1] != seen:
                polled.append(seen)
            if state["status"] in TERMINAL:
                return
            await asyncio.sleep(0.02)

    frames, _ = await asyncio.gather(
        read_events(client, sidecar.url + accepted["events_url"]), poll())
    streamed = [(data["status"], data["progress"]) for _, _, data in frames]
    assert streamed[-1] == polled[-1] == ("succeeded", 100)
    # Progress is reported every 0.4 s: both see each running step (the first may be missed
    # by whichever started later, and a step may be merged into the final state).
    running_streamed = {p for s, p in streamed if s == "running" and p > 20}
    running_polled = {p for s, p in polled if s == "running" and p > 20}
    assert {40, 60, 80} <= running_streamed, streamed
    assert {40, 60, 80} <= running_polled, polled


async def test_prefer_wait_gives_the_real_response_of_a_quick_job(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url))
    quick = await call(client, "POST", sidecar.url + "/api/reports?seconds=0.5", data=b"abcd",
                       headers={"Prefer": "wait=5"})
    assert quick.status == 200, quick.body
    assert quick.json() == {"report": "ready", "request_bytes": 4,
                            "digest": hashlib.sha256(b"abcd").hexdigest()}
    assert quick.headers["Content-Type"] == "application/json; charset=utf-8"
    assert quick.headers["Preference-Applied"] == "wait=5"
    assert "Location" not in quick.headers
    job_id = quick.headers["X-Sidecar-Job-Id"]
    job = {"status_url": f"/_sidecar/jobs/{job_id}",
           "result_url": f"/_sidecar/jobs/{job_id}/result"}
    assert (await status_of(client, sidecar, job))["status"] == "succeeded"
    stored = await result_of(client, sidecar, job)
    assert (stored.status, stored.body) == (200, quick.body)

    slow = await call(client, "POST", sidecar.url + "/api/reports?seconds=3", data=b"abcd",
                      headers={"Prefer": "wait=1"})
    assert slow.status == 202, slow.body
    accepted = slow.json()
    assert slow.headers["Location"] == accepted["status_url"]
    assert "Preference-Applied" not in slow.headers
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    assert backend.calls("POST /api/reports") == 2


async def test_prefer_wait_is_capped_by_max_wait(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url,
                                                jobs={"max_wait": "1s"}))
    # Waiting 30 s would see the job end (after 2.5 s): the cap makes it a 202.
    reply = await call(client, "POST", sidecar.url + "/api/reports?seconds=2.5",
                       headers={"Prefer": "wait=30"})
    assert reply.status == 202, reply.body
    assert (await wait_for(client, sidecar, reply.json()))["status"] == "succeeded"


async def test_prefer_mode_offloads_only_when_asked(sidecar_factory: Factory, origin: Origin,
                                                    redis_url: str, client) -> None:
    origin.reply("/api/thing", status=200, headers={"X-Thing": "t"}, body="direct")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, mode="prefer"))
    direct = await call(client, "POST", sidecar.url + "/api/thing", data=b"1")
    assert direct.status == 200 and direct.body == b"direct"
    assert direct.headers["X-Thing"] == "t"
    assert "X-Sidecar-Job-Id" not in direct.headers
    assert "X-Sidecar-Job-Id" not in origin.seen["/api/thing"]
    assert origin.calls["/api/thing"] == 1

    asked = await call(client, "POST", sidecar.url + "/api/thing", data=b"1",
                       headers={"Prefer": "respond-async"})
    assert asked.status == 202, asked.body
    assert asked.headers["Preference-Applied"] == "respond-async"
    accepted = asked.json()
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    result = await result_of(client, sidecar, accepted)
    assert result.body == b"direct" and result.headers["X-Thing"] == "t"
    assert origin.seen["/api/thing"]["X-Sidecar-Job-Id"] == accepted["id"]
    assert origin.calls["/api/thing"] == 2



async def test_prefer_wait_on_a_job_that_fails_answers_202_with_its_status(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    origin.reply("/api/broken", status=500, body="boom")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=1))
    reply = await call(client, "POST", sidecar.url + "/api/broken", headers={"Prefer": "wait=10"})
    assert reply.status == 202, reply.body  # the upstream's 500 is not a result
    accepted = reply.json()
    assert reply.headers["Location"] == accepted["status_url"]
    assert accepted["status"] == "failed"  # not "queued": it is over
    state = await status_of(client, sidecar, accepted)
    assert state["status"] == "failed" and "500" in state["error"]
    assert origin.calls["/api/broken"] == 1


async def test_a_custom_jobs_path(sidecar_factory: Factory, origin: Origin, redis_url: str,
                                  client) -> None:
    origin.reply("/api/thing", body="thing")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url,
                                                jobs={"path": "/jobs/v1"}))
    accepted = await submit(client, sidecar, "/api/thing")
    assert accepted["status_url"] == "/jobs/v1/" + accepted["id"]
    assert accepted["result_url"] == "/jobs/v1/" + accepted["id"] + "/result"
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    assert (await result_of(client, sidecar, accepted)).body == b"thing"
    # The default path is not the sidecar's any more: proxied like any other.
    other = await call(client, "GET", sidecar.url + "/_sidecar/jobs/" + accepted["id"])
    assert other.status == 404 and other.body == b"not scripted"
    assert origin.calls["/_sidecar/jobs/" + accepted["id"]] == 1


async def test_queue_concurrency_bounds_the_upstream_calls_in_flight(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    in_flight = 0
    most = 0

    async def slow(request: web.Request, n: int) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.5)
        finally:
            in_flight -= 1
        return web.Response(text=f"job {n}")

    origin.script("/api/slow", slow)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, concurrency=2))
    jobs = [await submit(client, sidecar, "/api/slow") for _ in range(6)]
    states = [await wait_for(client, sidecar, job) for job in jobs]
    assert [s["status"] for s in states] == ["succeeded"] * 6
    assert most == 2, most
    bodies = {(await result_of(client, sidecar, job)).body for job in jobs}
    assert bodies == {f"job {n}".encode() for n in range(1, 7)}

# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_a_queued_job_it_never_reaches_the_upstream(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    release, started = asyncio.Event(), asyncio.Event()
    origin.script("/api/long", holding(release, started))
    origin.reply("/api/queued", body="should not run")
    origin.reply("/api/after", body="after")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, concurrency=1))
    long = await submit(client, sidecar, "/api/long")
    async with asyncio.timeout(10):
        await started.wait()
    queued = await submit(client, sidecar, "/api/queued")
    assert (await status_of(client, sidecar, queued))["status"] == "queued"

    cancelled = await call(client, "DELETE", sidecar.url + queued["status_url"])
    assert cancelled.status == 200, cancelled.body
    view = cancelled.json()
    assert (view["status"], view["error"]) == ("cancelled", "cancelled")
    assert view["finished_at"] is not None and view["started_at"] is None
    assert (await status_of(client, sidecar, queued))["status"] == "cancelled"
    gone = await result_of(client, sidecar, queued)
    assert gone.status == 409 and error_of(gone) == "job_finished"

    release.set()
    assert (await wait_for(client, sidecar, long))["status"] == "succeeded"
    # The queue is first come first served: once a later job ran, the cancelled one never will.
    after = await submit(client, sidecar, "/api/after")
    assert (await wait_for(client, sidecar, after))["status"] == "succeeded"
    assert origin.calls["/api/queued"] == 0
    assert (await status_of(client, sidecar, queued))["status"] == "cancelled"
    again = await call(client, "DELETE", sidecar.url + queued["status_url"])
    assert again.status == 409 and error_of(again) == "job_finished"
    stats = await queue_stats(client, sidecar)
    assert stats["outcomes"]["cancelled"] == 1
    assert stats["outcomes"]["succeeded"] == 2


async def test_cancel_a_running_job_cuts_the_upstream_call(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    release, started, closed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    origin.script("/api/long", holding(release, started, closed))
    origin.reply("/api/next", body="next")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, concurrency=1))
    running = await submit(client, sidecar, "/api/long")
    async with asyncio.timeout(10):
        await started.wait()
    assert (await status_of(client, sidecar, running))["status"] == "running"
    stats = (await admin(client, sidecar, "GET", "/admin/stats")).json()["jobs"]
    assert stats["running_here"] == 1 and stats["queues"]["work"]["running"] == 1
    stream = asyncio.create_task(read_events(client, sidecar.url + running["events_url"]))
    await asyncio.sleep(0.2)

    reply = await call(client, "DELETE", sidecar.url + running["status_url"])
    assert reply.status in (200, 202), reply.body
    assert reply.json()["status"] in ("running", "cancelled")
    state = await wait_for(client, sidecar, running, timeout=10)
    assert (state["status"], state["error"]) == ("cancelled", "cancelled")
    async with asyncio.timeout(10):
        await closed.wait()  # the upstream saw the connection go
    assert not release.is_set()
    frames = await stream  # the stream ends with the cancellation
    assert frames[0][2]["status"] == "running" and frames[-1][2]["status"] == "cancelled"
    result = await result_of(client, sidecar, running)
    assert result.status == 409 and error_of(result) == "job_finished"
    # Over now: nothing to cancel; and the queue's only slot is free again.
    again = await call(client, "DELETE", sidecar.url + running["status_url"])
    assert again.status == 409 and error_of(again) == "job_finished"
    following = await submit(client, sidecar, "/api/next")
    assert (await wait_for(client, sidecar, following))["status"] == "succeeded"
    assert origin.calls["/api/long"] == 1  # a cancelled job is not retried
    stats = await queue_stats(client, sidecar)
    assert stats["outcomes"]["cancelled"] == 1
    assert stats["running"] == 0 and stats["slots_in_use"] == 0


async def test_cancel_a_job_waiting_out_its_backoff(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    origin.reply("/api/flaky", status=503, body="busy")
    # An hour of backoff (with full jitter, a random part of it): the retry waits.
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=3,
                                                backoff="1h"))
    accepted = await submit(client, sidecar, "/api/flaky")

    async def failed_once() -> bool:
        state = await status_of(client, sidecar, accepted)
        return state["attempts"] == 1 and state["status"] == "queued"

    await until(failed_once, 10)
    assert (await queue_stats(client, sidecar))["waiting_retry"] == 1
    reply = await call(client, "DELETE", sidecar.url + accepted["status_url"])
    assert reply.status == 200, reply.body
    assert reply.json()["status"] == "cancelled"
    assert (await status_of(client, sidecar, accepted))["status"] == "cancelled"
    stats = await queue_stats(client, sidecar)
    assert stats["waiting_retry"] == 0 and stats["queued"] == 0
    assert stats["outcomes"]["cancelled"] == 1
    listed = (await admin(client, sidecar, "GET", "/admin/jobs?status=cancelled")).json()
    assert [j["id"] for j in listed["jobs"]] == [accepted["id"]]

    # The admin runs it again, from its first attempt, once the upstream is fixed.
    origin.reply("/api/flaky", body="fine now")
    retried = await admin(client, sidecar, "POST", f"/admin/jobs/{accepted['id']}/retry")
    assert retried.status == 200, retried.body
    state = await wait_for(client, sidecar, accepted)
    # A new set of attempts; the count, like the history, goes on from the first one.
    assert (state["status"], state["attempts"]) == ("succeeded", 2)
    assert (await result_of(client, sidecar, accepted)).body == b"fine now"
    assert origin.calls["/api/flaky"] == 2



async def test_cancels_racing_the_end_of_jobs_leave_each_in_one_state(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    """A DELETE sent just as the upstream answers: the job ends either succeeded (the DELETE
    says 409, the result is there) or cancelled (200, no result), and is counted once."""
    count = 30
    answers: list[tuple[str, int, str]] = []
    pending: list[asyncio.Task[None]] = []
    urls: dict[str, str] = {}

    async def delete(job_id: str) -> None:
        reply = await call(client, "DELETE", urls["base"] + "/_sidecar/jobs/" + job_id)
        answers.append((job_id, reply.status, reply.json().get("status") or error_of(reply)))

    async def answer(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(1.1)
        pending.append(asyncio.create_task(delete(request.headers["X-Sidecar-Job-Id"])))
        await asyncio.sleep((n % 5) / 1000)  # the DELETE lands around the job's end
        return web.Response(text=f"done {n}")

    origin.script("/api/race", answer)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, concurrency=count))
    urls["base"] = sidecar.url
    jobs = [await submit(client, sidecar, "/api/race") for _ in range(count)]
    finals = {}
    for job in jobs:
        state = await wait_for(client, sidecar, job)
        finals[job["id"]] = (state["status"], (await result_of(client, sidecar, job)).status)
    await until(lambda: _done(answers, count), 20)
    await asyncio.gather(*pending)
    for job_id, status, said in answers:
        if finals[job_id] == ("succeeded", 200):
            assert (status, said) == (409, "job_finished"), (status, said)
        else:
            assert finals[job_id] == ("cancelled", 409), finals[job_id]
            assert (status, said) == (200, "cancelled"), (status, said)
    outcomes = (await queue_stats(client, sidecar))["outcomes"]
    assert outcomes["succeeded"] + outcomes["cancelled"] == count, outcomes
    assert outcomes["succeeded"] == sum(f == ("succeeded", 200) for f in finals.values())


async def _done(answers: list[Any], count: int) -> bool:
    return len(answers) >= count

# -- who may see a job ------------------------------------------------------------------------


async def test_only_the_creator_sees_and_cancels_a_job(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url))
    creator = {"Cookie": "session=alice"}
    accepted = await submit(client, sidecar, "/api/reports?seconds=1.5", b"mine", creator)
    others: list[dict[str, str]] = [
        {}, {"Cookie": "session=mallory"}, {"Authorization": "Bearer alice"},
        {"Cookie": "session=alice", "Authorization": "Bearer alice"},
        {"Cookie": "session=Alice"},
    ]
    assert (await status_of(client, sidecar, accepted, creator))["status"] in (
        "queued", "running")
    for other in others:
        for method, url in (("GET", accepted["status_url"]), ("HEAD", accepted["status_url"]),
                            ("GET", accepted["result_url"]), ("GET", accepted["events_url"]),
                            ("DELETE", accepted["status_url"])):
            reply = await call(client, method, sidecar.url + url, headers=other)
            assert reply.status == 404, (other, method, url)
            if method != "HEAD":
                assert error_of(reply) == "job_not_found"
    # None of those touched it: it runs to the end, for its creator.
    state = await wait_for(client, sidecar, accepted, headers=creator)
    assert state["status"] == "succeeded"
    result = await result_of(client, sidecar, accepted, creator)
    assert result.status == 200 and result.json()["request_bytes"] == 4
    frames = await read_events(client, sidecar.url + accepted["events_url"], creator, 5)
    assert frames[-1][2]["status"] == "succeeded"
    stranger = await result_of(client, sidecar, accepted, {"Cookie": "session=mallory"})
    assert stranger.status == 404
    finished = await call(client, "DELETE", sidecar.url + accepted["status_url"],
                          headers=creator)
    assert finished.status == 409


async def test_a_bearer_client_sees_its_job_across_connections(
        sidecar_factory: Factory, origin: Origin, redis_url: str) -> None:
    origin.reply("/api/thing", body="for bob")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url))
    bob = {"Authorization": "Bearer bob-token"}
    async with aiohttp.ClientSession() as first:
        accepted = await submit(first, sidecar, "/api/thing", headers=bob)
    async with aiohttp.ClientSession() as second:
        assert (await wait_for(second, sidecar, accepted, headers=bob))["status"] == "succeeded"
        assert (await result_of(second, sidecar, accepted, bob)).body == b"for bob"
        other = await result_of(second, sidecar, accepted, {"Authorization": "Bearer eve"})
        assert other.status == 404


# -- retries and failures ---------------------------------------------------------------------


async def test_5xx_twice_then_200_succeeds_on_the_third_attempt(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    job_ids: list[str] = []

    async def flaky(request: web.Request, n: int) -> web.Response:
        job_ids.append(request.headers["X-Sidecar-Job-Id"])
        if n <= 2:
            return web.Response(status=503, text="busy")
        return web.Response(status=200, text=f"done on call {n}")

    origin.script("/api/flaky", flaky)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=3))
    accepted = await submit(client, sidecar, "/api/flaky")
    state = await wait_for(client, sidecar, accepted)
    assert (state["status"], state["attempts"], state["error"]) == ("succeeded", 3, None)
    assert origin.calls["/api/flaky"] == 3
    assert job_ids == [accepted["id"]] * 3  # the same job each time
    result = await result_of(client, sidecar, accepted)
    assert (result.status, result.body) == (200, b"done on call 3")
    outcomes = (await queue_stats(client, sidecar))["outcomes"]
    assert (outcomes["retried"], outcomes["succeeded"], outcomes["failed"]) == (2, 1, 0)


async def test_always_5xx_fails_then_the_admin_lists_and_retries_it(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    origin.reply("/api/down", status=503, body="unavailable")
    origin.reply("/api/fine", body="fine")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=2))
    fine = await submit(client, sidecar, "/api/fine")
    accepted = await submit(client, sidecar, "/api/down", b"payload")
    state = await wait_for(client, sidecar, accepted)
    assert (state["status"], state["attempts"]) == ("failed", 2)
    assert "503" in state["error"] and "Traceback" not in state["error"]
    assert state["finished_at"] is not None
    assert origin.calls["/api/down"] == 2
    result = await result_of(client, sidecar, accepted)
    assert result.status == 409 and error_of(result) == "job_finished"
    assert "503" in result.json()["detail"]
    assert (await wait_for(client, sidecar, fine))["status"] == "succeeded"

    listed = await admin(client, sidecar, "GET", "/admin/jobs?status=failed")
    assert listed.status == 200
    jobs = listed.json()["jobs"]
    assert [j["id"] for j in jobs] == [accepted["id"]]  # not the succeeded one
    assert jobs[0]["route"] == "offloaded" and jobs[0]["method"] == "POST"
    assert jobs[0]["target"] == "/api/down" and jobs[0]["max_attempts"] == 2
    assert "503" in jobs[0]["error_detail"]
    detail = await admin(client, sidecar, "GET", f"/admin/jobs/{accepted['id']}")
    assert detail.status == 200 and detail.json()["status"] == "failed"
    created_at = detail.json()["created_at"]
    unknown = await admin(client, sidecar, "GET", "/admin/jobs/work.5." + "z" * 24)
    assert unknown.status == 404
    bad = await admin(client, sidecar, "GET", "/admin/jobs?status=whatever")
    assert bad.status == 400

    origin.reply("/api/down", body="fixed")
    retried = await admin(client, sidecar, "POST", f"/admin/jobs/{accepted['id']}/retry")
    assert retried.status == 200, retried.body
    assert retried.json()["status"] in ("queued", "running", "succeeded")
    state = await wait_for(client, sidecar, accepted)
    # Two failed attempts, then the retried one: the count goes on, the creation time stays.
    assert (state["status"], state["attempts"], state["error"]) == ("succeeded", 3, None)
    assert state["created_at"] == created_at
    result = await result_of(client, sidecar, accepted)
    assert (result.status, result.body) == (200, b"fixed")
    assert origin.seen["/api/down"]["Content-Length"] == "7"  # the body was kept for it
    listed = await admin(client, sidecar, "GET", "/admin/jobs?status=failed")
    assert listed.json()["jobs"] == []
    succeeded = await admin(client, sidecar, "GET", "/admin/jobs?status=succeeded")
    assert {j["id"] for j in succeeded.json()["jobs"]} == {accepted["id"], fine["id"]}
    again = await admin(client, sidecar, "POST", f"/admin/jobs/{accepted['id']}/retry")
    assert again.status == 409  # only failed or cancelled jobs


async def test_connection_errors_are_retried_then_fail(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    dead = {"name": "dead", "match": {"path": "/api/dead/**"}, "upstream": "dead",
            "offload": {"queue": "work", "attempts": 2, "backoff": "50ms"}}
    config = jobs_config(origin.url, redis_url, extra_routes=[dead])
    config["upstreams"]["dead"] = {"url": f"http://127.0.0.1:{free_port()}",
                                   "connect_timeout": "1s"}
    sidecar = await sidecar_factory(config)
    accepted = await submit(client, sidecar, "/api/dead/x")
    state = await wait_for(client, sidecar, accepted)
    assert (state["status"], state["attempts"]) == ("failed", 2)
    assert state["error"] and "Traceback" not in state["error"]
    outcomes = (await queue_stats(client, sidecar))["outcomes"]
    assert (outcomes["retried"], outcomes["failed"]) == (1, 1)


async def test_an_attempt_over_its_timeout_is_retried_then_fails(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    never = asyncio.Event()
    closed = asyncio.Event()
    origin.script("/api/stuck", holding(never, closed=closed))
    # A visibility timeout well over the attempt's: on a loaded machine, with 2 s, the sweep
    # could take the job for abandoned while its timed-out attempt was still being recorded
    # (failed either way, but with the sweep's error, not this one).
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=2,
                                                timeout="1s",
                                                jobs={"visibility_timeout": "6s"}))
    accepted = await submit(client, sidecar, "/api/stuck")
    state = await wait_for(client, sidecar, accepted)
    assert (state["status"], state["attempts"]) == ("failed", 2)
    assert "timed out" in state["error"], state["error"]
    assert origin.calls["/api/stuck"] == 2
    async with asyncio.timeout(5):
        await closed.wait()


async def test_a_4xx_is_a_result_not_a_failure(sidecar_factory: Factory, origin: Origin,
                                              redis_url: str, client) -> None:
    origin.reply("/api/missing", status=404, headers={"X-Why": "gone"}, body="no such thing")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=3))
    accepted = await submit(client, sidecar, "/api/missing")
    state = await wait_for(client, sidecar, accepted)
    assert (state["status"], state["attempts"]) == ("succeeded", 1)
    result = await result_of(client, sidecar, accepted)
    assert (result.status, result.body) == (404, b"no such thing")
    assert result.headers["X-Why"] == "gone"
    assert origin.calls["/api/missing"] == 1



async def test_a_retried_job_starts_its_progress_again(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    async def reports_then_fails(request: web.Request, n: int) -> web.Response:
        async with aiohttp.ClientSession() as session, session.post(
                request.headers["X-Sidecar-Progress-URL"],
                headers={"X-Sidecar-Progress-Token":
                         request.headers["X-Sidecar-Progress-Token"]},
                json={"progress": 60, "message": "step 3/5"}) as posted:
            assert posted.status == 204
        return web.Response(status=503, text="lost the work")

    origin.script("/api/unlucky", reports_then_fails)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, attempts=2,
                                                backoff="1h"))
    accepted = await submit(client, sidecar, "/api/unlucky")

    async def failed_once() -> bool:
        state = await status_of(client, sidecar, accepted)
        # Waiting for its second attempt, nothing of the lost one's progress applies.
        return state["attempts"] == 1 and state["status"] == "queued" and (
            state["progress"], state["message"]) == (0, None)

    await until(failed_once, 10)
    assert origin.calls["/api/unlucky"] == 1

# -- errors -----------------------------------------------------------------------------------


async def test_a_body_over_max_body_is_413_and_one_at_the_limit_is_taken(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    origin.reply("/api/upload", body="stored")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, max_body="2KiB"))
    too_big = await call(client, "POST", sidecar.url + "/api/upload", data=b"x" * 2049)
    assert too_big.status == 413
    assert error_of(too_big) == "request_body_too_large"
    assert "max_body" in too_big.json()["detail"]
    assert origin.calls["/api/upload"] == 0
    body = os.urandom(2048)
    accepted = await submit(client, sidecar, "/api/upload", body)
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    assert origin.seen["/api/upload"]["Content-Length"] == "2048"
    assert origin.calls["/api/upload"] == 1


async def test_unknown_malformed_and_wrong_method_job_urls(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(jobs_config(backend.url, redis_url))
    accepted = await submit(client, sidecar, "/api/reports?seconds=1.5")
    job_id = accepted["id"]
    for path in ("/_sidecar/jobs/work.5." + "A" * 24,  # well-formed, never existed
                 "/_sidecar/jobs/work.5." + "A" * 24 + "/result",
                 "/_sidecar/jobs/work.5." + "A" * 24 + "/events",
                 "/_sidecar/jobs/nope", "/_sidecar/jobs/work.5.short",
                 "/_sidecar/jobs/work.x." + "A" * 24, "/_sidecar/jobs/" + job_id + "x",
                 "/_sidecar/jobs/" + job_id + "/other", "/_sidecar/jobs/" + job_id + "/result/x",
                 "/_sidecar/jobs", "/_sidecar/jobs/"):
        reply = await call(client, "GET", sidecar.url + path)
        assert reply.status == 404, path
        assert error_of(reply) == "job_not_found", path
    gone = await call(client, "DELETE", sidecar.url + "/_sidecar/jobs/work.5." + "A" * 24)
    assert gone.status == 404

    for method, suffix, allow in (("POST", "", "GET, HEAD, DELETE"),
                                  ("PUT", "", "GET, HEAD, DELETE"),
                                  ("POST", "/result", "GET, HEAD"),
                                  ("DELETE", "/result", "GET, HEAD"),
                                  ("DELETE", "/events", "GET, HEAD")):
        reply = await call(client, method, sidecar.url + accepted["status_url"] + suffix)
        assert reply.status == 405, (method, suffix)
        assert reply.headers["Allow"] == allow
        assert error_of(reply) == "method_not_allowed"

    early = await result_of(client, sidecar, accepted)
    assert early.status == 425
    assert int(early.headers["Retry-After"]) >= 1
    assert error_of(early) == "job_not_finished"
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    assert (await result_of(client, sidecar, accepted)).status == 200


def test_an_unknown_queue_is_refused_by_the_config(tmp_path, redis_url: str) -> None:
    config = jobs_config("http://127.0.0.1:1", redis_url, queue="nope",
                         queues={"work": {}, "other": {}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    message = str(failure.value)
    assert "'nope'" in message and "offload.queue" in message
    assert "other" in message and "work" in message  # the queues that do exist
    config["queues"]["nope"] = {"concurrency": 1}
    path.write_text(yaml.safe_dump(config))
    assert load_config(path).config.queues["nope"].concurrency == 1


async def test_redis_down_refuses_to_enqueue_and_the_queue_comes_back(
        sidecar_factory: Factory, origin: Origin, own_redis: RedisServer, client) -> None:
    origin.reply("/api/work", body="worked")
    sidecar = await sidecar_factory(jobs_config(origin.url, own_redis.url))
    before = await submit(client, sidecar, "/api/work")
    assert (await wait_for(client, sidecar, before))["status"] == "succeeded"
    own_redis.kill()
    refused = await call(client, "POST", sidecar.url + "/api/work", data=b"x")
    assert refused.status == 503
    assert error_of(refused) == "job_queue_unavailable"
    assert int(refused.headers["Retry-After"]) >= 1
    status = await call(client, "GET", sidecar.url + before["status_url"])
    assert status.status == 503 and error_of(status) == "job_queue_unavailable"
    assert origin.calls["/api/work"] == 1
    proxied = await call(client, "GET", sidecar.url + "/elsewhere")
    assert proxied.status == 404 and proxied.body == b"not scripted"  # the origin's own

    own_redis.start()  # empty: the data went with the old process
    accepted: dict[str, Any] = {}

    async def taken() -> bool:
        reply = await call(client, "POST", sidecar.url + "/api/work", data=b"x")
        if reply.status == 202:
            accepted.update(reply.json())
        return reply.status == 202

    await until(taken, 15)
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    assert (await result_of(client, sidecar, accepted)).body == b"worked"
    assert origin.calls["/api/work"] == 2


# -- progress reports -------------------------------------------------------------------------


async def test_progress_reports_are_checked_and_shown(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    release, started = asyncio.Event(), asyncio.Event()
    captured: dict[str, str] = {}

    async def hold(request: web.Request, n: int) -> web.Response:
        captured["url"] = request.headers["X-Sidecar-Progress-URL"]
        captured["token"] = request.headers["X-Sidecar-Progress-Token"]
        return await holding(release, started)(request, n)

    origin.script("/api/hold", hold)
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url))
    accepted = await submit(client, sidecar, "/api/hold")
    async with asyncio.timeout(10):
        await started.wait()
    url, token = captured["url"], captured["token"]
    assert url == f"{sidecar.admin_url}/internal/jobs/{accepted['id']}/progress" and token
    secret = {"X-Sidecar-Progress-Token": token}

    first = await call(client, "GET", sidecar.url + accepted["status_url"])
    etag = first.headers["ETag"]
    for wrong, sent in ((url, {"X-Sidecar-Progress-Token": "wrong"}), (url, {}),
                        (url, {"X-Sidecar-Progress-Token": token + "x"}),
                        (url + "?token=" + token, {}),
                        (f"{sidecar.admin_url}/internal/jobs/work.5.{'A' * 24}/progress", secret),
                        (f"{sidecar.admin_url}/internal/jobs/nope/progress", secret)):
        reply = await call(client, "POST", wrong, json_body={"progress": 50}, headers=sent)
        assert reply.status == 404, (wrong, sent)
    for bad in ({"progress": 150}, {"progress": -1}, {"progress": "half"}, {"progress": True},
                {"message": "no progress"}, {"progress": 10, "extra": 1},
                {"progress": 10, "message": 7}, [10], "10"):
        reply = await call(client, "POST", url, json_body=bad, headers=secret)
        assert reply.status == 400, bad
    not_json = await call(client, "POST", url, data=b"{not json",
                          headers={"Content-Type": "application/json", **secret})
    assert not_json.status == 400
    unchanged = await call(client, "GET", sidecar.url + accepted["status_url"],
                           headers={"If-None-Match": etag})
    assert unchanged.status == 304  # nothing refused above was taken

    ok = await call(client, "POST", url, json_body={"progress": 42.5, "message": "halfway"},
                    headers=secret)
    assert ok.status == 204
    changed = await call(client, "GET", sidecar.url + accepted["status_url"],
                         headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert (changed.json()["progress"], changed.json()["message"]) == (42.5, "halfway")
    release.set()
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"
    late = await call(client, "POST", url, json_body={"progress": 60}, headers=secret)
    assert late.status == 409


# -- operating --------------------------------------------------------------------------------


async def test_stats_count_outcomes_per_queue(sidecar_factory: Factory, origin: Origin,
                                              redis_url: str, client) -> None:
    origin.reply("/api/ok", body="ok")
    origin.reply("/api/bad", status=500, body="boom")
    origin.reply("/other/ok", body="other")
    other_route = {"name": "other", "match": {"path": "/other/**"}, "upstream": "app",
                   "offload": {"queue": "other", "attempts": 1}}
    sidecar = await sidecar_factory(jobs_config(
        origin.url, redis_url, attempts=1, extra_routes=[other_route],
        queues={"work": {"concurrency": 2}, "other": {"concurrency": 1}}))
    empty = await queue_stats(client, sidecar)
    assert empty["outcomes"] == {"succeeded": 0, "failed": 0, "cancelled": 0, "retried": 0,
                                 "requeued": 0}
    jobs = [await submit(client, sidecar, "/api/ok"), await submit(client, sidecar, "/api/ok"),
            await submit(client, sidecar, "/api/bad"), await submit(client, sidecar, "/other/ok")]
    states = [(await wait_for(client, sidecar, job))["status"] for job in jobs]
    assert states == ["succeeded", "succeeded", "failed", "succeeded"]
    reply = await admin(client, sidecar, "GET", "/admin/stats")
    section = reply.json()["jobs"]
    assert section["running_here"] == 0
    work, other = section["queues"]["work"], section["queues"]["other"]
    assert (work["outcomes"]["succeeded"], work["outcomes"]["failed"]) == (2, 1)
    assert (other["outcomes"]["succeeded"], other["outcomes"]["failed"]) == (1, 0)
    assert work["duration_ms"]["count"] == 3 and other["duration_ms"]["count"] == 1
    assert (work["queued"], work["running"], work["slots_in_use"]) == (0, 0, 0)
    assert work["priorities"] == [5]


async def test_an_enqueue_only_sidecar_leaves_its_jobs_to_another_ones_workers(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    seen: dict[str, str] = {}

    async def answer(request: web.Request, n: int) -> web.Response:
        seen["progress_url"] = request.headers["X-Sidecar-Progress-URL"]
        return web.Response(text=f"ran {n}")

    origin.script("/api/work", answer)
    front = await sidecar_factory(jobs_config(origin.url, redis_url,
                                              jobs={"workers": False}), "front.yaml")
    accepted = await submit(client, front, "/api/work", b"queued here")
    await asyncio.sleep(1.5)
    state = await status_of(client, front, accepted)
    assert (state["status"], state["attempts"]) == ("queued", 0)
    assert origin.calls["/api/work"] == 0
    assert (await queue_stats(client, front))["queued"] == 1
    listed = (await admin(client, front, "GET", "/admin/jobs?status=queued")).json()["jobs"]
    assert [j["id"] for j in listed] == [accepted["id"]]

    worker = await sidecar_factory(jobs_config(origin.url, redis_url), "worker.yaml")
    state = await wait_for(client, front, accepted)
    assert (state["status"], state["attempts"]) == ("succeeded", 1)
    result = await result_of(client, front, accepted)  # any instance serves it
    assert result.body == b"ran 1"
    assert (await result_of(client, worker, accepted)).body == b"ran 1"
    # The upstream reports progress to the instance running the job.
    assert seen["progress_url"].startswith(worker.admin_url + "/internal/jobs/")


async def test_a_finished_job_expires_after_result_ttl(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    origin.reply("/api/brief", body="brief")
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url, result_ttl="1s"))
    accepted = await submit(client, sidecar, "/api/brief")
    assert (await wait_for(client, sidecar, accepted))["status"] == "succeeded"

    async def expired() -> bool:
        # The result and the job's record expire a few milliseconds apart (each from when it
        # was written): wait for both.
        return ((await result_of(client, sidecar, accepted)).status == 404
                and (await call(client, "GET", sidecar.url + accepted["status_url"])).status
                == 404)

    await until(expired, 10)
    status = await call(client, "GET", sidecar.url + accepted["status_url"])
    assert status.status == 404 and error_of(status) == "job_not_found"


async def test_ids_of_undeclared_queues_leave_nothing_behind(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    """Anyone may ask for any id: unknown queues and priorities must not make the sidecar
    keep a queue object for each (memory that grows with every guess)."""
    sidecar = await sidecar_factory(jobs_config(origin.url, redis_url))
    service = sidecar.runtime.jobs
    before = len(service._queues)
    for n in range(50):
        reply = await call(client, "GET", sidecar.url + f"/_sidecar/jobs/q{n}.{n}.{'A' * 24}")
        assert reply.status == 404
        reply = await call(client, "GET", sidecar.url + f"/_sidecar/jobs/work.{900 + n}."
                           + "A" * 24)
        assert reply.status == 404
        reply = await admin(client, sidecar, "GET", f"/admin/jobs/z{n}.1.{'A' * 24}")
        assert reply.status == 404
    assert len(service._queues) - before < 5
