"""Schedules (docs/jobs.md, "Schedules"): real sidecar processes on one real Redis, a real
upstream that notes each tick it is called for (the X-Sidecar-Tick header)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from support import Origin, make_config, until, write_config
from test_metrics import scrape, total

from sidecar.config import ConfigError, load_config


class TickLog:
    """The upstream's view: (tick, arrival time) per call on a path."""

    def __init__(self, origin: Origin, *paths: str, hold: asyncio.Event | None = None) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
        for path in paths:
            async def answer(request: web.Request, n: int, path: str = path) -> web.Response:
                tick = request.headers.get("X-Sidecar-Tick")
                if tick is not None:
                    stamp = datetime.fromisoformat(tick.replace("Z", "+00:00")).timestamp()
                    self.calls[path].append((stamp, time.time()))
                if hold is not None:
                    await hold.wait()
                return web.Response(text=f"{path} #{n}",
                                    headers={"Cache-Control": "max-age=3600"})
            origin.script(path, answer)

    def ticks(self, path: str) -> list[float]:
        return [tick for tick, _ in self.calls[path]]


def every(path: str, period: str = "2s", **more: Any) -> dict[str, Any]:
    return {"every": period, "route": "default", "request": {"path": path}, **more}


def assert_each_tick_once(ticks: list[float], period: float) -> None:
    assert len(ticks) == len(set(ticks)), f"a tick ran twice: {ticks}"
    steps = [round(b - a, 3) for a, b in itertools.pairwise(ticks)]
    assert steps == [period] * len(steps), f"ticks missed or out of order: {steps}"


@pytest.mark.slow
async def test_each_tick_runs_once_across_two_processes_and_a_kill(
        sidecar_process: Any, origin: Origin, redis_url: str) -> None:
    """Two instances (one of two workers) run an `every: 2s` schedule for about 12 s; one is
    killed with SIGKILL half-way and started again. Every tick reaches the upstream exactly
    once, on time, none missed."""
    log = TickLog(origin, "/tick")
    config = make_config(origin.url, redis_url, schedules={"beat": every("/tick")})
    config["server"]["watch_config"] = False
    a = sidecar_process(config, "a.yaml")
    b_config = make_config(origin.url, redis_url, schedules={"beat": every("/tick")})
    b_config["server"] |= {"workers": 2, "watch_config": False}
    b = sidecar_process(b_config, "b.yaml")

    async def calls(n: int) -> bool:
        return len(log.calls["/tick"]) >= n
    await until(lambda: calls(3), 15)
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    await until(lambda: calls(5), 15)
    a = sidecar_process(config, "a.yaml")
    await until(lambda: calls(7), 15)
    ticks = log.ticks("/tick")
    assert_each_tick_once(ticks, 2.0)
    late = [round(arrived - tick, 3) for tick, arrived in log.calls["/tick"]]
    # The first may be claimed by a process starting up to a grace (1 s) after its tick fell,
    # and its request is the first of a process still warming up beside two more starting
    # (a cold pool, imports on first use): on a loaded machine that took 0.6 s more.
    assert late[0] < 2.0 and max(late[1:]) < 0.5, late
    b.stop()


async def test_a_tick_whose_worker_died_mid_run_runs_again_once_its_lease_is_out(
        sidecar_process: Any, origin: Origin, redis_url: str) -> None:
    """What a worker killed while running a tick leaves in Redis: the tick claimed, not done,
    its lease running out. Another process runs it again once the lease is out, not before."""
    log = TickLog(origin, "/hourly")
    tick = time.time() // 3600 * 3600
    lease_out = time.time() + 1.5
    redis = aioredis.Redis.from_url(redis_url)
    await redis.hset("sidecar:schedule:hourly", mapping={
        "tick": int(tick * 1000), "done": int((tick - 3600) * 1000), "holder": "dead:1:x",
        "lease": int(lease_out * 1000)})
    await redis.aclose()
    proc = sidecar_process(make_config(origin.url, redis_url,
                                       schedules={"hourly": every("/hourly", "1h")}))
    await until(lambda: _called(origin, "/hourly", 1), 10)
    [(ran, arrived)] = log.calls["/hourly"]
    assert ran == tick and arrived >= lease_out
    async with aiohttp.ClientSession() as client:
        async def recorded() -> bool:
            return (await schedules_of(client, proc.admin_url))["hourly"]["runs"] == 1
        await until(recorded)
        listed = (await schedules_of(client, proc.admin_url))["hourly"]
    assert listed["last_run"]["trigger"] == "recovery"
    assert listed["last_run"]["outcome"] == "succeeded"
    assert listed["last_done"] == listed["last_tick"]
    await asyncio.sleep(1.5)  # a second's worth of re-checks: still one run
    assert origin.calls["/hourly"] == 1


@pytest.mark.slow
async def test_missed_ticks_run_once_or_are_skipped(
        sidecar_process: Any, origin: Origin, redis_url: str) -> None:
    """The only instance stops for more than three ticks: on its return the `once` schedule
    runs one tick for all it missed, at once; the `skip` schedule waits for the next tick."""
    log = TickLog(origin, "/once", "/skip")
    config = make_config(origin.url, redis_url, schedules={
        "once": every("/once", missed="once"), "skip": every("/skip", missed="skip")})
    proc = sidecar_process(config)

    async def both_ran() -> bool:
        return bool(log.calls["/once"]) and bool(log.calls["/skip"])
    await until(both_ran, 10)
    assert proc.stop() == 0
    stopped = time.time()
    before = {path: len(calls) for path, calls in log.calls.items()}

    async def three_ticks_passed() -> bool:
        return time.time() - 2 * (stopped // 2) >= 3 * 2 + 1.5  # 3 ticks, 1.5 s past the last
    await until(three_ticks_passed, 15)
    restarted = time.time()
    proc = sidecar_process(config, "again.yaml")

    async def both_ran_again() -> bool:  # on one tick they run at once, in either order
        return (len(log.calls["/skip"]) > before["/skip"]
                and len(log.calls["/once"]) > before["/once"])
    await until(both_ran_again, 10)
    once = log.calls["/once"][before["/once"]:]
    skip = log.calls["/skip"][before["/skip"]:]
    last_before = log.calls["/once"][before["/once"] - 1][0]
    # `once`: one run for every tick missed, ahead of the first regular tick (the first that
    # `skip` runs); when the new process came up just past a tick, that tick's run is the one.
    regular = skip[0][0]
    catch_up = [tick for tick, _ in once if tick < regular]
    assert once and (len(catch_up) == 1 or (not catch_up and once[0][0] == regular)), (
        once, skip, restarted)
    assert once[0][0] >= last_before + 3 * 2, (once, last_before)  # the last missed, or later
    # `skip`: nothing for the ticks that fell while it was down.
    assert all(tick > restarted - 1.0 for tick, _ in skip), (skip, restarted)
    async with aiohttp.ClientSession() as client:
        listed = await schedules_of(client, proc.admin_url)
    assert listed["skip"]["skipped"] >= 1, listed


# -- in one process ----------------------------------------------------------------------------


async def schedules_of(client: aiohttp.ClientSession, admin_url: str) -> dict[str, Any]:
    async with client.get(admin_url + "/admin/schedules") as response:
        assert response.status == 200
        return {s["name"]: s for s in (await response.json())["schedules"]}


async def test_on_start_warms_a_cached_route(sidecar_factory: Any, origin: Origin,
                                             redis_url: str,
                                             client: aiohttp.ClientSession) -> None:
    TickLog(origin, "/p/1", "/p/2")
    config = make_config(origin.url, redis_url, routes=[
        {"name": "products", "match": {"path": "/p/**"}, "upstream": "app",
         "cache": {"ttl": "60s"}}],
        schedules={"warm": {"every": "1h", "on_start": True, "route": "products",
                            "requests": [{"path": "/p/1"}, {"path": "/p/2"}]}})
    sidecar = await sidecar_factory(config)

    async def warmed() -> bool:
        return origin.calls["/p/1"] == origin.calls["/p/2"] == 1
    await until(warmed)
    assert origin.seen["/p/1"]["X-Sidecar-Schedule"] == "warm"
    assert "X-Sidecar-Tick" not in origin.seen["/p/1"]   # a start-up run is not a tick's
    for path in ("/p/1", "/p/2"):
        async with client.get(sidecar.url + path) as response:
            assert response.status == 200
            assert "hit" in response.headers["Cache-Status"], response.headers["Cache-Status"]
    assert origin.calls["/p/1"] == 1

    async def recorded() -> bool:
        return (await schedules_of(client, sidecar.admin_url))["warm"]["last_run"] is not None
    await until(recorded)
    listed = (await schedules_of(client, sidecar.admin_url))["warm"]
    assert listed["last_run"]["trigger"] == "start"
    assert [r["status"] for r in listed["last_run"]["requests"]] == [200, 200]
    assert listed["timetable"] == "every 3600s"
    assert listed["next_run"].endswith(":00:00.000Z")


async def test_a_second_start_within_a_period_does_not_run_on_start_again(
        sidecar_factory: Any, origin: Origin, redis_url: str) -> None:
    TickLog(origin, "/w")
    schedules = {"warm": every("/w", "1h", on_start=True)}
    await sidecar_factory(make_config(origin.url, redis_url, schedules=schedules), "1.yaml")
    await until(lambda: _called(origin, "/w", 1))
    await sidecar_factory(make_config(origin.url, redis_url, schedules=schedules), "2.yaml")
    await asyncio.sleep(0.5)  # what would have been time enough for the first
    assert origin.calls["/w"] == 1


async def _called(origin: Origin, path: str, n: int) -> bool:
    return origin.calls[path] >= n


async def test_run_now_on_an_offloaded_route_makes_a_job(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/api/reports", body='{"rows": 3}')
    config = make_config(origin.url, redis_url, routes=[
        {"name": "reports", "match": {"path": "/api/reports", "methods": ["POST"]},
         "upstream": "app", "offload": {}}],
        schedules={"nightly": {"cron": "0 2 * * *", "timezone": "Europe/Paris",
                               "route": "reports",
                               "request": {"method": "POST", "path": "/api/reports?range=day",
                                           "headers": {"X-Tenant": "acme"}, "body": "{}"}}})
    sidecar = await sidecar_factory(config)
    async with client.post(sidecar.admin_url + "/admin/schedules/nightly/run") as response:
        assert response.status == 200
        run = await response.json()
    assert run["outcome"] == "succeeded" and run["trigger"] == "manual"
    [request] = run["requests"]
    assert request["status"] == 202 and request["job"]

    async def job_done() -> bool:
        async with client.get(f"{sidecar.admin_url}/admin/jobs/{request['job']}") as response:
            return response.status == 200 and (await response.json())["status"] == "succeeded"
    await until(job_done)
    assert origin.seen["/api/reports"]["X-Tenant"] == "acme"
    assert origin.seen["/api/reports"]["X-Sidecar-Schedule"] == "nightly"
    listed = (await schedules_of(client, sidecar.admin_url))["nightly"]
    assert listed["timetable"] == "cron 0 2 * * * (Europe/Paris)"
    assert listed["next_run"].endswith("T01:00:00.000Z")  # 02:00 in Paris, in winter
    async with client.post(sidecar.admin_url + "/admin/schedules/nope/run") as response:
        assert response.status == 404
        assert "known: nightly" in (await response.json())["detail"]


async def test_a_failing_request_fails_the_run_and_is_counted(
        sidecar_factory: Any, origin: Origin, redis_url: str,
        client: aiohttp.ClientSession) -> None:
    origin.reply("/broken", status=500)
    config = make_config(origin.url, redis_url, schedules={"b": every("/broken", "1h")})
    sidecar = await sidecar_factory(config)
    async with client.post(sidecar.admin_url + "/admin/schedules/b/run") as response:
        run = await response.json()
    assert run["outcome"] == "failed" and run["requests"][0]["status"] == 500
    samples = await scrape(sidecar.admin_url)
    assert total(samples, "sidecar_schedule_runs_total", schedule="b", outcome="failed") == 1


def test_check_locates_schedule_errors(tmp_path: Path) -> None:
    config = make_config("http://127.0.0.1:1", "redis://127.0.0.1:1", schedules={
        "cron": {"cron": "0 25 * * *", "route": "default", "request": {"path": "/x"}},
        "zone": {"every": "1m", "timezone": "Europe/Nowhere", "route": "default",
                 "request": {"path": "/x"}},
        "both": {"every": "1m", "cron": "* * * * *", "route": "default",
                 "request": {"path": "/x"}},
        "fast": {"every": "100ms", "route": "default", "request": {"path": "/x"}},
    })
    with pytest.raises(ConfigError) as raised:
        load_config(write_config(tmp_path / "c.yaml", config))
    text = str(raised.value)
    assert "schedules.cron.cron: invalid cron expression '0 25 * * *'" in text
    assert "schedules.zone.timezone: unknown time zone 'Europe/Nowhere'" in text
    assert "schedules.both: give either cron" in text
    assert "schedules.fast.every" in text
    route = make_config("http://127.0.0.1:1", "redis://127.0.0.1:1",
                        schedules={"r": every("/x", route="nope")})
    with pytest.raises(ConfigError, match=r"schedules\.r\.route: no route is named 'nope'"):
        load_config(write_config(tmp_path / "r.yaml", route))
