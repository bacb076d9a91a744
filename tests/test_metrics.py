"""Prometheus metrics, Server-Timing and /admin/config: counts that add up exactly to the
requests sent (one process and two worker processes), the exposition format as Prometheus
parses it, and the pure parts (histogram buckets, merging workers' figures) without sockets."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from support import InProcessSidecar, Origin, make_config, until

from sidecar.admin import redacted
from sidecar.config import ConfigError, load_config
from sidecar.edge.handler import _server_timing
from sidecar.metrics import FLUSH_INTERVAL, Histogram, Recorder, merge
from sidecar.pipeline import ProxyResponse

Factory = Callable[..., Awaitable[InProcessSidecar]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(value for (sample, have), value in samples.items() if sample == name
               and set(labels.items()) <= set(have))


async def scrape(admin_url: str, headers: dict[str, str] | None = None) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(
            admin_url + "/metrics", headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await response.text())


def routes_config(origin: Origin, redis_url: str, **sections: Any) -> dict[str, Any]:
    routes = [
        {"name": "cached", "match": {"path": "/cached/**"}, "upstream": "app",
         "cache": {"ttl": "60s"}},
        {"name": "shared", "match": {"path": "/shared/**"}, "upstream": "app", "dedup": {}},
        {"name": "limited", "match": {"path": "/limited/**"}, "upstream": "app",
         "rate_limit": {"rate": "1/m", "burst": 2}},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    return make_config(origin.url, redis_url, routes=routes, **sections)


def script_origin(origin: Origin, gate: asyncio.Event | None = None) -> None:
    origin.reply("/cached/a", headers={"Cache-Control": "max-age=60"})
    origin.reply("/default/ok")
    origin.reply("/default/boom", status=503)
    origin.reply("/limited/x")

    async def slow(request: web.Request, n: int) -> web.Response:
        if gate is not None:
            await gate.wait()
        return web.Response(text="shared")

    origin.script("/shared/s", slow)


async def traffic(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """A known mix: 5 GET /cached/a (1 miss, 4 hits), 3 GET + 2 POST /default/ok, 2 x 503,
    4 GET /limited/x (2 let through, 2 refused)."""
    sent: dict[str, Any] = {}
    for _ in range(5):
        async with client.get(url + "/cached/a") as response:
            assert response.status == 200
            await response.read()
    for method in ("GET", "GET", "GET", "POST", "POST"):
        async with client.request(method, url + "/default/ok", data=b"x") as response:
            assert response.status == 200
    for _ in range(2):
        async with client.get(url + "/default/boom") as response:
            assert response.status == 503
    statuses = []
    for _ in range(4):
        async with client.get(url + "/limited/x") as response:
            statuses.append(response.status)
    assert statuses == [200, 200, 429, 429]
    sent["requests"] = 5 + 5 + 2 + 4
    return sent


def check_traffic(samples: Samples, times: int = 1) -> None:
    """What `traffic` and the six shared requests must have counted."""
    assert total(samples, "sidecar_requests_total", route="cached", method="GET",
                 status="2xx") == 5 * times
    assert total(samples, "sidecar_requests_total", route="default", method="GET",
                 status="2xx") == 3 * times
    assert total(samples, "sidecar_requests_total", route="default", method="POST",
                 status="2xx") == 2 * times
    assert total(samples, "sidecar_requests_total", route="default", status="5xx") == 2 * times
    assert total(samples, "sidecar_requests_total", route="limited", status="2xx") == 2 * times
    assert total(samples, "sidecar_requests_total", route="limited", status="4xx") == 2 * times
    assert total(samples, "sidecar_ratelimit_rejected_total", route="limited") == 2 * times
    for route, count in (("cached", 5), ("default", 7), ("limited", 4)):
        assert total(samples, "sidecar_request_duration_seconds_count",
                     route=route) == count * times
        assert total(samples, "sidecar_request_duration_seconds_bucket", route=route,
                     le="+Inf") == count * times
    # 1 miss + 7 default + 2 let through by the limiter + the 6 shared ones' leader
    assert total(samples, "sidecar_upstream_requests_total", upstream="app",
                 status="2xx") == (1 + 5 + 2 + 1) * times
    assert total(samples, "sidecar_upstream_requests_total", upstream="app",
                 status="5xx") == 2 * times
    assert total(samples, "sidecar_upstream_duration_seconds_count",
                 upstream="app") == 11 * times


async def test_counts_add_up_to_the_requests_sent(sidecar_factory: Factory, origin: Origin,
                                                  redis_url: str, client) -> None:
    gate = asyncio.Event()
    script_origin(origin, gate)
    sidecar = await sidecar_factory(routes_config(origin, redis_url))
    await traffic(client, sidecar.url)

    # 6 identical requests in flight together: one leader, five followers.
    async def shared() -> int:
        async with client.get(sidecar.url + "/shared/s") as response:
            await response.read()
            return response.status

    async def six_in_flight() -> bool:
        return sidecar.runtime.metrics.inflight == 6

    calls = [asyncio.create_task(shared()) for _ in range(6)]
    await until(six_in_flight)
    during = await scrape(sidecar.admin_url)
    assert total(during, "sidecar_inflight_requests") == 6
    gate.set()
    assert await asyncio.gather(*calls) == [200] * 6

    samples = await scrape(sidecar.admin_url)
    check_traffic(samples)
    assert total(samples, "sidecar_cache_requests_total", route="cached", layer="none",
                 result="miss") == 1
    assert total(samples, "sidecar_cache_requests_total", route="cached", layer="memory",
                 result="hit") == 4
    assert total(samples, "sidecar_cache_requests_total", route="cached") == 5
    assert total(samples, "sidecar_dedup_total", route="shared", role="leader") == 1
    assert total(samples, "sidecar_dedup_total", route="shared", role="follower") == 5
    assert total(samples, "sidecar_requests_total", route="shared") == 6
    assert origin.calls["/shared/s"] == 1
    assert total(samples, "sidecar_inflight_requests") == 0
    assert total(samples, "sidecar_cache_entries", layer="memory") == 1
    assert total(samples, "sidecar_cache_bytes", layer="memory") > 0
    assert ("sidecar_cache_bytes", (("layer", "redis"),)) in samples
    assert total(samples, "sidecar_redis_up") == 1
    assert total(samples, "sidecar_config_reloads_total", result="ok") == 0
    assert total(samples, "sidecar_sla_latency_seconds", route="cached") == 0.5
    assert total(samples, "sidecar_build_info") == 1
    assert total(samples, "sidecar_workers") == 1
    assert total(samples, "process_resident_memory_bytes") > 10 * 1024**2
    assert total(samples, "process_open_fds") > 0
    assert total(samples, "process_cpu_seconds_total") > 0
    # The histogram is cumulative and its sum is the time spent.
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value
                     in samples.items() if name == "sidecar_request_duration_seconds_bucket"
                     and dict(labels)["route"] == "default")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert 0 < total(samples, "sidecar_request_duration_seconds_sum", route="default") < 7 * 5


async def test_status_codes_sla_and_buckets_from_the_config(sidecar_factory: Factory,
                                                            origin: Origin, redis_url: str,
                                                            client) -> None:
    script_origin(origin)
    sidecar = await sidecar_factory(routes_config(origin, redis_url, metrics={
        "status_label": "code", "buckets": ["10ms", "1s"],
        "sla": {"latency_p95": "300ms", "error_ratio": 0.05,
                "routes": {"cached": {"latency_p95": "50ms"}}}}))
    async with client.get(sidecar.url + "/default/boom") as response:
        assert response.status == 503
    async with client.get(sidecar.url + "/nowhere-but-default") as response:
        assert response.status == 404
    samples = await scrape(sidecar.admin_url)
    assert total(samples, "sidecar_requests_total", route="default", status="503") == 1
    assert total(samples, "sidecar_requests_total", route="default", status="404") == 1
    les = {dict(labels)["le"] for (name, labels) in samples
           if name == "sidecar_request_duration_seconds_bucket"}
    assert les == {"0.01", "1.0", "+Inf"}
    assert total(samples, "sidecar_sla_latency_seconds", route="cached") == 0.05
    assert total(samples, "sidecar_sla_latency_seconds", route="default") == 0.3
    assert total(samples, "sidecar_sla_error_ratio", route="cached") == 0.05


async def test_server_timing_says_what_the_cache_and_the_upstream_did(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    script_origin(origin)
    sidecar = await sidecar_factory(routes_config(origin, redis_url))
    timings = []
    for _ in range(2):
        async with client.get(sidecar.url + "/cached/a") as response:
            timings.append(response.headers["Server-Timing"])
    miss, hit = (dict(part.strip().split(";", 1) for part in t.split(",")) for t in timings)
    assert miss["cache"] == "desc=miss"
    assert float(miss["upstream"].removeprefix("dur=")) > 0
    assert hit["cache"] == "desc=hit" and "upstream" not in hit
    assert float(hit["total"].removeprefix("dur=")) < float(miss["total"].removeprefix("dur="))
    # a part of something not stored goes to the upstream as it came
    async with client.get(sidecar.url + "/cached/b", headers={"Range": "bytes=0-1"}) as response:
        assert response.headers["Server-Timing"].startswith("cache;desc=bypass, upstream;dur=")
    async with client.get(sidecar.url + "/cached/a", headers={"Range": "bytes=0-1"}) as response:
        assert response.status == 206
        assert response.headers["Server-Timing"].startswith("cache;desc=hit, total;dur=")
    async with client.get(sidecar.url + "/default/ok",
                          headers={"Connection": "close"}) as response:  # the header dict path
        parts = response.headers["Server-Timing"].split(", ")
        assert [p.split(";")[0] for p in parts] == ["upstream", "total"]


async def test_metrics_and_server_timing_can_be_turned_off(sidecar_factory: Factory,
                                                           origin: Origin, redis_url: str,
                                                           client) -> None:
    script_origin(origin)
    sidecar = await sidecar_factory(routes_config(origin, redis_url, metrics={
        "enabled": False, "server_timing": False}))
    async with client.get(sidecar.url + "/cached/a") as response:
        assert "Server-Timing" not in response.headers
    async with client.get(sidecar.admin_url + "/metrics") as response:
        assert response.status == 404
        assert (await response.json())["error"] == "metrics_disabled"
    assert sidecar.runtime.metrics.requests == {}


async def test_metrics_need_the_admin_token_and_the_config_hides_secrets(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client) -> None:
    script_origin(origin)
    config = routes_config(origin, redis_url, admin={"token": "s3cret-token"})
    config["jobs"] = {"progress_url": "http://user:hunter2@127.0.0.1:9"}
    sidecar = await sidecar_factory(config)
    async with client.get(sidecar.admin_url + "/metrics") as response:
        assert response.status == 401
    auth = {"Authorization": "Bearer s3cret-token"}
    assert ("sidecar_redis_up", ()) in await scrape(sidecar.admin_url, auth)
    async with client.get(sidecar.admin_url + "/admin/config", headers=auth) as response:
        assert response.status == 200
        text = await response.text()
        view = await response.json()
    assert "s3cret-token" not in text and "hunter2" not in text
    assert view["config"]["admin"]["token"] == "<redacted>"
    assert view["config"]["jobs"]["progress_url"] == "http://user:<redacted>@127.0.0.1:9"
    assert view["config"]["metrics"]["sla"]["latency_p95"] == 0.5  # defaults filled in
    assert [r["name"] for r in view["config"]["routes"]] == [
        "cached", "shared", "limited", "default"]
    async with client.get(sidecar.admin_url + "/admin/stats", headers=auth) as response:
        stats = await response.json()
    assert stats["requests"]["in_flight"] == 0
    assert stats["requests"]["redis_up"] is True


def test_an_sla_for_an_unknown_route_and_bad_buckets_are_config_errors(tmp_path) -> None:
    import yaml

    config = make_config("http://127.0.0.1:1", "redis://127.0.0.1:1", metrics={
        "buckets": ["1s", "100ms"], "sla": {"routes": {"nope": {"latency_p95": "1s"}}}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert "increasing order" in text
    config["metrics"]["buckets"] = ["100ms", "1s"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "metrics.sla.routes.nope" in str(error.value)
    assert "no route is named 'nope'" in str(error.value)


async def test_job_metrics_come_from_the_queue(sidecar_factory: Factory, origin: Origin,
                                               redis_url: str, client) -> None:
    origin.reply("/jobs/run", body="done")
    routes = [{"name": "jobs", "match": {"path": "/jobs/**"}, "upstream": "app",
               "offload": {"queue": "work"}},
              {"name": "default", "match": {"path": "/**"}, "upstream": "app"}]
    sidecar = await sidecar_factory(make_config(origin.url, redis_url, routes=routes,
                                                queues={"work": {"concurrency": 2}}))
    urls = []
    for _ in range(3):
        async with client.post(sidecar.url + "/jobs/run", data=b"{}") as response:
            assert response.status == 202
            urls.append((await response.json())["status_url"])

    async def all_done() -> bool:
        samples = await scrape(sidecar.admin_url)
        return total(samples, "sidecar_jobs_total", queue="work", outcome="succeeded") == 3

    await until(all_done, 15)
    samples = await scrape(sidecar.admin_url)
    assert total(samples, "sidecar_job_duration_seconds_count", queue="work") == 3
    assert total(samples, "sidecar_job_duration_seconds_bucket", queue="work", le="+Inf") == 3
    assert total(samples, "sidecar_queue_depth", queue="work") == 0
    assert total(samples, "sidecar_jobs_running", queue="work") == 0
    assert total(samples, "sidecar_jobs_total", queue="work", outcome="failed") == 0
    async with client.get(sidecar.url + urls[0]) as response:
        assert response.status == 200
    samples = await scrape(sidecar.admin_url)
    assert total(samples, "sidecar_requests_total", route="_jobs", method="GET") == 1
    assert total(samples, "sidecar_requests_total", route="jobs", status="2xx") == 3


@pytest.mark.slow
async def test_two_workers_add_up(sidecar_process, origin: Origin, redis_url: str,
                                  client) -> None:
    gate = asyncio.Event()
    script_origin(origin, gate)
    config = routes_config(origin, redis_url, server={"workers": 2, "watch_config": False})
    # The limiter is per process (local scope): make it refuse nothing here.
    config["routes"][2]["rate_limit"] = {"rate": "1000/s", "burst": 1000}
    config["routes"][1]["dedup"] = {"scope": "cluster"}  # one leader for both workers
    proc = sidecar_process(config)
    connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
    async with aiohttp.ClientSession(connector=connector) as fresh:
        for _ in range(20):
            async with fresh.get(proc.url + "/default/ok") as response:
                assert response.status == 200
        for _ in range(10):
            async with fresh.get(proc.url + "/cached/a") as response:
                assert response.status == 200

        async def shared() -> int:
            async with fresh.get(proc.url + "/shared/s") as response:
                await response.read()
                return response.status

        # 8 identical requests spread over both workers, held at the upstream together.
        calls = [asyncio.create_task(shared()) for _ in range(8)]

        async def all_held() -> bool:
            # All 8 counted, and a second worker's leader (if any) waiting for the first.
            samples = await scrape(proc.admin_url)
            leaders = total(samples, "sidecar_dedup_total", route="shared", role="leader")
            waiting = total(samples, "sidecar_dedup_events_total", route="shared",
                            event="cluster_wait")
            return (total(samples, "sidecar_dedup_total", route="shared") == 8
                    and leaders - waiting == 1)

        await until(all_held, 10)
        gate.set()
        assert await asyncio.gather(*calls) == [200] * 8

    async def added_up() -> bool:
        samples = await scrape(proc.admin_url)
        return (total(samples, "sidecar_workers") == 2
                and total(samples, "sidecar_requests_total", route="default") == 20
                and total(samples, "sidecar_requests_total", route="cached") == 10
                and total(samples, "sidecar_requests_total", route="shared") == 8
                and total(samples, "sidecar_inflight_requests") == 0)

    await until(added_up, 10)
    # The contract: another worker's figures are at most FLUSH_INTERVAL old. Past that bound
    # (the requests are all answered), whichever worker answers a scrape has the same figures.
    await asyncio.sleep(FLUSH_INTERVAL * 1.5)
    for _ in range(6):  # whichever worker answers the scrape, the figures are the same
        samples = await scrape(proc.admin_url)
        assert total(samples, "sidecar_requests_total", route="default", status="2xx") == 20
        assert total(samples, "sidecar_request_duration_seconds_count", route="default") == 20
        assert total(samples, "sidecar_cache_requests_total", route="cached") == 10
        hits = total(samples, "sidecar_cache_requests_total", route="cached", result="hit")
        misses = total(samples, "sidecar_cache_requests_total", route="cached", result="miss")
        assert hits + misses == 10 and 1 <= misses <= 2  # each worker may miss once (L1)
        assert total(samples, "sidecar_inflight_requests") == 0  # scrapes are not requests
        assert total(samples, "process_resident_memory_bytes") > 2 * 10 * 1024**2
        assert total(samples, "sidecar_requests_total", route="shared") == 8
        leaders = total(samples, "sidecar_dedup_total", route="shared", role="leader")
        followers = total(samples, "sidecar_dedup_total", route="shared", role="follower")
        assert leaders + followers == 8
        assert leaders == origin.calls["/shared/s"] == 1  # one call for both workers
    assert origin.calls["/default/ok"] == 20


# -- the pure parts -----------------------------------------------------------------------------


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1]  # le=0.1: 0.05 and 0.1; le=1: 0.5 and 1.0; +Inf: 3
    assert math.isclose(histogram.sum, 4.65)


def test_methods_and_statuses_stay_bounded(tmp_path) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_config("http://127.0.0.1:1", "redis://127.0.0.1:1")))
    recorder = Recorder(load_config(path).config)
    for method, status in (("BREW", 418), ("BREW", 200), ("X" * 300, 200), ("GET", 999)):
        recorder.request("default", method, status, 0.01)
    assert recorder.requests == {("default", "other", "4xx"): 1,
                                 ("default", "other", "2xx"): 2,
                                 ("default", "GET", "other"): 1}


def test_merge_adds_counters_of_all_workers_and_gauges_of_live_ones() -> None:
    def snap(pid: int, requests: int, inflight: int, state: int) -> dict[str, Any]:
        return {"pid": pid,
                "counters": {"sidecar_requests_total": [["r", "GET", "2xx", requests]]},
                "gauges": {"sidecar_inflight_requests": [[inflight]],
                           "sidecar_redis_up": [[0 if pid == 2 else 1]],
                           "sidecar_breaker_state": [["app", "upstream:app", state]]},
                "histograms": {"sidecar_request_duration_seconds": [
                    ["r", [0.1, 1.0], [requests, 0, 0], 0.01 * requests]]}}

    merged = merge([snap(1, 3, 2, 0), snap(2, 4, 5, 2), snap(3, 10, 7, 1)], live={1, 2})
    assert merged["counters"]["sidecar_requests_total"][("r", "GET", "2xx")] == 17
    assert merged["gauges"]["sidecar_inflight_requests"][()] == 7  # 2 + 5; pid 3 is gone
    assert merged["gauges"]["sidecar_breaker_state"][("app", "upstream:app")] == 2  # worst
    assert merged["gauges"]["sidecar_redis_up"][()] == 0  # one worker cannot reach it
    counts, seconds = merged["histograms"]["sidecar_request_duration_seconds"][
        ("r", (0.1, 1.0))]
    assert counts == [17, 0, 0] and math.isclose(seconds, 0.17)


def test_server_timing_line() -> None:
    response = ProxyResponse(200, "OK", [], body=b"")
    assert re.fullmatch(rb"Server-Timing: total;dur=\d+\.\d{3}\r\n",
                        _server_timing(response, 0.0004))  # the seconds elapsed
    response.upstream_seconds = 0.0125
    response.cache = b"cache;desc=miss, "
    line = _server_timing(response, 0.0201)
    assert re.fullmatch(rb"Server-Timing: cache;desc=miss, upstream;dur=12\.500, "
                        rb"total;dur=20\.\d{3}\r\n", line), line


def test_redaction() -> None:
    config = {"admin": {"token": "t"}, "redis": {"url": "redis://:pw@host:6379/0"},
              "upstreams": {"a": {"url": "http://h/", "headers": {"X-Api-Key": "k"}}},
              "empty": {"password": ""}}
    assert redacted(config) == {
        "admin": {"token": "<redacted>"}, "redis": {"url": "redis://:<redacted>@host:6379/0"},
        "upstreams": {"a": {"url": "http://h/", "headers": {"X-Api-Key": "<redacted>"}}},
        "empty": {"password": ""}}
