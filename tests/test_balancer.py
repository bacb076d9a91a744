"""Several servers behind one upstream (`upstreams.<name>.servers`): real replicas on their own
ports, one killed and started again; balance, passive ejection, active health checks."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import free_port, make_config, until, write_config
from test_metrics import scrape, total

from sidecar.config import ConfigError, load_config


class Replica:
    """One server of the upstream: answers its name on /who, 200 on /healthz."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gate: asyncio.Event | None = None  # /slow waits on it
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def who(request: web.Request) -> web.Response:
            return web.Response(text=self.name)

        async def slow(request: web.Request) -> web.Response:
            if self.gate is not None:
                await self.gate.wait()
            return web.Response(text=self.name)

        app = web.Application()
        app.router.add_get("/who", who)
        app.router.add_get("/slow", slow)
        app.router.add_get("/healthz", who)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started = [Replica(f"r{i}") for i in (1, 2, 3)]
    for replica in started:
        await replica.start()
    yield started
    for replica in started:
        await replica.stop()


def balanced(replicas: list[Replica], redis_url: str, **upstream: Any) -> dict[str, Any]:
    config = make_config(replicas[0].url, redis_url)
    config["upstreams"]["app"] = {"servers": [r.url for r in replicas], "timeout": "5s",
                                  "connect_timeout": "1s", **upstream}
    config["routes"][0]["retry"] = {"attempts": 1, "backoff": "1ms", "budget": "50%"}
    return config


async def who(client: aiohttp.ClientSession, sidecar: Any, n: int,
              path: str = "/who") -> Counter[str]:
    answered: Counter[str] = Counter()
    for _ in range(n):
        async with client.get(sidecar.url + path) as response:
            answered[await response.text() if response.status == 200
                     else str(response.status)] += 1
    return answered


def servers(sidecar: Any) -> dict[str, dict[str, Any]]:
    stats = sidecar.runtime.state.pools["app"].stats()
    return {server["url"]: server for server in stats["servers"]}


async def test_a_killed_server_is_ejected_without_failed_requests_and_back_after_checks(
        sidecar_factory: Any, redis_url: str, client: aiohttp.ClientSession,
        replicas: list[Replica]) -> None:
    r1, r2, _ = replicas
    sidecar = await sidecar_factory(balanced(
        replicas, redis_url, eject={"failures": 2, "backoff": "1m"},
        health={"path": "/healthz", "interval": "100ms", "timeout": "200ms", "healthy": 2,
                "unhealthy": 3}))
    assert await who(client, sidecar, 30) == {"r1": 10, "r2": 10, "r3": 10}  # in turn

    await r2.stop()
    answered = await who(client, sidecar, 60)
    assert answered["r2"] == 0 and answered["r1"] + answered["r3"] == 60  # retried elsewhere

    async def out() -> bool:  # by failures in a row, or by its health checks
        return not servers(sidecar)[r2.url]["healthy"]
    await until(out, 5)
    assert servers(sidecar)[r2.url]["ejections"] == 1
    answered = await who(client, sidecar, 30)
    assert answered == {"r1": 15, "r3": 15}
    samples = await scrape(sidecar.admin_url)
    assert total(samples, "sidecar_upstream_server_healthy", server=r2.url) == 0
    assert total(samples, "sidecar_upstream_server_healthy", server=r1.url) == 1
    assert total(samples, "sidecar_upstream_server_ejections_total", server=r2.url) == 1

    await r2.start()                    # same port: health checks bring it back

    async def back() -> bool:
        return bool(servers(sidecar)[r2.url]["healthy"])
    await until(back, 5)
    assert (await who(client, sidecar, 30))["r2"] >= 9


async def test_without_health_checks_an_ejected_server_is_back_after_its_backoff(
        sidecar_factory: Any, redis_url: str, client: aiohttp.ClientSession,
        replicas: list[Replica]) -> None:
    r2 = replicas[1]
    sidecar = await sidecar_factory(balanced(replicas, redis_url,
                                             eject={"failures": 1, "backoff": "500ms"}))
    await r2.stop()
    answered = await who(client, sidecar, 12)
    assert answered["r2"] == 0 and sum(answered.values()) == 12
    assert servers(sidecar)[r2.url]["back_in_s"] is not None
    await r2.start()

    async def back() -> bool:
        return bool(servers(sidecar)[r2.url]["healthy"])
    await until(back, 3)
    assert (await who(client, sidecar, 9))["r2"] >= 2


async def test_least_requests_passes_over_a_busy_server(
        sidecar_factory: Any, redis_url: str, client: aiohttp.ClientSession,
        replicas: list[Replica]) -> None:
    r1 = replicas[0]
    r1.gate = asyncio.Event()
    sidecar = await sidecar_factory(balanced(replicas, redis_url, balance="least_requests"))

    async def slow() -> str:
        async with client.get(sidecar.url + "/slow") as response:
            return await response.text()
    held = asyncio.create_task(slow())          # the first goes to r1, and stays there

    async def r1_busy() -> bool:
        return servers(sidecar)[r1.url]["inflight"] == 1
    await until(r1_busy)
    answered = await who(client, sidecar, 20)
    assert answered["r1"] == 0 and answered["r2"] + answered["r3"] == 20
    r1.gate.set()
    assert await held == "r1"


def test_servers_are_checked(tmp_path: Path) -> None:
    config = make_config("http://127.0.0.1:1", "redis://127.0.0.1:1")
    config["upstreams"]["app"] = {"url": "http://127.0.0.1:1",
                                  "servers": ["http://127.0.0.1:2"]}
    with pytest.raises(ConfigError, match=r"give url .* or servers .*, not both"):
        load_config(write_config(tmp_path / "a.yaml", config))
    config["upstreams"]["app"] = {"servers": ["http://127.0.0.1:2", "http://127.0.0.1:2"]}
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(write_config(tmp_path / "b.yaml", config))
    config["upstreams"]["app"] = {"servers": []}
    with pytest.raises(ConfigError, match="servers: a list of URLs"):
        load_config(write_config(tmp_path / "c.yaml", config))
