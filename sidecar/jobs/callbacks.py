"""Callbacks: when a job is over, POST its final status to the URL its route names
(`offload.callback`), signed, with retries (docs/jobs.md, "Callbacks").

Delivery is at least once. A job that owes a callback is recorded in Redis when it is queued
(jobs/queue.py, `CALLBACKS`), before anything runs; its end makes the entry due at once. Every
process attached to the queue (`sidecar run`, `sidecar worker`) runs a sender that takes due
entries under a lease, sends them, and then forgets them, or makes them due again after a
backoff. A worker that dies between a job's end and its callback, or in the middle of a
delivery, leaves the entry behind: it comes due again (its lease runs out, or the job's
periodic look finds the job over) and another process sends it. A receiver may therefore see a
delivery twice; `X-Sidecar-Job-Id` and the unchanged body say it is the same one.

The HTTP client is a ClientSession of its own, one per process: the upstream pools are the data
plane's, tuned for one upstream each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, assert_never

import aiohttp
import orjson
from yarl import URL

from .. import __version__
from ..aio import cancel_and_wait
from ..core.callbacks import (
    JOB_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Step,
    judge,
    next_step,
    recheck_delay,
    retry_delay,
    signature,
)
from ..core.jobs import TERMINAL, JobId, public_status
from ..stores.boundary import StoreUnavailable
from .api import view

if TYPE_CHECKING:
    from ..config import CallbackConfig, Config
    from .queue import JobService

log = logging.getLogger("sidecar.jobs")

POLL = 1.0  # a sender looks for due callbacks (retries, other processes' leftovers) this often
MAX_IN_FLIGHT = 16  # deliveries at once per process
LEASE_MARGIN = 5.0  # a claim outlives the longest callback.timeout by this much
DEFAULT_LEASE = 15.0  # when no route has a callback (entries of a removed one are dropped)


class CallbackHost(Protocol):
    """What the sender needs of the process it runs in (app.Runtime, jobs.worker)."""

    @property
    def config(self) -> Config: ...


def public_url(url: str) -> str:
    """The callback URL as logs may show it: without user, password, query or fragment."""
    with contextlib.suppress(ValueError):
        return str(URL(url).with_user(None).with_query(None).with_fragment(None))
    return "<unparsable url>"


@dataclass
class _Claim:
    """One callback this process holds: the end of its latest lease (a claim made while a
    delivery was under way moves it: `again`), the deliveries tried before, its route."""

    lease: int
    tried: int
    route: str
    again: bool = False


class CallbackSender:
    def __init__(self, host: CallbackHost, service: JobService) -> None:
        self.host = host
        self.service = service
        self._session: aiohttp.ClientSession | None = None
        self._due = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._sending: dict[str, _Claim] = {}  # job id -> what this process holds
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._redis_down = False

    def __repr__(self) -> str:
        return f"<CallbackSender sending={len(self._sending)}>"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT), auto_decompress=False)
        self.service.on_callback_due(self.wake)
        self._loop_task = asyncio.create_task(self._run(), name="job-callbacks")

    async def stop(self) -> None:
        """Stop sending. Deliveries under way are abandoned and handed back at once (due now),
        for another process to send; one whose hand-back fails comes due when its lease
        ends."""
        for timer in self._timers:
            timer.cancel()
        tasks = list(self._tasks)
        held = [(job_id, claim.lease) for job_id, claim in self._sending.items()]
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        await cancel_and_wait(tasks)
        with contextlib.suppress(StoreUnavailable):
            async with self.service.bounded():
                for job_id, lease in held:
                    await self.service.settle_callback(job_id, lease, delay=0.0)
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        self._due.set()

    # -- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._due.clear()
            free = MAX_IN_FLIGHT - len(self._sending)
            claimed = 0
            if free > 0:
                try:
                    async with self.service.bounded():
                        lease, due = await self.service.claim_callbacks(self._lease(), free)
                    if self._redis_down:
                        log.info("job callbacks: the queue is reachable again")
                    self._redis_down = False
                except StoreUnavailable as exc:
                    self._redis_failed(exc)
                    due = []
                for job_id, tried, route in due:
                    held = self._sending.get(job_id)
                    if held is not None:
                        # Still being sent here: made due again meanwhile (the job ended while
                        # a look found it running) or its lease ran out. The delivery under
                        # way settles with this lease, or looks again (`_send`).
                        held.lease, held.tried, held.again = lease, tried, True
                        continue
                    claim = self._sending[job_id] = _Claim(lease, tried, route)
                    task = asyncio.create_task(self._send(job_id, claim),
                                               name=f"job-callback-{job_id}")
                    self._tasks.add(task)
                    task.add_done_callback(functools.partial(self._done, job_id))
                claimed = len(due)
            if claimed and claimed == free:
                continue  # more may be due; slots free up as deliveries end (_done wakes)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL):
                    await self._due.wait()

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._sending.pop(job_id, None)
        self._due.set()

    def _lease(self) -> float:
        timeouts = [route.offload.callback.timeout for route in self.host.config.routes
                    if route.offload is not None and route.offload.callback is not None]
        return max(timeouts) + LEASE_MARGIN if timeouts else DEFAULT_LEASE

    def _redis_failed(self, exc: BaseException) -> None:
        if not self._redis_down:
            log.warning("job callbacks: the queue (redis) is unreachable; callbacks wait",
                        extra={"error": str(exc) or type(exc).__name__})
        self._redis_down = True

    def _wake_in(self, delay: float) -> None:
        """Look again when a retry this process scheduled is due, not at the next poll."""

        def fired() -> None:
            self._timers.discard(timer)
            self._due.set()

        timer = asyncio.get_running_loop().call_later(delay, fired)
        self._timers.add(timer)

    # -- one callback ---------------------------------------------------------------------------

    async def _send(self, job_id: str, claim: _Claim) -> None:
        """Pass over the callback until a pass settled it. A pass whose settle did not apply,
        or that found the job still running, while the callback was claimed again, goes once
        more: the job may have ended meanwhile, and the later claim is this process's."""
        try:
            while True:
                claim.again = False
                settled = await self._send_one(job_id, claim)
                if settled or not claim.again:
                    return
        except StoreUnavailable as exc:
            # Left as claimed: due again when the lease ends (if it was sent, sent again).
            self._redis_failed(exc)
        except Exception:
            log.exception("job callback: unexpected error; it is tried again after its lease",
                          extra={"job_id": job_id})

    async def _send_one(self, job_id: str, claim: _Claim) -> bool:
        """One pass: True when it settled the entry (or someone else owns it now)."""
        service = self.service
        config = self.host.config
        parsed = JobId.parse(job_id)
        if parsed is None:
            return await self._drop(job_id, claim, "not a job id")
        async with service.bounded():
            job, progress = await service.lookup(parsed)
        if job is None:
            return await self._drop(job_id, claim,
                                    "the job's record expired (offload.result_ttl)")
        if public_status(job.status.value, job.error) not in TERMINAL:
            if claim.again:
                return False  # made due while we looked: the job just ended; look again
            age = max(0.0, time.time() - job.queued / 1000)
            async with service.bounded():
                return await service.settle_callback(
                    job_id, claim.lease,
                    delay=recheck_delay(age, config.jobs.visibility_timeout))
        route = str((job.kwargs or {}).get("route", "")) or claim.route
        callback = _callback_of(config, route)
        if callback is None:
            return await self._drop(
                job_id, claim, f"route {route!r} no longer has offload.callback in the config")
        body = orjson.dumps({**view(job, progress, config.jobs.path), "route": route})
        attempt = claim.tried + 1
        status, error = await self._post(callback, job_id, body)
        step = next_step(judge(status), attempt, callback.attempts)
        fields: dict[str, object] = {"job_id": job_id, "route": route, "attempt": attempt,
                                     "url": public_url(callback.url)}
        if status is not None:
            fields["status"] = status
        if error is not None:
            fields["error"] = error
        delay: float | None = None
        if step is Step.RETRY:
            delay = retry_delay(attempt, base=callback.backoff, cap=callback.max_backoff,
                                rand=random.random)
        async with service.bounded():
            settled = await service.settle_callback(job_id, claim.lease, delay=delay,
                                                    tried=True, count=step.value)
        match step:
            case Step.DELIVERED:
                log.info("job callback delivered", extra=fields)
            case Step.RETRY:
                assert delay is not None
                self._wake_in(delay)
                log.warning("job callback failed; it will be sent again",
                            extra={**fields, "retry_in_s": round(delay, 3)})
            case Step.FAILED:
                reason = ("the receiver refused it" if status is not None and status < 500
                          and status != 429 else "every attempt failed")
                log.error(f"job callback failed; giving up: {reason}",
                          extra={**fields, "attempts": callback.attempts})
            case _:
                assert_never(step)
        return settled

    async def _drop(self, job_id: str, claim: _Claim, reason: str) -> bool:
        async with self.service.bounded():
            settled = await self.service.settle_callback(job_id, claim.lease, delay=None,
                                                         count=Step.FAILED.value)
        log.error(f"job callback dropped: {reason}",
                  extra={"job_id": job_id, "route": claim.route})
        return settled

    async def _post(self, callback: CallbackConfig, job_id: str, body: bytes
                    ) -> tuple[int | None, str | None]:
        """One delivery: the receiver's status, or None and what went wrong."""
        assert self._session is not None, "start() first"
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"sidecar/{__version__}",
            JOB_ID_HEADER: job_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature(callback.secret, timestamp, body),
        }
        try:
            async with asyncio.timeout(callback.timeout):
                async with self._session.post(callback.url, data=body, headers=headers,
                                              allow_redirects=False) as response:
                    return response.status, None
        # TimeoutError first: aiohttp's ServerTimeoutError is one too.
        except TimeoutError:
            return None, f"no answer within {callback.timeout:g}s (callback.timeout)"
        except (aiohttp.ClientError, ValueError) as exc:
            text = str(exc).replace(callback.url, public_url(callback.url))
            return None, f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _callback_of(config: Config, route_name: str) -> CallbackConfig | None:
    for route in config.routes:
        if route.name == route_name:
            return route.offload.callback if route.offload is not None else None
    return None


__all__ = ["CallbackHost", "CallbackSender", "public_url"]
