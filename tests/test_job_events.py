"""A job's events over a WebSocket and resumed Server-Sent Events (docs/jobs.md, "Events"):
real Redis, the job workers inside an in-process sidecar, a scripted origin that holds the job
while the test reports its progress the way an upstream does (to the URL and with the token the
job's request carried), a real WebSocket client (aiohttp's) and a real SSE reader."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from support import InProcessSidecar, Origin, make_config, until

Factory = Callable[..., Awaitable[InProcessSidecar]]
Event = tuple[str, str, dict[str, Any]]  # (event, id, data)


def events_config(origin_url: str, redis_url: str) -> dict[str, Any]:
    routes = [
        {"name": "offloaded", "match": {"path": "/api/**"}, "upstream": "app",
         "offload": {"queue": "work", "attempts": 1}},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    return make_config(origin_url, redis_url, routes=routes, queues={"work": {"concurrency": 2}},
                       jobs={"visibility_timeout": "2s", "sweep_interval": "1s"})


@dataclass
class HeldJob:
    """A job whose upstream call waits for `release`; `report` is what its upstream would do
    while it works."""

    accepted: dict[str, Any]
    release: asyncio.Event
    progress_url: str = ""
    progress_token: str = ""
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def report(self, client: aiohttp.ClientSession, progress: int) -> None:
        async with client.post(self.progress_url, json={"progress": progress,
                                                        "message": f"at {progress}"},
                               headers={"X-Sidecar-Progress-Token": self.progress_token}
                               ) as response:
            assert response.status == 204, await response.text()


async def start_held_job(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                         origin: Origin) -> HeldJob:
    held = HeldJob({}, asyncio.Event())

    async def answer(request: web.Request, n: int) -> web.Response:
        held.progress_url = request.headers["X-Sidecar-Progress-URL"]
        held.progress_token = request.headers["X-Sidecar-Progress-Token"]
        held.started.set()
        while not held.release.is_set():
            if request.transport is None or request.transport.is_closing():
                break
            await asyncio.sleep(0.02)
        return web.Response(text="done")

    origin.script("/api/work", answer)
    async with client.post(sidecar.url + "/api/work", data=b"{}") as response:
        assert response.status == 202, await response.text()
        held.accepted = await response.json()
    async with asyncio.timeout(10):
        await held.started.wait()
    return held


def etag_id(data: bytes) -> str:
    """What docs/jobs.md says an event's id is: the status JSON's ETag, unquoted."""
    return hashlib.blake2b(data, digest_size=12).hexdigest()


async def sse(client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
              ) -> AsyncIterator[Event]:
    """The frames of an SSE stream as they arrive (keep-alive comments skipped)."""
    async with client.get(url, headers=headers or {}) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        event, number = "", ""
        async for raw in stream.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("id: "):
                number = line[len("id: "):]
            elif line.startswith("data: "):
                data = line[len("data: "):].encode()
                if event == "status":
                    assert number == etag_id(data)
                yield event, number, json.loads(data)
                event, number = "", ""


@dataclass
class Collected:
    """Events read in the background, to wait on."""

    events: list[Event] = field(default_factory=list)
    ended: bool = False

    async def reach(self, progress: int | None = None, status: str | None = None) -> None:
        async def there() -> bool:
            if not self.events:
                return False
            data = self.events[-1][2]
            return ((progress is None or data.get("progress") == progress)
                    and (status is None or data.get("status") == status))

        await until(there, 10)


async def collect_sse(client: aiohttp.ClientSession, url: str, into: Collected,
                      headers: dict[str, str] | None = None) -> None:
    async for frame in sse(client, url, headers):
        into.events.append(frame)
    into.ended = True


async def collect_ws(ws: aiohttp.ClientWebSocketResponse, into: Collected) -> None:
    """Every text message as (event, id, data), until the server closes."""
    async for message in ws:
        assert message.type == WSMsgType.TEXT, message
        found = json.loads(message.data)
        assert set(found) <= {"event", "id", "data"}, found
        if found["event"] == "status":
            # The id is the same as the SSE event's: that of the status JSON it carries.
            data = json.dumps(found["data"], separators=(",", ":"), ensure_ascii=False)
            assert found["id"] == etag_id(data.encode())
        into.events.append((found["event"], found.get("id", ""), found["data"]))
    into.ended = True


# -- the WebSocket ----------------------------------------------------------------------------


async def test_websocket_events_arrive_for_a_running_job(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(events_config(origin.url, redis_url))
    job = await start_held_job(client, sidecar, origin)
    url = sidecar.url + job.accepted["events_url"]
    over_ws, over_sse = Collected(), Collected()
    async with client.ws_connect(url) as ws:
        assert ws._response.headers["X-Request-ID"]  # answered by the sidecar's edge
        readers = [asyncio.create_task(collect_ws(ws, over_ws)),
                   asyncio.create_task(collect_sse(client, url, over_sse))]
        for stream in (over_ws, over_sse):
            await stream.reach(progress=0, status="running")
        for progress in (30, 70):
            await job.report(client, progress)
            for stream in (over_ws, over_sse):
                await stream.reach(progress=progress, status="running")
        job.release.set()
        for stream in (over_ws, over_sse):
            await stream.reach(status="succeeded")
        async with asyncio.timeout(10):
            await asyncio.gather(*readers)  # both end by themselves once the job is over
        assert ws.close_code == 1000  # a normal close, after the last status
    assert over_ws.ended and over_sse.ended
    # The same events, id for id, over both.
    assert over_ws.events == over_sse.events
    events = over_ws.events
    assert {event for event, _, _ in events} == {"status"}
    assert [(data["status"], data["progress"], data["message"]) for _, _, data in events] == [
        ("running", 0, None), ("running", 30, "at 30"), ("running", 70, "at 70"),
        ("succeeded", 100, "at 70")]
    async with client.get(sidecar.url + job.accepted["status_url"]) as final:
        assert await final.json() == events[-1][2]
        assert final.headers["ETag"] == f'"{events[-1][1]}"'
    # A WebSocket that resumes from the last id of a finished job gets nothing more.
    async with client.ws_connect(url, headers={"Last-Event-ID": events[-1][1]}) as again:
        message = await again.receive(timeout=10)
        assert message.type == WSMsgType.CLOSE and again.close_code == 1000


async def test_a_websocket_client_closing_early_gets_its_close_answered(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(events_config(origin.url, redis_url))
    job = await start_held_job(client, sidecar, origin)
    async with client.ws_connect(sidecar.url + job.accepted["events_url"]) as ws:
        first = json.loads(await ws.receive_str(timeout=10))
        assert first["data"]["status"] == "running"
        await ws.ping()  # answered (aiohttp waits for no pong, but a broken frame would close)
        await ws.send_str("the events flow one way; this is read and dropped")
        await job.report(client, 50)
        second = json.loads(await ws.receive_str(timeout=10))
        assert second["data"]["progress"] == 50
        await ws.close()
        assert ws.close_code == 1000  # the sidecar answered the close handshake
    job.release.set()
    async with client.get(sidecar.url + job.accepted["status_url"]) as status:
        assert status.status == 200  # the job goes on; only the stream ended


async def raw_handshake(sidecar: InProcessSidecar, path: str, headers: dict[str, str]
                        ) -> tuple[int, dict[str, str]]:
    """A WebSocket handshake written by hand (aiohttp's client only sends valid ones): the
    answer's status and header fields."""
    host, port = sidecar.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    status_line, *fields = head.decode().split("\r\n")
    found = dict(f.split(": ", 1) for f in fields if f)
    return int(status_line.split()[1]), {k.lower(): v for k, v in found.items()}


async def test_websocket_handshakes_that_break_the_rfc_are_refused(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(events_config(origin.url, redis_url))
    job = await start_held_job(client, sidecar, origin)
    path = job.accepted["events_url"]
    key = base64.b64encode(os.urandom(16)).decode()
    good = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": key}
    status, headers = await raw_handshake(sidecar, path, good)
    assert status == 101
    assert headers["upgrade"] == "websocket"
    expected = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    assert headers["sec-websocket-accept"] == expected  # RFC 6455 §4.2.2
    status, headers = await raw_handshake(sidecar, path, {**good, "Sec-WebSocket-Version": "8"})
    assert (status, headers["sec-websocket-version"]) == (426, "13")
    status, _ = await raw_handshake(sidecar, path, {**good, "Sec-WebSocket-Key": "short"})
    assert status == 400
    # Someone else's job: the same 404 as for any request of theirs, no WebSocket.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect(sidecar.url + path,
                                     headers={"Authorization": "Bearer someone-else"}):
            pass
    assert refused.value.status == 404
    job.release.set()


# -- Last-Event-ID ----------------------------------------------------------------------------


async def first_frames(client: aiohttp.ClientSession, url: str, n: int,
                       headers: dict[str, str] | None = None) -> list[Event]:
    """The first `n` frames of a stream, then hang up."""
    frames: list[Event] = []
    async with asyncio.timeout(10):
        async for frame in sse(client, url, headers):
            frames.append(frame)
            if len(frames) == n:
                break
    return frames


async def test_sse_resumes_after_last_event_id(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    sidecar = await sidecar_factory(events_config(origin.url, redis_url))
    job = await start_held_job(client, sidecar, origin)
    url = sidecar.url + job.accepted["events_url"]
    [first] = await first_frames(client, url, 1)
    assert first[2]["progress"] == 0
    # Resumed at once with that id: nothing is sent until something changes.
    resumed = Collected()
    reader = asyncio.create_task(collect_sse(client, url, resumed,
                                             {"Last-Event-ID": first[1]}))
    await asyncio.sleep(0)
    await job.report(client, 40)
    await resumed.reach(progress=40)
    assert [data["progress"] for _, _, data in resumed.events] == [40]
    reader.cancel()
    seen = resumed.events[-1]
    # Changes made while the client is away: the resumed stream starts with the status as it
    # is now (it sums up those missed), never the one the client has.
    await job.report(client, 60)
    await job.report(client, 80)
    [caught_up] = await first_frames(client, url, 1, {"Last-Event-ID": seen[1]})
    assert caught_up[2]["progress"] == 80 and caught_up[1] != seen[1]
    # Resumed with the current id: the next frame is the next change, and the stream ends
    # after the last.
    after = Collected()
    reader = asyncio.create_task(collect_sse(client, url, after,
                                             {"Last-Event-ID": caught_up[1]}))
    await job.report(client, 90)
    await after.reach(progress=90)
    job.release.set()
    async with asyncio.timeout(10):
        await reader
    assert [(data["status"], data["progress"]) for _, _, data in after.events] == [
        ("running", 90), ("succeeded", 100)]
    final = after.events[-1]
    # A finished job: resumed from its last event, the stream ends with nothing; from an older
    # one (or an id that names nothing), with the final status.
    nothing = Collected()
    await asyncio.wait_for(collect_sse(client, url, nothing, {"Last-Event-ID": final[1]}), 10)
    assert nothing.ended and nothing.events == []
    for older in (first[1], "not-an-id"):
        late = Collected()
        await asyncio.wait_for(collect_sse(client, url, late, {"Last-Event-ID": older}), 10)
        assert late.events == [final]


async def test_a_frame_that_breaks_rfc_6455_closes_with_1002(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    """A client's frame must be masked (RFC 6455 §5.1): wsproto's verdict goes back as a close
    frame with its code, and the connection ends."""
    sidecar = await sidecar_factory(events_config(origin.url, redis_url))
    job = await start_held_job(client, sidecar, origin)
    host, port = sidecar.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {job.accepted['events_url']} HTTP/1.1\r\nHost: {host}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
                      ).encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        # The first status, as an unmasked text frame from the server (§5.1: servers do not
        # mask): FIN + text, then its length.
        first = await asyncio.wait_for(reader.readexactly(2), 10)
        assert first[0] == 0x81 and not first[1] & 0x80
        length = first[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        assert json.loads(await reader.readexactly(length))["data"]["status"] == "running"
        writer.write(b"\x81\x02hi")  # a text frame, unmasked
        close = await asyncio.wait_for(reader.readexactly(4), 10)
        assert close[0] == 0x88  # FIN + close
        assert int.from_bytes(close[2:4], "big") == 1002  # protocol error
        await asyncio.wait_for(reader.read(), 10)  # then the sidecar hangs up
        assert reader.at_eof()
    finally:
        writer.close()
        job.release.set()
