"""What a cache miss and an invalidating POST cost, end to end on one machine: one sidecar
(in this process) in front of a local upstream, a local redis-server. Prints the median and the
99th percentile of each, in microseconds (docs/caching.md, "One cache across workers").

    PYTHONPATH=. python loadtests/miss_cost.py [requests]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import RedisServer, make_config, write_config

from sidecar.app import Runtime
from sidecar.config import load_config


async def upstream(request: web.Request) -> web.Response:
    return web.Response(text="x" * 2048, headers={"Cache-Control": "max-age=60"})


def summary(name: str, seconds: list[float]) -> str:
    us = sorted(s * 1e6 for s in seconds)
    return (f"{name}: median {statistics.median(us):.0f} us, "
            f"p99 {us[int(len(us) * 0.99)]:.0f} us ({len(us)} requests)")


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", upstream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = make_config(f"http://127.0.0.1:{port}", redis.url, routes=[{
            "name": "cached", "match": {"path": "/**", "methods": ["GET", "POST"]},
            "upstream": "app", "cache": {"ttl": "60s"}}])
        loaded = load_config(write_config(Path(tmp) / "config.yaml", config))
        runtime = Runtime(loaded, loaded.config.redis.url)
        await runtime.start()
        url = f"http://127.0.0.1:{runtime.public_port}"
        try:
            async with aiohttp.ClientSession() as client:
                await asyncio.sleep(0.3)
                misses, posts, hits = [], [], []
                for i in range(n + 50):
                    started = time.perf_counter()
                    async with client.get(f"{url}/m/{i}") as response:
                        await response.read()
                    if i >= 50:  # the first ones warm connections up
                        misses.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    async with client.get(f"{url}/m/{i}") as response:
                        await response.read()
                    hits.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    async with client.post(f"{url}/m/{i}") as response:
                        await response.read()
                    if i >= 50:
                        posts.append(time.perf_counter() - started)
                print(summary("miss (fetched, stored)", misses))
                print(summary("L1 hit", hits))
                print(summary("invalidating POST", posts))
        finally:
            await runtime.stop()
            await runner.cleanup()
            redis.kill()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
