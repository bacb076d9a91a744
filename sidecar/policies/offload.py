"""`offload`: answer a long-running request at once with `202 Accepted` and a job to poll; a
worker replays it to the upstream in the background (jobs/runner.py, docs/jobs.md).

`mode: prefer` offloads only requests that ask for it (`Prefer: respond-async`). With
`Prefer: wait=N` the client is willing to wait: the policy waits up to N seconds (at most
jobs.max_wait) and answers with the upstream's real response if the job finished by then.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import TYPE_CHECKING

import orjson

from ..core.jobs import (
    QUEUED,
    SCHEDULED,
    SUCCEEDED,
    JobId,
    Preferences,
    iso_time,
    owner_fingerprint,
    parse_prefer,
    public_status,
)
from ..crypto import SealError
from ..errors import (
    JobQueueFullError,
    JobQueueUnavailableError,
    JobScheduleInvalidError,
    OffloadBodyTooLargeError,
)
from ..jobs.queue import QueueFull
from ..pipeline import BodyTooLarge, Handler, ProxyRequest, ProxyResponse, whole_body
from ..stores.boundary import StoreUnavailable

if TYPE_CHECKING:
    from ..config import JobsConfig, OffloadConfig, QueueConfig
    from ..jobs.queue import JobService

RETRY_AFTER = 2  # seconds: what a 202 suggests between polls


def job_urls(base: str, job_id: str) -> dict[str, str]:
    status = f"{base}/{job_id}"
    return {"status_url": status, "result_url": status + "/result",
            "events_url": status + "/events"}


class OffloadPolicy:
    def __init__(self, route: str, upstream: str, config: OffloadConfig,
                 service: JobService, jobs: JobsConfig, queue: QueueConfig) -> None:
        self.route = route
        self.upstream = upstream
        self.config = config
        self.service = service
        self.jobs = jobs
        self.max_queued = queue.max_queued

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        prefer = request.head.headers.getall("Prefer")
        preferences = parse_prefer(prefer) if prefer else Preferences()
        if self.config.mode == "prefer" and not preferences.respond_async:
            return await call_next(request)
        jobs = self.jobs
        now = time.time()
        start_at = self._start_at(preferences, now)
        body = await self._whole_body(request)
        job_id = JobId.new(self.config.queue, self.config.priority)
        spec = {
            "route": self.route,
            "upstream": self.upstream,
            "method": request.method,
            "target": request.head.target[:2048],
            "head": request.upstream_head.decode("latin-1"),
            "has_body": body is not None,
            "max_body": self.config.max_body,
            "owner": owner_fingerprint(request.head.headers.raw),
            "progress_token": secrets.token_urlsafe(16),
            "request_id": request.request_id,
            "created": int(time.time() * 1000),  # kept when an operator retries the job
            "callback": self.config.callback is not None,  # owed when it ends (jobs/callbacks.py)
        }
        trace = request.trace
        span = None
        if trace is not None:  # the job's attempts link to this span (tracing.job_attempt)
            span = trace.child("enqueue", {"sidecar.job.id": str(job_id),
                                           "sidecar.job.queue": self.config.queue})
            spec["traceparent"] = trace.context_of(span)
        if self.service.redis is None or not self.service.redis_up:
            raise self._unavailable()
        limit = self.max_queued
        try:
            await self.service.enqueue(job_id, spec, body, self.config,
                                       heartbeat=jobs.visibility_timeout,
                                       max_age=jobs.max_age, start_at=start_at,
                                       max_queued=limit)  # within the command timeout
        except QueueFull:
            raise self._full(limit or 0) from None
        except StoreUnavailable:
            raise self._unavailable() from None
        finally:
            if span is not None:
                span.end()
        if start_at is not None:
            return self.accepted(job_id, jobs, preferences, SCHEDULED, start_at)
        status = QUEUED
        if preferences.wait:
            waited = await self._waited(job_id, min(preferences.wait, jobs.max_wait))
            if isinstance(waited, ProxyResponse):
                return waited
            status = waited
        return self.accepted(job_id, jobs, preferences, status)

    def _start_at(self, preferences: Preferences, now: float) -> float | None:
        """When the client asked the job to start, None for now; 400 for a time it cannot
        have (unreadable, or past offload.max_delay)."""
        if preferences.invalid is not None:
            raise JobScheduleInvalidError(f"Prefer: {preferences.invalid}")
        start_at = preferences.start_at(now)
        if start_at is None or start_at <= now:
            return None  # a time already past: run it now
        if start_at - now > self.config.max_delay:
            raise JobScheduleInvalidError(
                f"the job would start in {start_at - now:.0f}s; this route allows at most "
                f"{self.config.max_delay:g}s (offload.max_delay)")
        return start_at

    async def _whole_body(self, request: ProxyRequest) -> bytes | None:
        try:
            return await whole_body(request, self.config.max_body)
        except BodyTooLarge:
            raise self._too_large() from None

    def _too_large(self) -> OffloadBodyTooLargeError:
        return OffloadBodyTooLargeError(
            f"this route runs requests as jobs, whose bodies are stored whole: at most "
            f"{self.config.max_body} bytes (offload.max_body)")

    def _full(self, limit: int) -> JobQueueFullError:
        return JobQueueFullError(
            f"queue {self.config.queue!r} has {limit} jobs waiting (queues."
            f"{self.config.queue}.max_queued): the request was not queued and not sent "
            "upstream; retry later", headers={"Retry-After": "5"})

    @staticmethod
    def _unavailable() -> JobQueueUnavailableError:
        return JobQueueUnavailableError(
            "the job queue (redis) is unreachable: the request was not queued and not sent "
            "upstream; retry later", headers={"Retry-After": "5"})

    async def _waited(self, job_id: JobId, wait: float) -> ProxyResponse | str:
        """The upstream's stored response if the job succeeds within `wait` seconds, else the
        job's status by then (for the 202: a job that failed meanwhile is not "queued")."""
        try:
            async with self.service.bounded(wait):
                await self.service.wait_finished(job_id, wait)
                job, _ = await self.service.lookup(job_id)
                if job is None:
                    return QUEUED
                status = public_status(job.status.value, job.error)
                if status != SUCCEEDED:
                    return status
                result = await self.service.result(str(job_id))
        except StoreUnavailable:
            return QUEUED
        except SealError:
            return SUCCEEDED  # its result URL answers why it cannot be read
        if result is None:
            return SUCCEEDED
        headers = [*result.headers, (b"X-Sidecar-Job-Id", str(job_id).encode()),
                   (b"Preference-Applied", b"wait=%d" % math.ceil(wait))]
        return ProxyResponse(result.status, result.reason, headers, body=result.body)

    def accepted(self, job_id: JobId, jobs: JobsConfig, preferences: Preferences,
                 status: str = QUEUED, start_at: float | None = None) -> ProxyResponse:
        key = str(job_id)
        urls = job_urls(jobs.path, key)
        fields: dict[str, object] = {"id": key, "status": status}
        if start_at is not None:
            fields["run_at"] = iso_time(round(start_at * 1000))
        body = orjson.dumps({**fields, **urls})
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Location", urls["status_url"].encode()),
            (b"Retry-After", b"%d" % RETRY_AFTER),
            (b"Cache-Control", b"no-store"),
            (b"X-Sidecar-Job-Id", key.encode()),
        ]
        if preferences.respond_async:
            headers.append((b"Preference-Applied", b"respond-async"))
        return ProxyResponse(202, "Accepted", headers, body=body)
