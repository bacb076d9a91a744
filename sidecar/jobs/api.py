"""The client's view of offloaded jobs, on the public listener under `jobs.path`
(default `/_sidecar/jobs`):

    GET    <path>/<id>          status, progress, attempts, times (ETag; 304 when unchanged)
    GET    <path>/<id>/result   the upstream's stored response, once the job succeeded
    GET    <path>/<id>/events   Server-Sent Events of the status, until the job is over (from
                                `Last-Event-ID` on); the same events over a WebSocket when the
                                request asks to upgrade to one
    DELETE <path>/<id>          cancel a queued or running job

A job is visible only to the client that created it (same Authorization and Cookie lines);
anyone else gets the same 404 as for an id that never existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ..core.etag import none_match
from ..core.jobevents import (
    GONE,
    GONE_DATA,
    KEEPALIVE_COMMENT,
    STATUS,
    already_seen,
    socket_message,
    sse_frame,
)
from ..core.jobs import (
    CANCELLED,
    FAILED,
    SUCCEEDED,
    TERMINAL,
    JobId,
    lane,
    owner_fingerprint,
    public_status,
    status_view,
    view_etag,
)
from ..core.websocket import VERSION, HandshakeRefused, accept_token, wants_websocket
from ..crypto import SealError
from ..errors import (
    JobFinishedError,
    JobNotFinishedError,
    JobNotFoundError,
    JobQueueUnavailableError,
    JobResultUnreadableError,
    MethodNotAllowedError,
    WebSocketHandshakeError,
    WebSocketVersionError,
)
from ..pipeline import ProxyResponse, SocketMessages
from ..policies.offload import RETRY_AFTER, job_urls
from ..stores.boundary import StoreUnavailable
from .queue import Job, Status

if TYPE_CHECKING:
    from ..config import Config
    from ..http.headers import RawHeaders
    from ..http.request import RequestHead
    from .queue import JobService

# A job's events, (event, data), and None after each RECHECK without one (JobsEndpoint._changes).
_Changes = AsyncGenerator[tuple[str, bytes] | None, None]

KEEPALIVE = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
RECHECK = 2.0  # an SSE stream re-reads the job this often even without a notification


def under(path: str, prefix: str) -> bool:
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


def view(service_job: Job, progress: dict[bytes, bytes], base: str) -> dict[str, Any]:
    raw_progress = progress.get(b"progress")
    message = progress.get(b"message")
    spec = service_job.kwargs or {}
    return status_view(
        service_job.key, service_job.status.value, service_job.error,
        # An operator's retry starts the attempts again: the view counts all, from creation.
        attempts=service_job.attempts + int(spec.get("attempts_before", 0)),
        queued=int(spec.get("created", service_job.queued)), started=service_job.started,
        run_at=float(service_job.scheduled or 0),
        completed=service_job.completed,
        progress=float(raw_progress) if raw_progress else 0.0,
        message=message.decode() if message else None,
        urls=job_urls(base, service_job.key))


async def find_job(service: JobService, job_id: JobId, known_lanes: set[str]
                   ) -> tuple[Job | None, dict[bytes, bytes]]:
    """`service.lookup` for an id that came from outside. The service makes (and keeps, for the
    life of the process) a saq queue object per lane it is asked about: an id naming a lane no
    job was ever queued in (made up by a client, any queue name and priority) is answered from
    the lanes set instead, so guessing ids does not grow memory. `known_lanes` remembers the
    lanes found (bounded by those that exist)."""
    name = lane(job_id.queue, job_id.priority)
    if name not in known_lanes:
        if not await service.lane_exists(job_id.queue, job_id.priority):
            return None, {}
        known_lanes.add(name)
    return await service.lookup(job_id)


class JobsHost(Protocol):
    """What the job status API needs of the worker it runs in (app.Runtime)."""

    @property
    def config(self) -> Config: ...

    @property
    def jobs(self) -> JobService: ...


class JobsEndpoint:
    def __init__(self, runtime: JobsHost) -> None:
        self.runtime = runtime
        self.known_lanes: set[str] = set()

    @property
    def service(self) -> JobService:
        return self.runtime.jobs

    async def handle(self, request: RequestHead, path: str,
                     request_id: str) -> ProxyResponse:
        base = self.runtime.config.jobs.path
        parts = path[len(base):].strip("/").split("/")
        action = parts[1] if len(parts) == 2 else None
        job_id = JobId.parse(parts[0]) if len(parts) in (1, 2) else None
        if job_id is None or action not in (None, "result", "events"):
            raise JobNotFoundError(f"no such job; job URLs look like {base}/<id>, "
                                   f"{base}/<id>/result and {base}/<id>/events")
        allowed = ("GET", "HEAD", "DELETE") if action is None else ("GET", "HEAD")
        if request.method not in allowed:
            raise MethodNotAllowedError(
                f"{request.method} is not allowed here; use {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)})
        job, progress = await self._lookup(job_id, request)
        if action == "result":
            return await self._result(job)
        if action == "events":
            last_event_id = request.headers.get("Last-Event-ID")
            if wants_websocket(_values(request, b"upgrade")):
                return self._socket(request, job_id, job, progress, base, last_event_id)
            return self._events(job_id, job, progress, base, last_event_id)
        if request.method == "DELETE":
            return await self._cancel(job_id, job, base)
        body = orjson.dumps(view(job, progress, base))
        etag = view_etag(body)
        headers = [*_NO_CACHE, (b"ETag", etag.encode("latin-1"))]
        inm = request.headers.get("If-None-Match")
        if inm is not None and none_match(inm, etag):
            return ProxyResponse(304, "Not Modified", headers, b"")
        return ProxyResponse(200, "OK", [*headers, _JSON], body)

    async def _lookup(self, job_id: JobId, request: RequestHead
                      ) -> tuple[Job, dict[bytes, bytes]]:
        service = self.service
        if service.redis is None:
            raise self._unavailable()
        try:
            async with service.bounded():
                job, progress = await find_job(service, job_id, self.known_lanes)
        except StoreUnavailable:
            raise self._unavailable() from None
        owner = (job.kwargs or {}).get("owner", "") if job is not None else ""
        if job is None or not hmac.compare_digest(
                owner.encode(), owner_fingerprint(request.headers.raw).encode()):
            raise JobNotFoundError("no such job: it never existed, its record expired "
                                   "(offload.result_ttl), or another client created it")
        return job, progress

    @staticmethod
    def _unavailable() -> JobQueueUnavailableError:
        return JobQueueUnavailableError("the job queue (redis) is unreachable; retry later",
                                        headers={"Retry-After": "5"})

    async def _result(self, job: Job) -> ProxyResponse:
        status = public_status(job.status.value, job.error)
        if status in (FAILED, CANCELLED):
            raise JobFinishedError(f"the job {status}, so it has no result: "
                                   f"{view(job, {}, '')['error']}")
        if status != SUCCEEDED:
            raise JobNotFinishedError(f"the job is {status}; its result is not there yet",
                                      headers={"Retry-After": str(RETRY_AFTER)})
        try:
            async with self.service.bounded():
                result = await self.service.result(job.key)
        except StoreUnavailable:
            raise self._unavailable() from None
        except SealError as exc:
            raise JobResultUnreadableError(f"{exc}; add the key it was sealed with to "
                                           "redis.encryption_keys") from None
        if result is None:
            raise JobNotFoundError("the job's result expired (offload.result_ttl)")
        headers: RawHeaders = [*result.headers, (b"X-Sidecar-Job-Id", job.key.encode())]
        return ProxyResponse(result.status, result.reason, headers, result.body)

    async def _cancel(self, job_id: JobId, job: Job, base: str) -> ProxyResponse:
        if public_status(job.status.value, job.error) in TERMINAL:
            raise JobFinishedError(f"the job is already "
                                   f"{public_status(job.status.value, job.error)}; "
                                   "nothing to cancel")
        service = self.service
        try:
            async with service.bounded(extra=5.0):  # the wait below, and no more
                await service.cancel(job)
                if job.status != Status.ABORTED:
                    # A running job stops when its worker notices (within a second or two).
                    await service.wait_finished(job_id, 5.0)
                found, progress = await service.lookup(job_id)
        except StoreUnavailable:
            raise self._unavailable() from None
        if found is None:
            raise JobNotFoundError("the job's record expired")
        job = found
        if job.status == Status.ABORTING:
            try:
                async with service.bounded():
                    if await service.has_result(job.key):
                        # The job succeeded between the read above and saq's abort.
                        await service.put_back_completed(job)
                    else:
                        # No worker stopped it: the one running it died (saq's abort took the
                        # job out of every list, so nothing else would ever finish it).
                        await service.abandon(job)
            except StoreUnavailable:
                raise self._unavailable() from None
        status = public_status(job.status.value, job.error)
        if status in (SUCCEEDED, FAILED):
            raise JobFinishedError(f"the job {status} before it could be cancelled")
        body = orjson.dumps(view(job, progress, base))
        if status == CANCELLED:
            return ProxyResponse(200, "OK", [*_NO_CACHE, _JSON], body)
        return ProxyResponse(202, "Accepted", [*_NO_CACHE, _JSON], body)

    def _events(self, job_id: JobId, job: Job, progress: dict[bytes, bytes], base: str,
                last_event_id: str | None) -> ProxyResponse:
        changes = self._changes(job_id, job, progress, base, last_event_id)
        return ProxyResponse(200, "OK", list(_EVENTS), stream=_EventStream(_sse(changes)))

    def _socket(self, request: RequestHead, job_id: JobId, job: Job,
                progress: dict[bytes, bytes], base: str,
                last_event_id: str | None) -> ProxyResponse:
        """The 101 to a WebSocket handshake; the edge then sends the events (edge/websocket.py).
        Looked up first like any request here: a client that may not see the job gets the same
        404, not a WebSocket."""
        try:
            accept = accept_token(
                method=request.method, http11=request.http11,
                connection=_values(request, b"connection"),
                versions=_values(request, b"sec-websocket-version"),
                keys=_values(request, b"sec-websocket-key"))
        except HandshakeRefused as exc:
            if exc.status == 426:
                raise WebSocketVersionError(
                    exc.detail, headers={"Sec-WebSocket-Version": VERSION}) from None
            raise WebSocketHandshakeError(exc.detail) from None
        response = ProxyResponse(101, "Switching Protocols",
                                 [(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", accept)])
        response.socket = _socket_messages(
            self._changes(job_id, job, progress, base, last_event_id))
        return response

    async def _changes(self, job_id: JobId, job: Job, progress: dict[bytes, bytes], base: str,
                       last_event_id: str | None) -> _Changes:
        """The job's events, (event, data), until it is over (or its record is gone); None
        after each RECHECK without one. The status a resuming client names is not sent
        again (core/jobevents.py)."""
        service = self.service
        queue = service.queue_of(job_id)
        changed = asyncio.Event()

        def notified(_key: str, _status: Status) -> bool:
            changed.set()
            return False

        listener = asyncio.create_task(queue.listen([job.key], notified, timeout=None))
        sent: bytes | None = None
        current = orjson.dumps(view(job, progress, base))
        if already_seen(current, last_event_id):
            sent = current
        try:
            while True:
                if current != sent:
                    yield STATUS, current
                    sent = current
                if public_status(job.status.value, job.error) in TERMINAL:
                    break
                try:
                    async with asyncio.timeout(RECHECK):
                        await changed.wait()
                except TimeoutError:
                    yield None
                changed.clear()
                try:
                    async with service.bounded():  # keep-alives go on while Redis hangs
                        found, progress = await service.lookup(job_id)
                except StoreUnavailable:
                    continue
                if found is None:
                    yield GONE, GONE_DATA
                    break
                job = found
                current = orjson.dumps(view(job, progress, base))
        finally:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener


def _values(request: RequestHead, lname: bytes) -> list[bytes]:
    """Every value of one header field, as sent (a WebSocket handshake counts them)."""
    return [value for name, value in request.headers.raw if name.lower() == lname]


async def _sse(changes: _Changes) -> AsyncIterator[bytes]:
    """The events as Server-Sent Events, a keep-alive comment every KEEPALIVE without one."""
    idle = 0.0
    async with contextlib.aclosing(changes):
        async for change in changes:
            if change is None:
                idle += RECHECK
                if idle >= KEEPALIVE:
                    yield KEEPALIVE_COMMENT
                    idle = 0.0
                continue
            idle = 0.0
            yield sse_frame(*change)


async def _socket_messages(changes: _Changes) -> SocketMessages:
    """The events as WebSocket text messages; None every KEEPALIVE without one (a ping)."""
    idle = 0.0
    async with contextlib.aclosing(changes):
        async for change in changes:
            if change is None:
                idle += RECHECK
                if idle >= KEEPALIVE:
                    yield None
                    idle = 0.0
                continue
            idle = 0.0
            yield socket_message(*change)


_NO_CACHE = ((b"Cache-Control", b"no-cache"),)
_JSON = (b"Content-Type", b"application/json")
_EVENTS = ((b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-store"),
           (b"X-Accel-Buffering", b"no"))


class _EventStream:
    """A job's event stream as a response body (pipeline.BodyStream)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._closer: asyncio.Task[None] | None = None

    async def read(self) -> bytes:
        return await anext(self._chunks, b"")

    def close(self) -> None:
        """The client went away: end the generator (its listener is cancelled)."""
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None and self._closer is None:
            self._closer = asyncio.ensure_future(aclose())
