"""The bundled example backend: something real for the demo, the tests and the load tests to
stand in front of. `python -m sidecar.examples.backend --port 8000`.

Routes:
  GET  /api/products/{id}   fast and cacheable (Cache-Control, ETag, Last-Modified)
  GET  /api/slow?delay=1.5  answers after `delay` seconds
  GET  /api/flaky?fail=0.5  fails with 503 at that rate (or `status=`)
  POST /api/reports         long-running report (`seconds=`), posts progress when given a URL
  GET  /bytes/{n}           n bytes, streamed in chunks (?chunked=1 drops Content-Length)
  ANY  /echo                the request as JSON: method, path, headers, body size and digest
  GET  /ws/echo             WebSocket echo
  GET  /stats               calls per path since start (tests count upstream calls with it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import time
from collections import Counter

from aiohttp import ClientSession, WSMsgType, web

CALLS: web.AppKey[Counter[str]] = web.AppKey("calls", Counter)
STARTED = time.time()


def _products(request: web.Request) -> web.Response:
    product_id = request.match_info["id"]
    body = json.dumps({
        "id": product_id, "name": f"Product {product_id}", "price": 9.99,
        "description": "x" * 900,
    }).encode()
    etag = '"' + hashlib.sha1(body).hexdigest()[:16] + '"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    return web.Response(body=body, content_type="application/json", headers={
        "Cache-Control": "public, max-age=30", "ETag": etag,
        "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(STARTED)),
        "Surrogate-Key": f"products product-{product_id}",
    })


async def products(request: web.Request) -> web.Response:
    return _products(request)


async def slow(request: web.Request) -> web.Response:
    delay = float(request.query.get("delay", "1"))
    await asyncio.sleep(delay)
    return web.json_response({"slept": delay})


async def flaky(request: web.Request) -> web.Response:
    rate = float(request.query.get("fail", "0.5"))
    if random.random() < rate:
        status = int(request.query.get("status", "503"))
        return web.json_response({"error": "flaky failure"}, status=status)
    return web.json_response({"ok": True})


async def reports(request: web.Request) -> web.Response:
    body = await request.read()
    seconds = float(request.query.get("seconds", "3"))
    progress_url = request.headers.get("X-Sidecar-Progress-Url")
    # The job's secret for that URL: sent back as it came, in a header.
    progress_auth = {"X-Sidecar-Progress-Token": request.headers.get("X-Sidecar-Progress-Token",
                                                                     "")}
    steps = 5
    async with ClientSession() as session:
        for step in range(1, steps + 1):
            await asyncio.sleep(seconds / steps)
            if progress_url:
                with contextlib.suppress(OSError):
                    await session.post(progress_url, headers=progress_auth,
                                       json={"progress": step * 100 // steps,
                                             "message": f"step {step}/{steps}"})
    return web.json_response({"report": "ready", "request_bytes": len(body),
                              "digest": hashlib.sha256(body).hexdigest()}, status=200)


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    total = int(request.match_info["n"])
    chunk = b"\x00\x01\x02\x03" * 16384  # 64 KiB
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") != "1":
        response.content_length = total
    await response.prepare(request)
    left = total
    while left > 0:
        piece = chunk if left >= len(chunk) else chunk[:left]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({
        "method": request.method, "path": request.path_qs,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_bytes": size, "body_sha256": digest.hexdigest(), "pid": os.getpid(),
    })


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("echo",))
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def index(request: web.Request) -> web.Response:
    return web.json_response({"hello": "from the example backend"})


async def stats(request: web.Request) -> web.Response:
    counts: Counter[str] = request.app[CALLS]
    return web.json_response(dict(counts))


@web.middleware
async def count_calls(request: web.Request, handler):  # type: ignore[no-untyped-def]
    if request.path != "/stats":
        request.app[CALLS][f"{request.method} {request.path}"] += 1
    return await handler(request)


def build_app() -> web.Application:
    app = web.Application(middlewares=[count_calls], client_max_size=1024**3)
    app[CALLS] = Counter()
    app.router.add_get("/api/products/{id}", products)
    app.router.add_get("/api/slow", slow)
    app.router.add_get("/api/flaky", flaky)
    app.router.add_post("/api/reports", reports)
    app.router.add_get("/bytes/{n:\\d+}", stream_bytes)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/ws/echo", ws_echo)
    app.router.add_get("/stats", stats)
    app.router.add_get("/", index)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The sidecar's example backend.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, access_log=None,
                print=lambda *a: print(f"example backend on http://{args.host}:{args.port}"))


if __name__ == "__main__":
    main()
