"""The admin listener: health, readiness, Prometheus metrics, stats, the effective config, cache
purge, circuit breakers and jobs; and the progress reports upstreams post for the jobs they run."""

from __future__ import annotations

import hmac
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from . import __version__, audit, native
from .core.access import ANYONE, Caller, identify
from .core.jobs import (
    CANCELLED,
    FAILED,
    PUBLIC_STATUSES,
    QUEUED,
    RUNNING,
    TERMINAL,
    JobFilter,
    JobId,
    page,
    parse_filter,
    parse_progress,
    public_status,
)
from .core.series import route_view
from .crypto import SealError
from .dashboard import Sampler, add_routes
from .edge.responses import error_body, new_request_id
from .errors import SidecarError, UnauthorizedError
from .jobs.api import JobsHost, find_job, view
from .jobs.queue import CANCELLED_BY_OPERATOR, Job, Status
from .metrics import MetricsHost, render
from .stores.boundary import StoreUnavailable

if TYPE_CHECKING:
    from .edge.protocol import EdgeServer
    from .jobs.runner import JobRunner
    from .jobs.schedules import Scheduler
    from .state import State


class AdminHost(MetricsHost, JobsHost, Protocol):
    """What the admin API reads and acts on: the worker (app.Runtime)."""

    @property
    def state(self) -> State: ...

    @property
    def edge(self) -> EdgeServer | None: ...

    @property
    def runner(self) -> JobRunner | None: ...

    @property
    def scheduler(self) -> Scheduler | None: ...

    @property
    def last_reload_error(self) -> str | None: ...

    @property
    def worker_id(self) -> int: ...

    @property
    def series(self) -> Sampler: ...

    async def reload(self, reason: str, *, audited: bool = True) -> bool: ...


RUNTIME = web.AppKey("runtime", object)
KNOWN_LANES = web.AppKey("known_lanes", set[str])
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
PROGRESS_TOKEN = "X-Sidecar-Progress-Token"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CALLER = web.RequestKey("caller", Caller)  # who sent the request (core/access.py)
AUDIT = web.RequestKey("audit", dict)  # what the action reports for its audit line


def audited(action: str, target: Callable[[web.Request], str | None] = lambda _: None
            ) -> Callable[[Handler], Handler]:
    """Mark a handler as an admin action: exactly one audit line per call (audit.py), with
    its outcome from the response (`ok` below 400, else `failed` and the status), and what the
    handler put in `request[AUDIT]`. The guard writes the line of a refused call."""
    def wrap(handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            request[AUDIT] = {}
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            finally:
                _audit_line(request, action, target(request),
                            audit.OK if status < 400 else audit.FAILED, status)
        run.audit_action = action  # type: ignore[attr-defined]
        run.audit_target = target  # type: ignore[attr-defined]
        run.__doc__ = handler.__doc__
        return run
    return wrap


def _audit_line(request: web.Request, action: str, target: str | None, outcome: str,
                status: int) -> None:
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    caller: Caller | None = request.get(CALLER)
    details = dict(request.get(AUDIT, {}))
    target = details.pop("target", target)  # a handler may know it only from the body
    audit.record(action.format_map(request.match_info), target, outcome,
                 token=caller.name if caller else None, client=request.remote,
                 worker=runtime.worker_id, status=status, **details)


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token on everything but health probes once any admin token is set; a `read`
    token only reads (core/access.py). A refused admin action leaves its audit line."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    admin = runtime.config.admin
    # Progress reports carry their job's own secret instead (the upstream has no admin token).
    # The dashboard's page and assets are public files; what they show comes from the API.
    if (not admin.protected or request.path in _OPEN_PATHS
            or request.path.startswith(("/internal/", "/ui/"))):
        request[CALLER] = ANYONE
        return await handler(request)
    caller = identify(request.headers.getall("Authorization", []), admin.named())
    action = getattr(request.match_info.handler, "audit_action", None)
    if caller is None:
        if action is not None:
            _refused(request, action, 401)
        return error_response(UnauthorizedError(
            "send 'Authorization: Bearer <token>' with a token of admin.token or admin.tokens "
            "(one such header; not in the URL)",
            headers={"WWW-Authenticate": 'Bearer realm="sidecar-admin"'}), new_request_id())
    request[CALLER] = caller
    if not caller.may(request.method):
        if action is not None:
            _refused(request, action, 403)
        return _json_error(403, "forbidden",
                           f"the token {caller.name!r} has the read scope: it cannot "
                           f"{request.method} {request.path} (an admin token can)")
    return await handler(request)


def _refused(request: web.Request, action: str, status: int) -> None:
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    target = getattr(request.match_info.handler, "audit_target", lambda _: None)(request)
    caller: Caller | None = identify(request.headers.getall("Authorization", []),
                                     runtime.config.admin.named())
    audit.record(action.format_map(request.match_info), target, audit.REFUSED,
                 token=caller.name if caller else None, client=request.remote,
                 worker=runtime.worker_id, status=status)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    return web.json_response({"status": "ok", "pid": os.getpid(), "worker": runtime.worker_id,
                              "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while requests can be proxied. Redis down degrades features (shared
    cache, cluster-wide state) but not proxying, so it is reported, not failed."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    body = {
        "status": "ready" if runtime.redis_up else "degraded",
        "redis": "up" if runtime.redis_up else "down",
        "routes": len(runtime.state.routes.routes),
        "reloads": runtime.reloads,
        "last_reload_error": runtime.last_reload_error,
    }
    return web.json_response(body)


@audited("cache.purge")
async def purge(request: web.Request) -> web.Response:
    """POST {"key": "/api/products/42"} | {"prefix": "/api/products/"} | {"tag": "product-42"}.

    Returns once every instance listening on Redis has dropped its in-memory copies."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        body = None
    kinds = [k for k in ("key", "prefix", "tag") if isinstance(body, dict) and k in body]
    if (not isinstance(body, dict) or len(kinds) != 1 or len(body) != 1
            or not isinstance(body[kinds[0]], str) or not body[kinds[0]]):
        return _json_error(
            400, "bad_request", 'send exactly one of {"key": "/path?query"}, {"prefix": '
            '"/path/"} or {"tag": "name"} as a JSON object with a non-empty string')
    kind = kinds[0]
    value = body[kind]
    request[AUDIT]["target"] = f"{kind}={value}"
    if kind in ("key", "prefix") and not value.startswith("/"):
        return _json_error(400, "bad_request", f"a {kind} is a path starting with '/'")
    result = await runtime.cache.purge(kind, value)
    request[AUDIT]["result"] = result
    return web.json_response(result)


@audited("config.reload")
async def reload_config(request: web.Request) -> web.Response:
    """POST /admin/reload: read the config file again, as SIGHUP does. With several workers
    the supervisor is signalled, so that every worker reloads (each writes its own audit line
    then); answered 202 at once. With one, answered once the reload is over: 200, or 422 with
    the problems while the previous config keeps serving."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    request[AUDIT]["target"] = str(runtime.state.loaded.path)
    if runtime.config.server.workers > 1:
        os.kill(os.getppid(), signal.SIGHUP)
        request[AUDIT]["signalled"] = "supervisor"
        return web.json_response({"reload": "signalled",
                                  "workers": runtime.config.server.workers}, status=202)
    if await runtime.reload("admin API", audited=False):
        return web.json_response({"reload": "ok", "routes": len(runtime.state.routes.routes)})
    request[AUDIT]["error"] = runtime.last_reload_error
    return _json_error(422, "config_rejected", f"the previous config keeps serving: "
                       f"{runtime.last_reload_error}")


async def stats(request: web.Request) -> web.Response:
    """A JSON snapshot of what each subsystem counts (this worker)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    return web.json_response({"pid": os.getpid(), "worker": runtime.worker_id,
                              "compiled": native.compiled(),
                              "cache": await runtime.cache.stats(),
                              "dedup": runtime.dedup.stats(),
                              "requests": _request_stats(runtime),
                              "breakers": runtime.breakers.stats(),
                              "upstreams": {name: pool.stats() for name, pool
                                            in runtime.state.pools.items()},
                              "jobs": await _job_stats(runtime)})


def _request_stats(runtime: AdminHost) -> dict[str, object]:
    recorder = runtime.metrics
    return {
        "in_flight": recorder.inflight,
        "connections": len(runtime.edge.connections) if runtime.edge is not None else 0,
        "by_route": [{"route": r, "method": m, "status": s, "count": n}
                     for (r, m, s), n in sorted(recorder.requests.items())],
        "upstreams": [{"upstream": u, "status": s, "count": n}
                      for (u, s), n in sorted(recorder.upstream.items())],
        "config_reloads": dict(runtime.reloads),
        "redis_up": runtime.redis_up,
    }


async def _job_stats(runtime: AdminHost) -> dict[str, object]:
    """Per queue, across the cluster: depth, running, outcomes, durations."""
    stats: dict[str, object] = {
        "running_here": runtime.runner.running if runtime.runner is not None else 0}
    try:
        stats["queues"] = {name: await runtime.jobs.queue_stats(name)
                           for name in runtime.config.queues}
        stats["callbacks_pending"] = await runtime.jobs.callbacks_pending()
        callbacks: dict[str, dict[str, int]] = {}
        for (route, outcome), n in sorted((await runtime.jobs.callback_counts()).items()):
            callbacks.setdefault(route, {})[outcome] = n
        stats["callbacks"] = callbacks
    except (StoreUnavailable, RuntimeError) as exc:
        stats["error"] = f"redis unreachable: {exc}"
    return stats


async def series(request: web.Request) -> web.Response:
    """GET /admin/series?seconds=120: per configured route, one point a second of requests/s,
    error and cache hit ratios, p50/p95/p99 latency, coalesced and rate-limited requests (whole
    cluster, sampled from the metrics' counters: dashboard/), with its SLA targets; and who
    asks (the page greys out actions for a `read` token)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    seconds_text = request.query.get("seconds", "120")
    if not seconds_text.isdigit() or not 1 <= int(seconds_text) <= 3600:
        return _json_error(400, "bad_request", "seconds is a number from 1 to 3600")
    samples = runtime.series.ring.last(int(seconds_text))
    config = runtime.config
    caller = request[CALLER]
    routes = []
    for route in config.routes:
        latency_p95, error_ratio = config.metrics.sla.for_route(route.name)
        routes.append({
            "name": route.name, "upstream": route.upstream,
            "policies": [key for key in ("cache", "etag", "dedup", "idempotency", "rate_limit",
                                         "offload", "breaker", "retry", "compress")
                         if getattr(route, key)],
            "sla": {"latency_p95": latency_p95, "error_ratio": error_ratio},
            **route_view(samples, route.name)})
    return web.json_response({
        "now": time.time(), "interval": 1, "seconds": len(samples),
        "start": samples[0].at if samples else None, "worker": runtime.worker_id,
        "caller": {"name": caller.name, "scope": caller.scope}, "routes": routes})


async def breakers(request: web.Request) -> web.Response:
    """Every circuit breaker of this worker: state, failures counted, when it half-opens."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    return web.json_response({"pid": os.getpid(), "worker": runtime.worker_id,
                              "breakers": runtime.breakers.stats()})


@audited("breaker.reset", lambda r: r.match_info["name"])
async def reset_breaker(request: web.Request) -> web.Response:
    """Close a breaker now (cluster-scoped ones close on every instance)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    name = request.match_info["name"]
    if not runtime.breakers.reset(name):
        known = sorted(runtime.breakers.breakers)
        return _json_error(404, "not_found",
                           f"no breaker named {name!r}; known: {', '.join(known) or 'none'}")
    return web.json_response({"name": name, "state": "closed"})


# -- schedules -----------------------------------------------------------------------------------


async def schedules_list(request: web.Request) -> web.Response:
    """Each schedule with its timetable, next run, and its last run and outcome (from Redis)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    scheduler = runtime.scheduler
    listed = await scheduler.describe() if scheduler is not None else []
    return web.json_response({"schedules": listed})


@audited("schedule.run", lambda r: r.match_info["name"])
async def schedule_run(request: web.Request) -> web.Response:
    """Run a schedule now, on this worker, whatever its timetable; answers once the run is
    over, with each request's status (a tick due meanwhile still runs)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    name = request.match_info["name"]
    schedule = runtime.config.schedules.get(name)
    if schedule is None or runtime.scheduler is None:
        known = ", ".join(sorted(runtime.config.schedules)) or "none"
        return _json_error(404, "not_found", f"no schedule named {name!r}; known: {known}")
    return web.json_response(await runtime.scheduler.run(name, schedule, "manual", None))


# -- jobs ----------------------------------------------------------------------------------------

_LIBRARY_STATES = {
    "queued": [Status.NEW, Status.QUEUED], "running": [Status.ACTIVE, Status.ABORTING],
    "succeeded": [Status.COMPLETE], "failed": [Status.FAILED, Status.ABORTED],
    "cancelled": [Status.ABORTED],
}


def _admin_view(runtime: AdminHost, job: Job,
                progress: dict[bytes, bytes] | None = None) -> dict[str, object]:
    spec = job.kwargs or {}
    found = view(job, progress or {}, runtime.config.jobs.path)
    found.update({
        "queue": job.key.split(".", 1)[0], "route": spec.get("route"),
        "method": spec.get("method"), "target": _target(runtime, job),
        "request_id": spec.get("request_id"), "error_detail": job.error,
        "max_attempts": job.retries,
    })
    return found


def _target(runtime: AdminHost, job: Job) -> str | None:
    try:
        return runtime.jobs.request_field(job, "target") or None
    except SealError as exc:
        return f"<sealed: {exc}>"


def error_response(exc: SidecarError, request_id: str) -> web.Response:
    """A SidecarError on the admin listener, in the public listener's JSON shape."""
    response = web.Response(status=exc.status, body=error_body(exc, request_id),
                            content_type="application/json")
    response.headers.update(exc.headers)
    response.headers["X-Request-ID"] = request_id
    response.headers["Cache-Control"] = "no-store"
    return response


def _json_error(status: int, error: str, detail: str) -> web.Response:
    """The public listener's error shape (with request_id and X-Request-ID) for admin errors."""
    exc = SidecarError(detail)
    exc.status, exc.code = status, error
    return error_response(exc, new_request_id())


async def _find_job(request: web.Request) -> tuple[Job | None, dict[bytes, bytes]]:
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    job_id = JobId.parse(request.match_info["id"])
    if job_id is None:
        return None, {}
    return await find_job(runtime.jobs, job_id, request.app[KNOWN_LANES])


async def jobs_list(request: web.Request) -> web.Response:
    """GET /admin/jobs?status=failed&queue=&route=&since=&until=&limit=100&cursor=: newest
    first; `next` is the cursor of the following page (null on the last)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    limit_text = request.query.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
        return _json_error(400, "bad_request", "limit is a number from 1 to 1000")
    try:
        wanted = parse_filter(request.query, runtime.config.queues, default_status=FAILED)
        jobs = await _matching(runtime, wanted)
        shown, cursor = page([(_created(job), job.key) for job in jobs], int(limit_text),
                             request.query.get("cursor"))
        progress = await runtime.jobs.progress_of([key for _, key in shown])
    except ValueError as exc:
        return _json_error(400, "bad_request", str(exc))
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    by_key = {job.key: job for job in jobs}
    status = request.query.get("status", FAILED)
    return web.json_response({"status": status, "next": cursor, "jobs": [
        _admin_view(runtime, by_key[key], reported)
        for (_, key), reported in zip(shown, progress, strict=True)]})


def _created(job: Job) -> int:
    return int((job.kwargs or {}).get("created", job.queued))


async def _matching(runtime: AdminHost, wanted: JobFilter) -> list[Job]:
    """The jobs of the configured queues that `wanted` takes (a scan of every job record)."""
    statuses = wanted.statuses or frozenset(PUBLIC_STATUSES)
    library = sorted({state for status in statuses for state in _LIBRARY_STATES[status]},
                     key=lambda state: state.value)
    found = []
    for queue in runtime.config.queues:
        if wanted.queues is not None and queue not in wanted.queues:
            continue
        for job in await runtime.jobs.all_jobs(queue, library):
            if wanted.matches(public_status(job.status.value, job.error), queue,
                              (job.kwargs or {}).get("route"), _created(job)):
                found.append(job)
    return found


async def _filter_body(request: web.Request, runtime: AdminHost, default: str,
                       allowed: tuple[str, ...]) -> JobFilter:
    try:
        fields = await request.json(loads=orjson.loads) if request.can_read_body else {}
    except ValueError:
        raise ValueError("the body is a JSON object of filters: status, queue, route, since, "
                         "until") from None
    if not isinstance(fields, dict):
        raise ValueError("the body is a JSON object of filters: status, queue, route, since, "
                         "until")
    return parse_filter({**request.query, **fields}, runtime.config.queues,
                        default_status=default, allowed=allowed)


@audited("jobs.retry")
async def jobs_bulk_retry(request: web.Request) -> web.Response:
    """POST /admin/jobs/retry {"status": "failed", "queue": ..., "route": ..., "since": ...}:
    every failed (or cancelled) job the filter takes runs again from its first attempt."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        wanted = await _filter_body(request, runtime, FAILED, (FAILED, CANCELLED))
        jobs = await _matching(runtime, wanted)
        retried = 0
        for job in jobs:
            await runtime.jobs.retry(job)
            retried += 1
    except ValueError as exc:
        return _json_error(400, "bad_request", str(exc))
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    request[AUDIT].update(target=wanted.describe(), matched=len(jobs), retried=retried)
    return web.json_response({"matched": len(jobs), "retried": retried})


@audited("jobs.cancel")
async def jobs_bulk_cancel(request: web.Request) -> web.Response:
    """POST /admin/jobs/cancel {"status": "queued", ...}: queued jobs the filter takes are
    cancelled at once, running ones when their workers see it (within a second or so)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        wanted = await _filter_body(request, runtime, QUEUED, (QUEUED, RUNNING))
        jobs = await _matching(runtime, wanted)
        for job in jobs:
            await runtime.jobs.cancel(job, CANCELLED_BY_OPERATOR)
    except ValueError as exc:
        return _json_error(400, "bad_request", str(exc))
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    request[AUDIT].update(target=wanted.describe(), matched=len(jobs), cancelled=len(jobs))
    return web.json_response({"matched": len(jobs), "cancelled": len(jobs)})


# -- queues --------------------------------------------------------------------------------------


def _queue_name(request: web.Request, runtime: AdminHost) -> str:
    name = request.match_info["name"]
    if name not in runtime.config.queues:
        raise KeyError(f"no queue named {name!r}; known: {', '.join(runtime.config.queues)}")
    return name


async def queues_list(request: web.Request) -> web.Response:
    """GET /admin/queues: each queue's limits, paused state and figures, whole cluster."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        paused = await runtime.jobs.paused()
        listed = []
        for name, queue in runtime.config.queues.items():
            listed.append({"name": name, "paused": name in paused,
                           "concurrency": queue.concurrency, "max_queued": queue.max_queued,
                           "rate": str(queue.rate) if queue.rate else None,
                           **await runtime.jobs.queue_stats(name)})
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    return web.json_response({"queues": listed})


@audited("queue.{action}", lambda r: r.match_info["name"])
async def queue_action(request: web.Request) -> web.Response:
    """POST /admin/queues/{name}/pause | resume | drain."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    action = request.match_info["action"]
    try:
        name = _queue_name(request, runtime)
    except KeyError as exc:
        return _json_error(404, "not_found", exc.args[0])
    try:
        if action == "pause":
            await runtime.jobs.pause(name)
            return web.json_response({"queue": name, "paused": True})
        if action == "resume":
            await runtime.jobs.resume(name)
            return web.json_response({"queue": name, "paused": False})
        cancelled = await runtime.jobs.drain(name)
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    request[AUDIT]["cancelled"] = cancelled
    return web.json_response({"queue": name, "cancelled": cancelled})


async def job_detail(request: web.Request) -> web.Response:
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        job, progress = await _find_job(request)
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    if job is None:
        return _json_error(404, "job_not_found", "no such job (or its record expired)")
    found = _admin_view(runtime, job)
    found.update(view(job, progress, runtime.config.jobs.path))
    # Who runs it now, and every attempt so far (kept across an operator's retries).
    found["worker"] = job.worker_id if found["status"] == "running" else None
    try:
        found["history"] = await runtime.jobs.history(job.key)
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    return web.json_response(found)


async def _act_on_job(request: web.Request, allowed: tuple[str, ...], refusal: str,
                      verb: str, act: Callable[[Job], Awaitable[object]]) -> web.Response:
    """A job action: 404 for no such job, 409 (`refusal`) when its status is not one of
    `allowed`, else `act` and the job's view after it."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        job, _ = await _find_job(request)
        if job is None:
            return _json_error(404, "job_not_found", "no such job (or its record expired)")
        status = public_status(job.status.value, job.error)
        if status not in allowed:
            return _json_error(409, refusal, f"the job is {status}; only "
                               f"{' or '.join(allowed)} jobs are {verb}")
        await act(job)
        job, _ = await _find_job(request)
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    assert job is not None
    return web.json_response(_admin_view(runtime, job))


@audited("job.cancel", lambda r: r.match_info["id"])
async def job_cancel(request: web.Request) -> web.Response:
    """Cancel one queued or running job (a running one stops when its worker sees it)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    return await _act_on_job(request, (QUEUED, RUNNING), "job_not_cancellable", "cancelled",
                             lambda job: runtime.jobs.cancel(job, CANCELLED_BY_OPERATOR))


@audited("job.retry", lambda r: r.match_info["id"])
async def job_retry(request: web.Request) -> web.Response:
    """Run a failed or cancelled job again, from its first attempt."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    return await _act_on_job(request, (FAILED, CANCELLED), "job_not_retryable", "retried",
                             runtime.jobs.retry)


async def job_progress(request: web.Request) -> web.Response:
    """POST /internal/jobs/{id}/progress {"progress": 40, "message": "..."} with the job's
    X-Sidecar-Progress-Token: what an upstream reports while it works on a job (the URL and the
    token come in the job's request, X-Sidecar-Progress-URL and X-Sidecar-Progress-Token)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        # orjson: nesting past 1024 levels is a JSONDecodeError, not a RecursionError (500)
        payload = await request.json(loads=orjson.loads)
        progress, message = parse_progress(payload)
    except ValueError as exc:
        return _json_error(400, "bad_request", str(exc))
    try:
        job, _ = await _find_job(request)
        token = (job.kwargs or {}).get("progress_token", "") if job is not None else ""
        lines = request.headers.getall(PROGRESS_TOKEN, [])
        # Exactly one line: two would leave which one counts to whoever reads them.
        given = (lines[0] if len(lines) == 1 else "").encode("utf-8", "surrogateescape")
        if job is None or not token or not hmac.compare_digest(token.encode(), given):
            return _json_error(404, "job_not_found",
                               "no such job, or not this job's X-Sidecar-Progress-Token")
        if public_status(job.status.value, job.error) in TERMINAL:
            return _json_error(409, "job_finished", "the job is over; progress is not taken")
        await runtime.jobs.set_progress(job, progress, message,
                                        runtime.config.jobs.max_age)
    except StoreUnavailable as exc:
        return _json_error(503, "redis_unavailable", str(exc))
    return web.Response(status=204)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: every worker's figures added up (sidecar/metrics.py)."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    if not runtime.config.metrics.enabled:
        return _json_error(404, "metrics_disabled", "metrics.enabled is false in the config")
    body = await render(runtime)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


_SECRET_KEYS = re.compile(r"token|password|passwd|secret|api[_-]?key|credential|authorization",
                          re.I)


def redacted(value: Any, key: str = "") -> Any:
    """The config as JSON with secrets hidden: values of secret-looking keys, and the password
    of any URL."""
    if isinstance(value, dict):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if isinstance(value, str):
        if _SECRET_KEYS.search(key) and value:
            return "<redacted>"
        if "://" in value and "@" in value:
            return _URL_PASSWORD.sub(r"\1<redacted>@", value)
    return value


_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")


async def config_view(request: web.Request) -> web.Response:
    """The config in effect (defaults filled in), secrets redacted."""
    runtime: AdminHost = request.app[RUNTIME]  # type: ignore[assignment]
    loaded = runtime.state.loaded
    return web.json_response({
        "file": str(loaded.path),
        "files": [str(f) for f in loaded.files],
        "reloads": runtime.reloads,
        "last_reload_error": runtime.last_reload_error,
        "config": redacted(runtime.config.model_dump(mode="json")),
    })


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """`Server: sidecar`, not aiohttp's default naming Python's and aiohttp's versions."""
    response.headers["Server"] = "sidecar"


def build_admin_app(runtime: AdminHost) -> web.Application:
    app = web.Application(middlewares=[require_token])
    app.on_response_prepare.append(_server_header)
    app[RUNTIME] = runtime
    app[KNOWN_LANES] = set()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/admin/cache/purge", purge)
    app.router.add_get("/admin/stats", stats)
    app.router.add_get("/admin/config", config_view)
    app.router.add_post("/admin/reload", reload_config)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/breakers", breakers)
    app.router.add_post("/admin/breakers/{name}/reset", reset_breaker)
    app.router.add_get("/admin/schedules", schedules_list)
    app.router.add_post("/admin/schedules/{name}/run", schedule_run)
    app.router.add_get("/admin/jobs", jobs_list)
    app.router.add_post("/admin/jobs/retry", jobs_bulk_retry)
    app.router.add_post("/admin/jobs/cancel", jobs_bulk_cancel)
    app.router.add_get("/admin/queues", queues_list)
    app.router.add_post(r"/admin/queues/{name}/{action:pause|resume|drain}", queue_action)
    app.router.add_get("/admin/jobs/{id}", job_detail)
    app.router.add_post("/admin/jobs/{id}/retry", job_retry)
    app.router.add_post("/admin/jobs/{id}/cancel", job_cancel)
    app.router.add_get("/admin/series", series)
    app.router.add_post("/internal/jobs/{id}/progress", job_progress)
    add_routes(app)  # the dashboard: GET / and /ui/{name}
    return app
