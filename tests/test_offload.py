"""`offload` end to end: a real upstream whose report route takes seconds and posts progress,
real Redis, the job workers inside an in-process sidecar, real HTTP clients. docs/jobs.md."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import Backend, InProcessSidecar, Origin, RedisServer, make_config, until

from sidecar.config import ConfigError, load_config

Factory = Callable[..., Awaitable[InProcessSidecar]]
FAST_JOBS = {"visibility_timeout": "2s", "sweep_interval": "1s"}


def offload_config(upstream_url: str, redis_url: str, *, concurrency: int = 5,
                   **offload: Any) -> dict[str, Any]:
    offload.setdefault("queue", "reports")
    offload.setdefault("backoff", "50ms")
    routes = [
        {"name": "reports", "match": {"path": "/api/reports/**"}, "upstream": "app",
         "offload": offload},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    return make_config(upstream_url, redis_url, routes=routes,
                       queues={"reports": {"concurrency": concurrency}, "default": {}},
                       jobs=dict(FAST_JOBS))


async def submit(client: aiohttp.ClientSession, sidecar: InProcessSidecar, path: str,
                 body: bytes = b"{}", headers: dict[str, str] | None = None
                 ) -> tuple[str, dict[str, Any]]:
    async with client.post(sidecar.url + path, data=body, headers=headers or {}) as response:
        assert response.status == 202, await response.text()
        data = await response.json()
        assert response.headers["Location"] == data["status_url"]
        return data["status_url"], data


async def status_of(client: aiohttp.ClientSession, sidecar: InProcessSidecar, url: str,
                    headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with client.get(sidecar.url + url, headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


async def finished(client: aiohttp.ClientSession, sidecar: InProcessSidecar, url: str,
                   timeout: float = 20.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def over() -> bool:
        nonlocal last
        last = await status_of(client, sidecar, url)
        return last["status"] in ("succeeded", "failed", "cancelled")

    await until(over, timeout)
    return last


async def admin_stats(sidecar: InProcessSidecar) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(
            sidecar.admin_url + "/admin/stats") as response:
        return await response.json()  # type: ignore[no-any-return]


# -- the client's flow ----------------------------------------------------------------------------


async def test_polling_shows_queued_running_with_progress_then_succeeded(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(offload_config(backend.url, redis_url))
    body = b'{"month": "2026-10"}'
    async with client.post(sidecar.url + "/api/reports?seconds=2", data=body) as response:
        assert response.status == 202
        assert response.headers["Retry-After"].isdigit()
        assert response.headers["Cache-Control"] == "no-store"
        accepted = await response.json()
    job_id = accepted["id"]
    assert accepted["status"] == "queued"
    assert accepted["status_url"] == f"/_sidecar/jobs/{job_id}"
    assert accepted["result_url"] == f"/_sidecar/jobs/{job_id}/result"
    statuses: list[str] = []
    progress: list[int] = []
    etag = None
    not_modified = 0
    for _ in range(400):
        headers = {"If-None-Match": etag} if etag else {}
        async with client.get(sidecar.url + accepted["status_url"], headers=headers) as reply:
            if reply.status == 304:
                not_modified += 1
                await asyncio.sleep(0.02)
                continue
            assert reply.status == 200
            etag = reply.headers["ETag"]
            state = await reply.json()
        if not statuses or statuses[-1] != state["status"]:
            statuses.append(state["status"])
        if not progress or progress[-1] != state["progress"]:
            progress.append(state["progress"])
        if state["status"] == "succeeded":
            break
        await asyncio.sleep(0.02)
    assert statuses[-1] == "succeeded"
    assert statuses in (["queued", "running", "succeeded"], ["running", "succeeded"])
    assert progress == sorted(progress) and progress[-1] == 100
    assert len([p for p in progress if 0 < p < 100]) >= 2, progress
    assert not_modified > 0  # polling with the ETag saw 304s while nothing changed
    assert state["attempts"] == 1 and state["error"] is None
    assert state["created_at"] <= state["started_at"] <= state["finished_at"]
    async with client.get(sidecar.url + accepted["result_url"]) as result:
        assert result.status == 200
        assert result.headers["Content-Type"].startswith("application/json")
        assert result.headers["X-Sidecar-Job-Id"] == job_id
        report = json.loads(await result.read())
    assert report == {"report": "ready", "request_bytes": len(body),
                      "digest": hashlib.sha256(body).hexdigest()}
    assert backend.calls("POST /api/reports") == 1


async def test_result_is_the_upstreams_response_byte_for_byte(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    payload = bytes(range(256)) * 40
    seen: dict[str, Any] = {}

    async def created(request: web.Request, n: int) -> web.Response:
        seen["body"] = await request.read()
        seen["headers"] = request.headers.copy()
        return web.Response(status=201, body=payload, headers={
            "Content-Type": "application/x-report", "X-Report": "r-7",
            "Set-Cookie": "seen=1"})

    origin.script("/api/reports/new", created)
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url))
    url, accepted = await submit(client, sidecar, "/api/reports/new", b"the request body",
                                 {"Prefer": "respond-async, return=minimal"})
    assert (await finished(client, sidecar, url))["status"] == "succeeded"
    async with client.get(sidecar.url + accepted["result_url"]) as result:
        assert result.status == 201
        assert result.headers["Content-Type"] == "application/x-report"
        assert result.headers["X-Report"] == "r-7"
        assert result.headers["Set-Cookie"] == "seen=1"
        assert await result.read() == payload
    assert seen["body"] == b"the request body"
    assert seen["headers"]["X-Sidecar-Job-Id"] == accepted["id"]
    assert seen["headers"]["X-Sidecar-Progress-URL"].endswith(
        "/internal/jobs/" + accepted["id"] + "/progress")  # no secret in the URL
    assert len(seen["headers"]["X-Sidecar-Progress-Token"]) >= 20
    assert seen["headers"]["Prefer"] == "return=minimal"  # respond-async is the sidecar's
    assert seen["headers"]["Content-Length"] == str(len(b"the request body"))


async def test_events_stream_the_same_changes(sidecar_factory: Factory, backend: Backend,
                                              redis_url: str, client) -> None:
    sidecar = await sidecar_factory(offload_config(backend.url, redis_url))
    url, _ = await submit(client, sidecar, "/api/reports?seconds=1.5")
    frames: list[dict[str, Any]] = []
    async with client.get(sidecar.url + url + "/events") as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        event = None
        async with asyncio.timeout(20):
            async for raw in stream.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    assert event == "status"
                    frames.append(json.loads(line[6:]))
    # The stream ended by itself, after the last state.
    statuses = [f["status"] for f in frames]
    assert statuses[-1] == "succeeded"
    assert "running" in statuses
    progress = [f["progress"] for f in frames]
    assert progress == sorted(progress)
    assert len({p for p in progress if 0 < p < 100}) >= 2, progress
    assert all(a != b for a, b in itertools.pairwise(frames))  # changes only


async def test_prefer_wait_returns_the_real_response_when_the_job_is_quick(
        sidecar_factory: Factory, backend: Backend, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(offload_config(backend.url, redis_url))
    async with client.post(sidecar.url + "/api/reports?seconds=0.3", data=b"abc",
                           headers={"Prefer": "wait=10"}) as response:
        assert response.status == 200
        assert response.headers["X-Sidecar-Job-Id"]
        assert (await response.json())["request_bytes"] == 3
    async with client.post(sidecar.url + "/api/reports?seconds=3", data=b"abc",
                           headers={"Prefer": "wait=1"}) as response:
        assert response.status == 202


async def test_prefer_mode_offloads_only_when_asked(sidecar_factory: Factory, backend: Backend,
                                                    redis_url: str, client) -> None:
    sidecar = await sidecar_factory(offload_config(backend.url, redis_url, mode="prefer"))
    async with client.post(sidecar.url + "/api/reports?seconds=0.1", data=b"x") as response:
        assert response.status == 200
        assert "X-Sidecar-Job-Id" not in response.headers
    async with client.post(sidecar.url + "/api/reports?seconds=0.1", data=b"x",
                           headers={"Prefer": "respond-async"}) as response:
        assert response.status == 202
        assert response.headers["Preference-Applied"] == "respond-async"


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_a_queued_job_and_a_running_one(sidecar_factory: Factory, origin: Origin,
                                                     redis_url: str, client) -> None:
    started = asyncio.Event()
    aborted = asyncio.Event()

    async def long(request: web.Request, n: int) -> web.Response:
        started.set()
        for _ in range(600):  # aiohttp does not cancel a handler whose client left: look
            transport = request.transport
            if transport is None or transport.is_closing():
                aborted.set()
                break
            await asyncio.sleep(0.05)
        return web.Response(text="too late")

    origin.script("/api/reports/long", long)
    origin.reply("/api/reports/next", body="next")
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url, concurrency=1))
    running_url, _ = await submit(client, sidecar, "/api/reports/long")
    async with asyncio.timeout(10):
        await started.wait()
    queued_url, _ = await submit(client, sidecar, "/api/reports/next")
    assert (await status_of(client, sidecar, queued_url))["status"] == "queued"

    async with client.delete(sidecar.url + queued_url) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "cancelled"
    async with client.delete(sidecar.url + running_url) as response:
        assert response.status in (200, 202)
    assert (await finished(client, sidecar, running_url))["status"] == "cancelled"
    async with asyncio.timeout(10):
        await aborted.wait()  # the upstream call was cut
    async with client.get(sidecar.url + running_url + "/result") as response:
        assert response.status == 409
        assert (await response.json())["error"] == "job_finished"
    async with client.delete(sidecar.url + queued_url) as response:
        assert response.status == 409
    # The slot is free again and the cancelled queued job never ran.
    url, _ = await submit(client, sidecar, "/api/reports/next")
    assert (await finished(client, sidecar, url))["status"] == "succeeded"
    assert origin.calls["/api/reports/next"] == 1
    stats = await admin_stats(sidecar)
    assert stats["jobs"]["queues"]["reports"]["outcomes"]["cancelled"] == 2


# -- privacy ----------------------------------------------------------------------------------


async def test_only_the_creator_sees_a_job(sidecar_factory: Factory, origin: Origin,
                                           redis_url: str, client) -> None:
    origin.reply("/api/reports/mine", body="secret report")
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url))
    alice = {"Authorization": "Bearer alice"}
    url, _ = await submit(client, sidecar, "/api/reports/mine", headers=alice)
    assert (await status_of(client, sidecar, url, alice))["status"] in (
        "queued", "running", "succeeded")
    await until(lambda: _succeeded(client, sidecar, url, alice))
    for other in ({"Authorization": "Bearer mallory"}, {}, {"Cookie": "session=alice"}):
        for method, suffix in (("GET", ""), ("GET", "/result"), ("GET", "/events"),
                               ("DELETE", "")):
            async with client.request(method, sidecar.url + url + suffix,
                                      headers=other) as response:
                assert response.status == 404, (other, method, suffix)
                assert (await response.json())["error"] == "job_not_found"
    async with client.get(sidecar.url + url + "/result", headers=alice) as response:
        assert response.status == 200
        assert await response.text() == "secret report"


async def _succeeded(client: aiohttp.ClientSession, sidecar: InProcessSidecar, url: str,
                     headers: dict[str, str]) -> bool:
    return (await status_of(client, sidecar, url, headers))["status"] == "succeeded"


# -- retries and failures ---------------------------------------------------------------------


async def test_upstream_5xx_is_retried_with_backoff_then_succeeds(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    async def flaky(request: web.Request, n: int) -> web.Response:
        if n <= 2:
            return web.Response(status=503, text="busy")
        return web.Response(text=f"done on call {n}")

    origin.script("/api/reports/flaky", flaky)
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url, attempts=3))
    url, accepted = await submit(client, sidecar, "/api/reports/flaky")
    state = await finished(client, sidecar, url)
    assert state["status"] == "succeeded"
    assert state["attempts"] == 3
    assert origin.calls["/api/reports/flaky"] == 3
    async with client.get(sidecar.url + accepted["result_url"]) as response:
        assert await response.text() == "done on call 3"
    outcomes = (await admin_stats(sidecar))["jobs"]["queues"]["reports"]["outcomes"]
    assert outcomes["retried"] == 2 and outcomes["succeeded"] == 1


async def test_failed_after_attempts_listed_and_retried_by_the_admin(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    origin.reply("/api/reports/down", status=502, body="bad gateway")
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url, attempts=2))
    url, accepted = await submit(client, sidecar, "/api/reports/down")
    state = await finished(client, sidecar, url)
    assert state["status"] == "failed"
    assert state["attempts"] == 2
    created_at = state["created_at"]
    assert "502" in state["error"] and "Traceback" not in state["error"]
    assert origin.calls["/api/reports/down"] == 2
    async with client.get(sidecar.url + accepted["result_url"]) as response:
        assert response.status == 409
    async with client.get(sidecar.admin_url + "/admin/jobs?status=failed") as response:
        listed = (await response.json())["jobs"]
    assert [j["id"] for j in listed] == [accepted["id"]]
    assert listed[0]["route"] == "reports" and listed[0]["method"] == "POST"
    assert "502" in listed[0]["error_detail"]
    origin.reply("/api/reports/down", status=200, body="fixed")
    async with client.post(sidecar.admin_url + f"/admin/jobs/{accepted['id']}/retry") as response:
        assert response.status == 200, await response.text()
    state = await finished(client, sidecar, url)
    assert state["status"] == "succeeded" and state["attempts"] == 3  # counted from the first
    assert state["created_at"] == created_at
    async with client.get(sidecar.url + accepted["result_url"]) as response:
        assert await response.text() == "fixed"
    async with client.get(sidecar.admin_url + f"/admin/jobs/{accepted['id']}") as response:
        history = (await response.json())["history"]
    # Each attempt, before and after the operator's retry, with its outcome and worker.
    assert [(h["attempt"], h["outcome"]) for h in history] == [
        (1, "retried"), (2, "failed"), (3, "succeeded")]
    assert "502" in history[0]["error"] and "502" in history[1]["error"]
    assert history[2]["error"] is None
    assert all(h["worker"] and h["started_at"] <= h["ended_at"] for h in history)
    async with client.post(sidecar.admin_url + f"/admin/jobs/{accepted['id']}/retry") as response:
        assert response.status == 409  # only failed or cancelled jobs


async def test_a_response_over_max_body_fails_without_retrying(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    origin.reply("/api/reports/huge", body="x" * 5000)
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url, attempts=3,
                                                   max_body="4KiB"))
    url, _ = await submit(client, sidecar, "/api/reports/huge")
    state = await finished(client, sidecar, url)
    assert state["status"] == "failed"
    assert "max_body" in state["error"]
    assert origin.calls["/api/reports/huge"] == 1


# -- errors -----------------------------------------------------------------------------------


async def test_client_errors(sidecar_factory: Factory, origin: Origin, redis_url: str,
                             client) -> None:
    origin.reply("/api/reports/slow", body="x")
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url, max_body="1KiB"))
    async with client.post(sidecar.url + "/api/reports/slow", data=b"x" * 2000) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "request_body_too_large"
    chunks = (b"x" * 600 for _ in range(3))  # no Content-Length: counted as it arrives

    async def body():  # type: ignore[no-untyped-def]
        for chunk in chunks:
            yield chunk

    async with client.post(sidecar.url + "/api/reports/slow", data=body()) as response:
        assert response.status == 413
    for path in ("/_sidecar/jobs/nope", "/_sidecar/jobs/reports.5." + "a" * 24,
                 "/_sidecar/jobs/reports.5." + "a" * 24 + "/other", "/_sidecar/jobs"):
        async with client.get(sidecar.url + path) as response:
            assert response.status == 404, path
            assert (await response.json())["error"] == "job_not_found"
    url, _ = await submit(client, sidecar, "/api/reports/slow")
    async with client.post(sidecar.url + url) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD, DELETE"


async def test_result_before_the_end_is_425(sidecar_factory: Factory, backend: Backend,
                                            redis_url: str, client) -> None:
    sidecar = await sidecar_factory(offload_config(backend.url, redis_url))
    _url, accepted = await submit(client, sidecar, "/api/reports?seconds=2")
    async with client.get(sidecar.url + accepted["result_url"]) as response:
        assert response.status == 425
        assert response.headers["Retry-After"].isdigit()
        assert (await response.json())["error"] == "job_not_finished"


async def test_progress_reports_are_checked(sidecar_factory: Factory, origin: Origin,
                                            redis_url: str, client) -> None:
    captured: dict[str, str] = {}
    release = asyncio.Event()

    async def hold(request: web.Request, n: int) -> web.Response:
        captured["url"] = request.headers["X-Sidecar-Progress-URL"]
        captured["token"] = request.headers["X-Sidecar-Progress-Token"]
        await release.wait()
        return web.Response(text="ok")

    origin.script("/api/reports/hold", hold)
    sidecar = await sidecar_factory(offload_config(origin.url, redis_url))
    url, _ = await submit(client, sidecar, "/api/reports/hold")
    await until(lambda: _has(captured, "url"))
    progress_url = captured["url"]
    assert progress_url.startswith(sidecar.admin_url + "/internal/jobs/")
    token = {"X-Sidecar-Progress-Token": captured["token"]}
    for wrong in ({"X-Sidecar-Progress-Token": "wrong"}, {}):
        async with client.post(progress_url, json={"progress": 50}, headers=wrong) as response:
            assert response.status == 404
    async with client.post(progress_url + "?token=" + captured["token"],
                           json={"progress": 50}) as response:
        assert response.status == 404  # in the URL, it is not taken
    for bad in ({"progress": 150}, {"progress": "half"}, [1]):
        async with client.post(progress_url, json=bad, headers=token) as response:
            assert response.status == 400, bad
    async with client.post(progress_url, json={"progress": 55, "message": "halfway"},
                           headers=token) as r:
        assert r.status == 204
    state = await status_of(client, sidecar, url)
    assert (state["progress"], state["message"]) == (55, "halfway")
    release.set()
    assert (await finished(client, sidecar, url))["status"] == "succeeded"
    async with client.post(progress_url, json={"progress": 60}, headers=token) as response:
        assert response.status == 409  # the job is over


async def _has(mapping: dict[str, str], key: str) -> bool:
    return key in mapping


def test_an_unknown_queue_is_a_config_error(tmp_path, redis_url: str) -> None:
    import yaml

    config = offload_config("http://127.0.0.1:1", redis_url, queue="nope")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    message = str(failure.value)
    assert "offload.queue" in message and "'nope'" in message and "reports" in message


async def test_redis_down_refuses_to_enqueue(sidecar_factory: Factory, origin: Origin,
                                             own_redis: RedisServer, client) -> None:
    origin.reply("/api/reports/x", body="x")
    sidecar = await sidecar_factory(offload_config(origin.url, own_redis.url))
    own_redis.kill()
    async with client.post(sidecar.url + "/api/reports/x", data=b"x") as response:
        assert response.status == 503
        assert (await response.json())["error"] == "job_queue_unavailable"
        assert response.headers["Retry-After"].isdigit()
    assert origin.calls["/api/reports/x"] == 0
    # Other routes keep proxying.
    async with client.get(sidecar.url + "/elsewhere") as response:
        assert response.status == 404  # the origin's own "not scripted"


async def test_a_full_queue_refuses_submissions_until_it_drains(
        sidecar_factory: Factory, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    """queues.<name>.max_queued: past it a submission is refused, nothing queued or sent."""
    release = asyncio.Event()

    async def held(request: web.Request, n: int) -> web.Response:
        await release.wait()
        return web.Response(text=f"done {n}")

    origin.script("/api/reports/held", held)
    config = offload_config(origin.url, redis_url, concurrency=1)
    config["queues"]["reports"]["max_queued"] = 2
    sidecar = await sidecar_factory(config)
    first, _ = await submit(client, sidecar, "/api/reports/held")
    await until(lambda: asyncio.sleep(0, origin.calls["/api/reports/held"] == 1))
    waiting = [(await submit(client, sidecar, "/api/reports/held"))[0] for _ in range(2)]
    async with client.post(sidecar.url + "/api/reports/held", data=b"{}") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        body = await response.json()
    assert body["error"] == "job_queue_full" and "max_queued" in body["detail"]
    stats = (await admin_stats(sidecar))["jobs"]["queues"]["reports"]
    assert (stats["queued"], stats["running"]) == (2, 1)
    release.set()
    for url in (first, *waiting):
        assert (await finished(client, sidecar, url))["status"] == "succeeded"
    url, _ = await submit(client, sidecar, "/api/reports/held")  # room again
    assert (await finished(client, sidecar, url))["status"] == "succeeded"
    assert origin.calls["/api/reports/held"] == 4
