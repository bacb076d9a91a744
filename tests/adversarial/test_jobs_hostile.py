"""The job endpoints against clients who guess, enumerate, trespass and flood (docs/jobs.md):
ids carry 144 random bits and a job answers only its creator's credentials, so every other
request about a job must look exactly like one about a job that never existed.

Requests are written by hand on a socket: client libraries normalise `..%2f` and refuse some of
the targets these tests need to send as they are.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
import yarl
from aiohttp import web
from multidict import CIMultiDict
from support import InProcessSidecar, Origin, gather_limited, make_config, until

Factory = Callable[..., Awaitable[InProcessSidecar]]
JOBS = "/_sidecar/jobs"


@dataclass
class Raw:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def shape(self) -> tuple[int, str, str, tuple[str, ...]]:
        """What a 404 tells: status, error, detail and which fields it has (not the ids)."""
        body = self.json()
        assert set(body) == {"error", "detail", "request_id"}, body
        assert body["request_id"] == self.headers["X-Request-ID"]
        names = tuple(sorted(n.lower() for n in self.headers if n.lower() != "date"))
        return self.status, body["error"], body["detail"], names


async def send(base: str, target: str, headers: Sequence[tuple[str, str]] = (),
               method: str = "GET", body: bytes | None = None, chunks: Sequence[bytes] = (),
               declared: int | None = None) -> Raw:
    """One request written as is; the response read by its framing (not to EOF: the sidecar
    may linger on a connection whose body it did not read)."""
    url = yarl.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {url.host}:{url.port}",
                 *(f"{name}: {value}" for name, value in headers)]
        if chunks:
            lines.append("Transfer-Encoding: chunked")
        elif declared is not None or body is not None:
            length = declared if declared is not None else len(body or b"")
            lines.append(f"Content-Length: {length}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        for chunk in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if chunks:
            writer.write(b"0\r\n\r\n")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
            parsed: CIMultiDict[str] = CIMultiDict()
            for line in header_lines:
                name, _, value = line.partition(":")
                parsed.add(name.strip(), value.strip())
            status = int(status_line.split(" ")[1])
            length = int(parsed.get("Content-Length", "0"))
            data = await reader.readexactly(length) if method != "HEAD" else b""
    finally:
        writer.close()
    return Raw(status, parsed, data)


def config_for(origin: Origin, redis_url: str, *, route: dict[str, Any] | None = None,
               **offload: Any) -> dict[str, Any]:
    offload.setdefault("queue", "work")
    return make_config(
        origin.url, redis_url,
        routes=[{"name": "offloaded", "match": {"path": "/api/**"}, "upstream": "app",
                 "offload": offload, **(route or {})},
                {"name": "default", "match": {"path": "/**"}, "upstream": "app"}],
        queues={"work": {"concurrency": 4}, "other": {"concurrency": 1}},
        jobs={"visibility_timeout": "2s", "sweep_interval": "1s"},
        # Long enough for a 10 kB job id to reach the jobs endpoint.
        server={"limits": {"max_request_line": "64KiB"}})


def gate(release: asyncio.Event) -> Callable[[web.Request, int], Awaitable[web.Response]]:
    async def answer(request: web.Request, n: int) -> web.Response:
        await request.read()
        await release.wait()
        return web.Response(text=f"done #{n}")

    return answer


ALICE = [("Cookie", "session=alice")]


async def test_guessed_and_foreign_ids_get_one_and_the_same_404(sidecar_factory, origin,
                                                                redis_url):
    release = asyncio.Event()
    origin.script("/api/report", gate(release))
    sidecar = await sidecar_factory(config_for(origin, redis_url))
    accepted = await send(sidecar.url, "/api/report", ALICE, method="POST", body=b"{}")
    assert accepted.status == 202
    job_id = accepted.json()["id"]
    token = job_id.split(".")[2]
    neighbour = token[:-1] + ("B" if token[-1] != "B" else "C")

    well_formed = [  # could be ids: answered after a look in Redis
        f"work.5.{neighbour}", "work.5." + "A" * 24, "work.5." + "0" * 23 + "1",
        f"other.5.{token}", f"work.6.{token}", f"other.0.{token}",
        f"work.5.{token.swapcase()}",
    ]
    malformed = [
        "1", "0", "-1", "work", "work.5", "work.5.", token, f"WORK!.5.{token}",
        f"work.05.{token}", f"work.+5.{token}", f"work.5.{token[:-1]}",
        f"work.5.{token}x", f"work.99999.{token}", "A" * 10_000, f"work.5.{token}" + "A" * 10_000,
        "..%2f..%2fadmin%2fjobs", "..%2F..%2F", "%2e%2e/%2e%2e/admin", f"work.5.{token}%00",
        f"work.5.{token}%0d%0aX-Evil:%201", "%ff%fe", "%C3%A9" * 10, f"work.5.{token}/..",
        f"work.5.{token}/..%2f..%2f{job_id}", f"{job_id}/result/x", f"..%2f{job_id}",
    ]
    trespassers = [  # alice's job, others' credentials
        [], [("Cookie", "session=mallory")], [("Cookie", "session=Alice")],
        [("Cookie", "session=alice"), ("Cookie", "x=1")], [("Cookie", "session=alice; x=1")],
        [*ALICE, ("Authorization", "Bearer alice")], [("Authorization", "session=alice")],
    ]

    started = time.monotonic()
    shapes = set()
    for guess in well_formed:
        for suffix in ("", "/result", "/events"):
            answer = await send(sidecar.url, f"{JOBS}/{guess}{suffix}", ALICE)
            assert answer.status == 404, (guess, suffix, answer.body[:200])
            shapes.add(answer.shape)
        deleted = await send(sidecar.url, f"{JOBS}/{guess}", ALICE, method="DELETE")
        shapes.add(deleted.shape)
    for headers in trespassers:
        for suffix in ("", "/result", "/events"):
            shapes.add((await send(sidecar.url, f"{JOBS}/{job_id}{suffix}", headers)).shape)
        shapes.add((await send(sidecar.url, f"{JOBS}/{job_id}", headers,
                               method="DELETE")).shape)
        head = await send(sidecar.url, f"{JOBS}/{job_id}", headers, method="HEAD")
        assert head.status == 404
    # Someone else's job and a job that never existed: the same answer, field for field.
    assert len(shapes) == 1, shapes
    status, error, _detail, _names = shapes.pop()
    assert (status, error) == (404, "job_not_found")

    for guess in malformed:
        answer = await send(sidecar.url, f"{JOBS}/{guess}", ALICE)
        assert answer.status == 404, (guess[:80], answer.body[:200])
        assert answer.json()["error"] == "job_not_found"
        assert len(answer.body) < 500  # nothing of the guess is echoed back
    # Every guess was answered; none took long (a generous bound: a shared machine).
    assert time.monotonic() - started < 30

    # None of it touched the job: it is alice's, still running, and ends for her.
    mine = await send(sidecar.url, f"{JOBS}/{job_id}", ALICE)
    assert mine.status == 200 and mine.json()["status"] in ("queued", "running")
    release.set()

    async def succeeded() -> bool:
        view = await send(sidecar.url, f"{JOBS}/{job_id}", ALICE)
        return bool(view.json()["status"] == "succeeded")

    await until(succeeded, 20)
    result = await send(sidecar.url, f"{JOBS}/{job_id}/result", ALICE)
    assert result.status == 200 and result.body == b"done #1"
    assert origin.calls["/api/report"] == 1


async def test_traversal_out_of_the_jobs_path_reaches_neither_a_job_nor_the_upstream(
        sidecar_factory, origin, redis_url):
    """A path that leaves the jobs path once resolved, or enters it, is not proxied
    somewhere else by surprise: the jobs endpoint answers, or routing refuses it."""
    origin.reply("/api/x", body="proxied")
    sidecar = await sidecar_factory(config_for(origin, redis_url))
    for target in (f"{JOBS}/..%2f..%2fapi%2fx", f"{JOBS}/../../api/x", f"{JOBS}/%2e%2e/x"):
        answer = await send(sidecar.url, target)
        assert answer.status == 404 and answer.json()["error"] == "job_not_found", target
    for target in ("/api/..%2f_sidecar/jobs/work.5." + "A" * 24, "/api/../_sidecar/jobs/x"):
        answer = await send(sidecar.url, target)
        assert answer.status == 400 and answer.json()["error"] == "bad_request", target
    assert sum(origin.calls.values()) == 0
    assert await job_keys(redis_url) == []


async def job_keys(redis_url: str) -> list[bytes]:
    """Redis keys that a queued job leaves: its saq record and its stored body."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return sorted([*await client.keys("saq:job:*"),
                       *await client.keys("sidecar:jobs:body:*")])
    finally:
        await client.aclose()


@pytest.mark.parametrize("how", ["content-length", "chunked", "declared-only"])
async def test_a_body_over_max_body_is_413_and_nothing_is_enqueued(sidecar_factory, origin,
                                                                   redis_url, how):
    origin.reply("/api/upload", body="stored")
    sidecar = await sidecar_factory(config_for(origin, redis_url, max_body="1KiB"))
    big = b"x" * 4096
    if how == "content-length":
        answer = await send(sidecar.url, "/api/upload", method="POST", body=big)
    elif how == "chunked":
        answer = await send(sidecar.url, "/api/upload", method="POST",
                            chunks=[big[i:i + 500] for i in range(0, len(big), 500)])
    else:  # announces 10 GB and sends none of it: refused on the announcement
        answer = await send(sidecar.url, "/api/upload", method="POST", declared=10 * 1024**3)
    assert answer.status == 413, answer.body
    body = answer.json()
    assert body["error"] == "request_body_too_large" and body["request_id"]
    # A job is in Redis before its 202 is sent: none is there for the 413.
    assert await job_keys(redis_url) == []
    assert origin.calls["/api/upload"] == 0
    # The limit is the body's, not the route's: one at the limit is taken.
    taken = await send(sidecar.url, "/api/upload", method="POST", body=b"y" * 1024)
    assert taken.status == 202
    assert len(await job_keys(redis_url)) == 2


async def test_a_flood_of_submissions_meets_the_rate_limit_and_the_sidecar_stays_up(
        sidecar_factory, origin, redis_url):
    """Nothing bounds how many jobs wait in a queue but the route's rate_limit: a flood gets
    its burst in, 429s for the rest, and every accepted job is really queued."""
    origin.reply("/api/flood", body="ok")
    route = {"rate_limit": {"rate": "5/s", "burst": 20}}
    sidecar = await sidecar_factory(config_for(origin, redis_url, route=route))
    started = time.monotonic()
    answers = await gather_limited(
        [send(sidecar.url, f"/api/flood?n={i}", method="POST", body=b"{}") for i in range(300)],
        limit=50)
    elapsed = time.monotonic() - started
    statuses = [a.status for a in answers]
    assert set(statuses) <= {202, 429}, set(statuses)
    accepted = statuses.count(202)
    assert 20 <= accepted <= 20 + 5 * (elapsed + 1)
    for answer in answers:
        if answer.status == 429:
            assert answer.json()["error"] == "rate_limited" and "Retry-After" in answer.headers
    ids = {a.json()["id"] for a in answers if a.status == 202}
    assert len(ids) == accepted
    health = await send(sidecar.admin_url, "/healthz")
    assert health.status == 200

    async def all_ran() -> bool:
        return origin.calls["/api/flood"] >= accepted

    await until(all_ran, 30)
    assert origin.calls["/api/flood"] == accepted


async def test_a_flood_without_a_rate_limit_is_queued_whole_and_served(sidecar_factory, origin,
                                                                       redis_url):
    origin.reply("/api/flood", body="ok")
    sidecar = await sidecar_factory(config_for(origin, redis_url))
    answers = await gather_limited(
        [send(sidecar.url, f"/api/flood?n={i}", method="POST", body=b"{}") for i in range(200)],
        limit=50)
    assert [a.status for a in answers] == [202] * 200
    # The public listener still answers other traffic while the workers drain the queue.
    origin.reply("/plain", body="plain")
    assert (await send(sidecar.url, "/plain")).body == b"plain"

    async def all_ran() -> bool:
        return origin.calls["/api/flood"] >= 200

    await until(all_ran, 60)
    assert origin.calls["/api/flood"] == 200
