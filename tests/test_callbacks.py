"""Job callbacks end to end (docs/jobs.md, "Callbacks"): real Redis, the job workers inside an
in-process sidecar (or a real `sidecar run` process, killed), a scripted origin as the
upstream, and a real HTTP receiver on a free port that checks nothing itself: each test
verifies the signature the way the docs tell a receiver to."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families
from saq.job import Status
from support import InProcessSidecar, Origin, free_port, make_config, until, write_config

from sidecar.config import ConfigError, load_config
from sidecar.core.jobs import JobId, lane
from sidecar.jobs.queue import CALLBACKS, SidecarQueue

Factory = Callable[..., Awaitable[InProcessSidecar]]
SECRET = "test-secret-0123456789abcdef"
VIEW_KEYS = {"id", "status", "progress", "message", "attempts", "created_at", "started_at",
             "finished_at", "error", "status_url", "result_url", "events_url", "route"}


@dataclass
class Delivery:
    headers: CIMultiDictProxy[str]
    body: bytes
    at: float

    def json(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.body)
        return found


@dataclass
class Receiver:
    """The job creator's endpoint: answers each delivery with the next of `statuses` (200
    once they run out), or holds it until `release` is set when `hold` is."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    hold: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.deliveries.append(Delivery(request.headers.copy(), await request.read(),
                                        time.time()))
        if self.hold:
            while not self.release.is_set():
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.02)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="thanks" if status < 300 else "no")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/jobs", found.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    found.url = f"http://127.0.0.1:{port}/hooks/jobs"
    yield found
    found.release.set()
    await runner.cleanup()


def config_with_callback(origin_url: str, redis_url: str, url: str, *, attempts: int = 3,
                         job_attempts: int = 1, **callback: Any) -> dict[str, Any]:
    """`/api/**` is offloaded to the queue `work` with a callback to `url`; the secret comes
    from the environment, as the docs write it."""
    callback = {"url": url, "secret": "${CALLBACK_SECRET}", "attempts": attempts,
                "backoff": "100ms", "timeout": "2s", **callback}
    routes = [
        {"name": "offloaded", "match": {"path": "/api/**"}, "upstream": "app",
         "offload": {"queue": "work", "attempts": job_attempts, "backoff": "50ms",
                     "callback": callback}},
        {"name": "default", "match": {"path": "/**"}, "upstream": "app"},
    ]
    return make_config(origin_url, redis_url, routes=routes, queues={"work": {"concurrency": 2}},
                       jobs={"visibility_timeout": "2s", "sweep_interval": "1s"})


@pytest.fixture(autouse=True)
def callback_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBACK_SECRET", SECRET)


def held_until(release: asyncio.Event
               ) -> Callable[[web.Request, int], Awaitable[web.StreamResponse]]:
    """An origin answer held back until `release`, or until the sidecar hangs up."""
    async def answer(request: web.Request, n: int) -> web.Response:
        while not release.is_set():
            if request.transport is None or request.transport.is_closing():
                break
            await asyncio.sleep(0.02)
        return web.Response(text="late")

    return answer


def verify(delivery: Delivery, secret: str = SECRET) -> None:
    """What a receiver does (docs/jobs.md): the MAC of `<timestamp>.<body>`, compared in
    constant time, and a timestamp within five minutes."""
    timestamp = delivery.headers["X-Sidecar-Timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + delivery.body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(delivery.headers["X-Sidecar-Signature"], "sha256=" + expected)
    assert abs(time.time() - int(timestamp)) < 300


async def submit(client: aiohttp.ClientSession, sidecar: InProcessSidecar, path: str,
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with client.post(sidecar.url + path, data=b"{}", headers=headers or {}) as response:
        assert response.status == 202, await response.text()
        accepted: dict[str, Any] = await response.json()
        return accepted


async def status_of(client: aiohttp.ClientSession, sidecar: InProcessSidecar,
                    accepted: dict[str, Any]) -> dict[str, Any]:
    async with client.get(sidecar.url + accepted["status_url"]) as response:
        assert response.status == 200
        found: dict[str, Any] = await response.json()
        return found


async def callback_counts(sidecar: InProcessSidecar, route: str = "offloaded"
                          ) -> dict[str, float]:
    """sidecar_job_callbacks_total{route} by outcome, scraped from /metrics (each outcome is
    there from the start, at 0)."""
    async with aiohttp.ClientSession() as session, session.get(
            sidecar.admin_url + "/metrics") as response:
        text = await response.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "sidecar_job_callbacks":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["route"] == route:
                    counts[sample.labels["outcome"]] = sample.value
    return counts


async def pending(sidecar: InProcessSidecar) -> int:
    async with aiohttp.ClientSession() as session, session.get(
            sidecar.admin_url + "/admin/stats") as response:
        return int((await response.json())["jobs"]["callbacks_pending"])


async def delivered_count(sidecar: InProcessSidecar, n: int) -> None:
    async def reached() -> bool:
        return (await callback_counts(sidecar)).get("delivered", 0) >= n

    await until(reached, 10)


# -- delivery ---------------------------------------------------------------------------------


async def test_the_callback_arrives_signed_with_the_final_status(
        sidecar_factory: Factory, origin: Origin, receiver: Receiver, redis_url: str,
        client) -> None:
    origin.reply("/api/report", body="the report")
    sidecar = await sidecar_factory(config_with_callback(origin.url, redis_url, receiver.url))
    assert await callback_counts(sidecar) == {"delivered": 0, "retried": 0, "failed": 0}
    accepted = await submit(client, sidecar, "/api/report")

    async def arrived() -> bool:
        return len(receiver.deliveries) == 1

    await until(arrived, 10)
    delivery = receiver.deliveries[0]
    verify(delivery)
    assert delivery.headers["X-Sidecar-Job-Id"] == accepted["id"]
    assert delivery.headers["Content-Type"] == "application/json"
    sent = delivery.json()
    assert set(sent) == VIEW_KEYS
    assert (sent["id"], sent["status"], sent["route"]) == (accepted["id"], "succeeded",
                                                           "offloaded")
    assert sent["error"] is None and sent["finished_at"] is not None
    assert sent["result_url"] == accepted["result_url"]
    # Sent as the job ended, not found by the look one visibility timeout (2 s) later.
    finished = calendar.timegm(time.strptime(sent["finished_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert delivery.at - finished < 1.5
    # The status endpoint says the same, field for field.
    assert {**await status_of(client, sidecar, accepted), "route": "offloaded"} == sent
    async with client.get(sidecar.url + sent["result_url"]) as result:
        assert (result.status, await result.text()) == (200, "the report")
    await delivered_count(sidecar, 1)
    assert await callback_counts(sidecar) == {"delivered": 1, "retried": 0, "failed": 0}
    assert await pending(sidecar) == 0  # nothing left owed
    # A signature made with another secret, or over another body, does not verify.
    with pytest.raises(AssertionError):
        verify(delivery, "another-secret-0123456789")
    with pytest.raises(AssertionError):
        verify(Delivery(delivery.headers, delivery.body.replace(b"succeeded", b"failed"), 0))
    async with client.get(sidecar.admin_url + "/admin/config") as shown:
        assert SECRET not in await shown.text()


async def test_a_receiver_failing_once_gets_it_again_counted_retried(
        sidecar_factory: Factory, origin: Origin, receiver: Receiver, redis_url: str,
        client) -> None:
    origin.reply("/api/report", body="ok")
    receiver.statuses = [500]
    sidecar = await sidecar_factory(config_with_callback(origin.url, redis_url, receiver.url))
    accepted = await submit(client, sidecar, "/api/report")
    await delivered_count(sidecar, 1)
    assert len(receiver.deliveries) == 2
    first, second = receiver.deliveries
    for delivery in (first, second):
        verify(delivery)
        assert delivery.headers["X-Sidecar-Job-Id"] == accepted["id"]
    assert first.body == second.body  # the same delivery, sent again
    assert second.json()["status"] == "succeeded"
    assert await callback_counts(sidecar) == {"delivered": 1, "retried": 1, "failed": 0}
    assert await pending(sidecar) == 0


async def test_429_and_5xx_are_retried_other_4xx_are_not(
        sidecar_factory: Factory, origin: Origin, receiver: Receiver, redis_url: str,
        client) -> None:
    origin.reply("/api/report", body="ok")
    receiver.statuses = [429, 503, 404]
    sidecar = await sidecar_factory(config_with_callback(origin.url, redis_url, receiver.url,
                                                         attempts=5))
    await submit(client, sidecar, "/api/report")

    async def failed() -> bool:
        return (await callback_counts(sidecar)).get("failed", 0) == 1

    await until(failed, 10)
    assert len(receiver.deliveries) == 3  # the 404 ended it, with attempts left
    assert await callback_counts(sidecar) == {"delivered": 0, "retried": 2, "failed": 1}
    assert await pending(sidecar) == 0


async def test_a_receiver_down_for_every_attempt_is_counted_failed_and_logged(
        sidecar_factory: Factory, origin: Origin, redis_url: str, client,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.jobs")
    origin.reply("/api/report", body="ok")
    down = f"http://user:pass@127.0.0.1:{free_port()}/hooks/jobs?token=abc"  # nobody listens
    sidecar = await sidecar_factory(config_with_callback(origin.url, redis_url, down,
                                                         attempts=3))
    accepted = await submit(client, sidecar, "/api/report")

    async def failed() -> bool:
        return (await callback_counts(sidecar)).get("failed", 0) == 1

    await until(failed, 10)
    assert await callback_counts(sidecar) == {"delivered": 0, "retried": 2, "failed": 1}
    assert (await status_of(client, sidecar, accepted))["status"] == "succeeded"  # the job is
    mine = [r for r in caplog.records if getattr(r, "job_id", None) == accepted["id"]
            and "callback" in r.getMessage()]
    retries = [r for r in mine if r.getMessage() == "job callback failed; it will be sent again"]
    assert [r.attempt for r in retries] == [1, 2]  # type: ignore[attr-defined]
    gave_up = [r for r in mine if r.getMessage().startswith("job callback failed; giving up")]
    assert len(gave_up) == 1 and gave_up[0].levelno == logging.ERROR
    assert gave_up[0].attempt == 3  # type: ignore[attr-defined]
    assert "every attempt failed" in gave_up[0].getMessage()
    assert "Connect" in gave_up[0].error  # type: ignore[attr-defined]
    # The URL is shown without its credentials or query; the secret never appears.
    assert gave_up[0].url == down.split("?")[0].replace("user:pass@", "")  # type: ignore[attr-defined]
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        assert SECRET not in text and "pass@" not in text and "token=abc" not in text
    assert await pending(sidecar) == 0


# -- the status each kind of end sends --------------------------------------------------------


async def test_a_failed_job_sends_status_failed(
        sidecar_factory: Factory, origin: Origin, receiver: Receiver, redis_url: str,
        client) -> None:
    origin.reply("/api/broken", status=500, body="boom")
    sidecar = await sidecar_factory(config_with_callback(origin.url, redis_url, receiver.url,
                                                         job_attempts=2))
    accepted = await submit(client, sidecar, "/api/broken")
    await delivered_count(sidecar, 1)
    assert origin.calls["/api/broken"] == 2  # every attempt ran before the callback
    assert len(receiver.deliveries) == 1
    verify(receiver.deliveries[0])
    sent = receiver.deliveries[0].json()
    assert (sent["id"], sent["status"], sent["attempts"]) == (accepted["id"], "failed", 2)
    assert "500" in sent["error"]


async def test_a_cancelled_job_sends_status_cancelled(
        sidecar_factory: Factory, origin: Origin, receiver: Receiver, redis_url: str,
        client) -> None:
    release = asyncio.Event()
    origin.script("/api/slow", held_until(release))
    sidecar = await sidecar_factory(config_with_callback(origin.url, redis_url, receiver.url))
    accepted = await submit(client, sidecar, "/api/slow")

    async def running() -> bool:
        return origin.calls["/api/slow"] == 1

    await until(running, 10)
    async with client.delete(sidecar.url + accepted["status_url"]) as response:
        assert response.status in (200, 202), await response.text()
    await delivered_count(sidecar, 1)
    release.set()
    assert len(receiver.deliveries) == 1
    verify(receiver.deliveries[0])
    sent = receiver.deliveries[0].json()
    assert (sent["id"], sent["status"], sent["error"]) == (accepted["id"], "cancelled",
                                                           "cancelled")


# -- nothing lost ---------------------------------------------------------------------------------


async def test_a_delivery_cut_by_a_stopping_sidecar_is_sent_by_another(
        sidecar_factory: Factory, origin: Origin, receiver: Receiver, redis_url: str,
        client) -> None:
    origin.reply("/api/report", body="ok")
    receiver.hold = True
    config = config_with_callback(origin.url, redis_url, receiver.url, timeout="30s")
    first = await sidecar_factory(config)
    accepted = await submit(client, first, "/api/report")

    async def arrived() -> bool:
        return len(receiver.deliveries) == 1

    await until(arrived, 10)
    await first.runtime.stop()  # the delivery under way is cut and handed back
    receiver.hold = False
    second = await sidecar_factory(config_with_callback(origin.url, redis_url, receiver.url,
                                                        timeout="30s"), name="second.yaml")
    await delivered_count(second, 1)  # at once, not after the 35 s lease
    assert len(receiver.deliveries) == 2
    assert receiver.deliveries[1].body == receiver.deliveries[0].body
    verify(receiver.deliveries[1])
    assert receiver.deliveries[1].json()["id"] == accepted["id"]


async def test_a_job_whose_worker_died_before_its_callback_still_sends_it(
        sidecar_factory: Factory, origin: Origin, receiver: Receiver, redis_url: str,
        client) -> None:
    """The worker finished the job in Redis and died before anything else: no process was told
    to send the callback. The entry written when the job was queued still is."""
    origin.script("/api/report", held_until(asyncio.Event()))  # never answers
    enqueue_only = config_with_callback(origin.url, redis_url, receiver.url)
    enqueue_only["jobs"]["workers"] = False
    sidecar = await sidecar_factory(enqueue_only)
    accepted = await submit(client, sidecar, "/api/report")
    # What the dead worker's last write did: the record says the job is over.
    redis = aioredis.Redis.from_url(redis_url)
    try:
        job_id = JobId.parse(accepted["id"])
        assert job_id is not None
        queue = SidecarQueue(redis, name=lane(job_id.queue, job_id.priority))
        job = await queue.job(accepted["id"])
        assert job is not None
        await queue.finish(job, Status.FAILED, error="the worker's last words")
        assert await redis.zscore(CALLBACKS, accepted["id"]) is not None
    finally:
        await redis.aclose()
    await delivered_count(sidecar, 1)  # found by the look one visibility timeout (2 s) later
    verify(receiver.deliveries[0])
    sent = receiver.deliveries[0].json()
    assert (sent["id"], sent["status"], sent["error"]) == (accepted["id"], "failed",
                                                           "the worker's last words")
    assert origin.calls["/api/report"] == 0


@pytest.mark.slow
async def test_a_sidecar_killed_during_a_delivery_leaves_it_to_another(
        sidecar_process, sidecar_factory: Factory, origin: Origin, receiver: Receiver,
        redis_url: str, client, tmp_path) -> None:
    """SIGKILL: nothing is handed back; the delivery's lease (callback.timeout + 5 s) runs out
    and another process sends it."""
    origin.reply("/api/report", body="ok")
    receiver.hold = True
    env_config = config_with_callback(origin.url, redis_url, receiver.url, timeout="1s")
    env_config["log"] = {"access": False, "format": "json"}
    process = sidecar_process(env_config)
    async with client.post(process.url + "/api/report", data=b"{}") as response:
        assert response.status == 202, await response.text()
        accepted = await response.json()

    async def arrived() -> bool:
        return len(receiver.deliveries) == 1

    await until(arrived, 15)
    process.process.kill()
    process.process.wait()
    process.stopped = True
    receiver.hold = False
    other = await sidecar_factory(config_with_callback(origin.url, redis_url, receiver.url,
                                                       timeout="1s"), name="other.yaml")
    killed_at = time.time()
    await delivered_count(other, 1)
    assert time.time() - killed_at < 8
    assert len(receiver.deliveries) == 2
    verify(receiver.deliveries[1])
    assert receiver.deliveries[1].json()["id"] == accepted["id"]
    assert receiver.deliveries[1].json()["status"] == "succeeded"


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "located"), [
    ("ftp://hooks.example/jobs", "offload.callback.url"),
    ("hooks.example/jobs", "offload.callback.url"),
    ("http://:80/x", "offload.callback.url"),
])
def test_a_bad_callback_url_is_a_located_config_error(tmp_path, redis_url: str, url: str,
                                                      located: str) -> None:
    config = config_with_callback("http://127.0.0.1:1", redis_url, url)
    path = write_config(tmp_path / "config.yaml", config)
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    [problem] = failure.value.problems
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if text.strip().startswith("url:") and url in text)
    assert str(problem).startswith(f"{path}:{line}: routes[0] (offloaded).{located}: "), problem
    assert "expected an http:// or https:// URL" in str(problem)


def test_a_short_or_missing_secret_is_a_located_config_error(
        tmp_path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBACK_SECRET", "short")
    config = config_with_callback("http://127.0.0.1:1", redis_url, "https://hooks.example/x")
    path = write_config(tmp_path / "config.yaml", config)
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    message = str(failure.value)
    assert "routes[0] (offloaded).offload.callback.secret: a signing secret needs at least 16" \
        in message
    assert "'short'" not in message  # the value itself is not repeated
    monkeypatch.delenv("CALLBACK_SECRET")
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    assert "environment variable CALLBACK_SECRET is not set" in str(failure.value)
