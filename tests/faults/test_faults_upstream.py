"""Upstream faults: refused connections, a full accept queue, answers too slow, connections
closed or reset mid-response, bytes that are not HTTP, bodies shorter than announced, a chunked
body cut short, answers nobody asked for. The upstream is a raw TCP server that writes HTTP by
hand, so it can break every rule.

What must hold (docs/resilience.md, docs/architecture.md "Errors"): the client gets a 502/504
with the JSON error within the configured timeout and some slack, or, when the head was already
sent, a connection cut before the end of the body: never a wrong or incomplete body presented
as complete. The breaker counts these failures; and nothing leaks: the sidecar's descriptors
are back where they were once the faulty requests are over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from support import (
    InProcessSidecar,
    SidecarProcess,
    free_port,
    gather_limited,
    make_config,
)
from test_jobs import Reply, error_of

Factory = Callable[..., Awaitable[InProcessSidecar]]

TIMEOUT = 1.0  # the routes' timeout, and the connect timeout
SLACK = 2.0  # for a busy machine
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)  # a hung request fails the test, not pytest
BIG = 1 << 20  # announced by the answers that are streamed (over the 256 KiB kept whole)
IDLE = 0.5  # the faulty upstream closes connections idle this long (as servers do)


def ok_body(target: str) -> bytes:
    return b"ok " + target.encode()


class FaultyUpstream:
    """HTTP/1.1 by hand on a raw TCP server. `?do=<fault>` picks the answer; without it the
    answer is a correct one whose body names the request target. Counts requests per fault."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            keep = True
            while keep:
                async with asyncio.timeout(IDLE):
                    head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                fault = target.partition("do=")[2] or "ok"
                self.requests[fault] += 1
                keep = await self._answer(fault, target, reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()
            self._handlers.discard(task)

    async def _answer(self, fault: str, target: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Write the answer; whether the connection may serve another request."""
        body = ok_body(target)
        whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        match fault:
            case "ok":
                writer.write(whole)
                return True
            case "extra":  # a second answer to one request, in the same write
                writer.write(whole + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")
                return True
            case "garbage":
                writer.write(b"\x16\x03\x01\x02\x00 this is not HTTP at all\r\n\r\n")
            case "bad-status":
                writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok")
                await self._hold(reader)
            case "short":  # fewer bytes than announced, then the connection closes
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body)
            case "reset":  # the head, then a TCP reset
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            case "stall":  # fewer bytes than announced, then silence
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body)
                await self._hold(reader)
            case "huge-head":  # 1 MiB of header lines, and no end to them
                writer.write(b"HTTP/1.1 200 OK\r\n")
                for n in range(1024):
                    writer.write(b"X-Filler-%d: %s\r\n" % (n, b"a" * 1000))
                    await writer.drain()
                await self._hold(reader)
            case "slow":  # no answer within the timeout
                await self._hold(reader)
            case "short-big":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG
                             + b"x" * (300 * 1024))
            case "stall-big":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG
                             + b"x" * (300 * 1024))
                await self._hold(reader)
            case "chunked-cut":  # no last chunk
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n" % (len(body), body) * 3)
            case _:
                raise AssertionError(f"unknown fault {fault}")
        await writer.drain()
        return False

    @staticmethod
    async def _hold(reader: asyncio.StreamReader) -> None:
        """Until the sidecar hangs up (10 s at most)."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(10):
                await reader.read()


@pytest.fixture
async def faulty() -> AsyncIterator[FaultyUpstream]:
    upstream = FaultyUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: connecting there hangs (the kernel drops the SYN)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    yield port
    filler.close()
    listener.close()


def faults_config(faulty: FaultyUpstream, redis_url: str, hole_port: int,
                  **sections: Any) -> dict[str, Any]:
    config = make_config(faulty.url, redis_url, routes=[
        {"name": "guarded", "match": {"path": "/guarded/**"}, "upstream": "app",
         "breaker": {"failures": 3, "reset": "30s"}},
        {"name": "down", "match": {"path": "/down/**"}, "upstream": "down"},
        {"name": "hole", "match": {"path": "/hole/**"}, "upstream": "hole"},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ], jobs={"workers": False}, **sections)
    timeouts = {"timeout": f"{TIMEOUT:g}s", "connect_timeout": f"{TIMEOUT:g}s"}
    config["upstreams"] = {
        "app": {"url": faulty.url, **timeouts},
        "down": {"url": f"http://127.0.0.1:{free_port()}", **timeouts},
        "hole": {"url": f"http://127.0.0.1:{hole_port}", **timeouts},
    }
    return config


# What each fault must give: (status, error code) before any byte of the head, or "cut": the
# head, then the connection closed before the announced end of the body.
EXPECTED: dict[str, tuple[int, str] | str] = {
    "/down/x": (502, "upstream_connect_error"),
    "/hole/x": (504, "upstream_timeout"),
    "/x?do=slow": (504, "upstream_timeout"),
    "/x?do=garbage": (502, "upstream_protocol_error"),
    "/x?do=bad-status": (502, "upstream_protocol_error"),
    "/x?do=short": (502, "upstream_protocol_error"),
    "/x?do=reset": (502, "upstream_protocol_error"),
    "/x?do=stall": (504, "upstream_timeout"),
    "/x?do=huge-head": (502, "upstream_protocol_error"),
    "/x?do=short-big": "cut",
    "/x?do=stall-big": "cut",
    "/x?do=chunked-cut": "cut",
}


async def outcome(session: aiohttp.ClientSession, url: str) -> tuple[float, Reply | bytes]:
    """(seconds, the reply) or (seconds, the bytes read before the connection was cut)."""
    started = time.monotonic()
    async with session.get(url) as response:
        got = b""
        try:
            async for chunk in response.content.iter_any():
                got += chunk
        except aiohttp.ClientPayloadError:
            assert response.status == 200
            return time.monotonic() - started, got
        return time.monotonic() - started, Reply(response.status, response.headers, got)


def check(target: str, seconds: float, got: Reply | bytes) -> None:
    expected = EXPECTED[target]
    assert seconds < TIMEOUT + SLACK, (target, seconds)
    if expected == "cut":
        assert isinstance(got, bytes), (target, got)
        assert set(got) <= set(b"x" + ok_body(target) + b"\r\n0123456789abcdef"), target
        return
    assert isinstance(got, Reply), (target, got)
    assert (got.status, error_of(got)) == expected, (target, got.body)


@pytest.mark.slow
async def test_each_fault_answers_an_error_or_cuts_the_body_in_bounded_time(
        sidecar_factory: Factory, faulty: FaultyUpstream, full_backlog: int,
        redis_url: str) -> None:
    sidecar = await sidecar_factory(faults_config(faulty, redis_url, full_backlog))
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        for _ in range(2):  # the second time on connections that saw the first
            for target in EXPECTED:
                check(target, *await outcome(session, sidecar.url + target))
        _, got = await outcome(session, sidecar.url + "/after")
        assert isinstance(got, Reply) and (got.status, got.body) == (200, ok_body("/after"))


async def test_a_second_answer_to_one_request_is_never_taken_for_the_next(
        sidecar_factory: Factory, faulty: FaultyUpstream, full_backlog: int,
        redis_url: str) -> None:
    """An upstream that answers twice: the extra answer must not become the answer to the
    next request sent on that connection (a desync: wrong bodies from then on)."""
    sidecar = await sidecar_factory(faults_config(faulty, redis_url, full_backlog))
    wrong: list[tuple[str, int | str, bytes]] = []
    # Each request is over in one timeout, or hangs: waiting longer would not change that.
    timeout = aiohttp.ClientTimeout(total=TIMEOUT + SLACK + 2)

    async def client(index: int) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for n in range(30):
                target = f"/item/{index}/{n}" + ("?do=extra" if n % 3 == 0 else "")
                try:
                    async with session.get(sidecar.url + target) as response:
                        body = await response.read()
                        if (response.status, body) != (200, ok_body(target)):
                            wrong.append((target, response.status, body[:100]))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    wrong.append((target, repr(exc), b""))

    await asyncio.gather(*(client(i) for i in range(8)))
    assert wrong == []
    assert faulty.requests["extra"] == 80


async def test_the_breaker_counts_invalid_answers_and_timeouts_then_answers_fast(
        sidecar_factory: Factory, faulty: FaultyUpstream, full_backlog: int,
        redis_url: str) -> None:
    sidecar = await sidecar_factory(faults_config(faulty, redis_url, full_backlog))
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        for fault in ("garbage", "short", "slow"):  # three failures in a row, each its kind
            _, got = await outcome(session, sidecar.url + f"/guarded/x?do={fault}")
            assert isinstance(got, Reply) and got.status in (502, 504), got
        sent = sum(faulty.requests.values())
        for _ in range(20):
            seconds, got = await outcome(session, sidecar.url + "/guarded/x?do=slow")
            assert isinstance(got, Reply) and error_of(got) == "breaker_open"
            assert got.status == 503 and int(got.headers["Retry-After"]) >= 1
            assert seconds < TIMEOUT, seconds  # no timeout's wait
    assert sum(faulty.requests.values()) == sent


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled(pid: int, at_most: int | None = None) -> int:
    """The process's descriptor count once it stops moving (and is at most `at_most`)."""
    last = -1
    steady = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        count = descriptors(pid)
        steady = steady + 1 if count == last else 0
        last = count
        if steady >= 3 and (at_most is None or count <= at_most):
            return count
    raise AssertionError(f"descriptors of {pid} did not settle: {last}, wanted <= {at_most}")


@pytest.mark.slow
async def test_hundreds_of_faulty_requests_leak_no_descriptors(
        sidecar_process: Callable[..., SidecarProcess], faulty: FaultyUpstream,
        full_backlog: int, redis_url: str) -> None:
    proc = sidecar_process(faults_config(faulty, redis_url, full_backlog))
    pid = proc.process.pid
    targets = [*EXPECTED, "/ok/1", "/ok/2?do=extra"]

    async def round_of(count: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20),
                                         timeout=CLIENT_TIMEOUT) as session:
            async def one(target: str) -> None:
                seconds, got = await outcome(session, proc.url + target)
                if target in EXPECTED:
                    check(target, seconds, got)
                else:
                    assert isinstance(got, Reply) and got.status == 200

            await gather_limited([one(targets[i % len(targets)]) for i in range(count)], 20)

    await round_of(2 * len(targets))  # everything made once: pools, buffers, log handlers
    before = await settled(pid)
    await round_of(300)
    after = await settled(pid, at_most=before + 3)
    assert after <= before + 3
