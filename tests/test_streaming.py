"""Bodies far larger than memory bounds stream through a real sidecar process both ways."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support import Backend, SidecarProcess, free_port, make_config

MiB = 1024 * 1024
TOTAL = 256 * MiB
# Uploads here are larger than the default server.limits.max_body (64 MiB).
BIG_BODIES = {"limits": {"max_body": "1GiB"}}
# Buffering the whole body (or even most of it) anywhere in the sidecar would blow through this.
MAX_GROWTH = 100 * MiB
# The example backend's /bytes/{n} pattern, in its 64 KiB chunks.
PATTERN = b"\x00\x01\x02\x03" * 16384

pytestmark = pytest.mark.slow


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set size so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def expected_download_sha256(total: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(total, len(PATTERN))
    for _ in range(full):
        digest.update(PATTERN)
    digest.update(PATTERN[:rest])
    return digest.hexdigest()


@pytest.fixture
async def proc(
    sidecar_process: Callable[..., SidecarProcess], backend: Backend, redis_url: str,
    client: aiohttp.ClientSession,
) -> SidecarProcess:
    """A sidecar process (workers: 1, so this pid serves) warmed up by one small request."""
    started = sidecar_process(make_config(backend.url, redis_url, server=BIG_BODIES))
    async with client.get(started.url + "/bytes/100000") as response:
        assert response.status == 200
        assert len(await response.read()) == 100000
    return started


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_download_streams_with_bounded_memory(
    proc: SidecarProcess, client: aiohttp.ClientSession, chunked: bool,
) -> None:
    total = TOTAL + 12345  # not a multiple of any chunk size
    before = peak_rss(proc.process.pid)
    digest = hashlib.sha256()
    received = 0
    url = f"{proc.url}/bytes/{total}" + ("?chunked=1" if chunked else "")
    async with client.get(url) as response:
        assert response.status == 200
        if chunked:
            assert "Content-Length" not in response.headers
            assert response.headers["Transfer-Encoding"] == "chunked"
        else:
            assert response.headers["Content-Length"] == str(total)
        async for chunk in response.content.iter_chunked(MiB):
            digest.update(chunk)
            received += len(chunk)
    assert received == total
    assert digest.hexdigest() == expected_download_sha256(total)
    growth = peak_rss(proc.process.pid) - before
    assert growth < MAX_GROWTH, f"sidecar peak RSS grew by {growth / MiB:.1f} MiB"


async def _upload_body(total: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    block = os.urandom(MiB)
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        # vary the content so a chunk dropped or repeated changes the digest
        piece = sent.to_bytes(8, "big") + piece[8:]
        digest.update(piece)
        sent += len(piece)
        yield piece


@pytest.mark.parametrize("with_length", [True, False])
async def test_large_upload_streams_with_bounded_memory(
    proc: SidecarProcess, client: aiohttp.ClientSession, backend: Backend, with_length: bool,
) -> None:
    total = TOTAL + 4321
    before = peak_rss(proc.process.pid)
    digest = hashlib.sha256()
    headers = {"Content-Length": str(total)} if with_length else {}
    async with client.post(proc.url + "/echo", data=_upload_body(total, digest),
                           headers=headers) as response:
        assert response.status == 200
        echo = await response.json()
    assert echo["body_bytes"] == total
    assert echo["body_sha256"] == digest.hexdigest()
    received = {k.lower(): v for k, v in echo["headers"]}
    if with_length:
        assert received["content-length"] == str(total)
    else:
        assert received["transfer-encoding"] == "chunked"
    growth = peak_rss(proc.process.pid) - before
    assert growth < MAX_GROWTH, f"sidecar peak RSS grew by {growth / MiB:.1f} MiB"
    assert backend.calls("POST /echo") == 1


async def test_slow_client_does_not_make_the_sidecar_buffer(
    proc: SidecarProcess, client: aiohttp.ClientSession,
) -> None:
    """The client stops reading for a while: the sidecar must stop reading the upstream too."""
    total = TOTAL
    before = peak_rss(proc.process.pid)
    digest = hashlib.sha256()
    received = 0
    async with client.get(f"{proc.url}/bytes/{total}") as response:
        first = await response.content.readexactly(MiB)
        digest.update(first)
        received += len(first)
        # The backend could push the whole body in well under this pause.
        await asyncio.sleep(1.5)
        async for chunk in response.content.iter_chunked(MiB):
            digest.update(chunk)
            received += len(chunk)
    assert received == total
    assert digest.hexdigest() == expected_download_sha256(total)
    growth = peak_rss(proc.process.pid) - before
    assert growth < MAX_GROWTH, f"sidecar peak RSS grew by {growth / MiB:.1f} MiB"


@pytest.fixture
async def stalling_upstream() -> AsyncIterator[str]:
    """An upstream that waits before reading the request body, then echoes its size and digest."""

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"body_bytes": size, "body_sha256": digest.hexdigest()})

    app = web.Application(client_max_size=0)
    app.router.add_post("/upload", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_slow_upstream_does_not_make_the_sidecar_buffer_the_upload(
    sidecar_process: Callable[..., SidecarProcess], stalling_upstream: str, redis_url: str,
    client: aiohttp.ClientSession,
) -> None:
    proc = sidecar_process(make_config(stalling_upstream, redis_url, server=BIG_BODIES))
    total = TOTAL
    before = peak_rss(proc.process.pid)
    digest = hashlib.sha256()
    async with client.post(proc.url + "/upload", data=_upload_body(total, digest),
                           headers={"Content-Length": str(total)}) as response:
        assert response.status == 200
        echo = await response.json()
    assert echo["body_bytes"] == total
    assert echo["body_sha256"] == digest.hexdigest()
    growth = peak_rss(proc.process.pid) - before
    assert growth < MAX_GROWTH, f"sidecar peak RSS grew by {growth / MiB:.1f} MiB"
