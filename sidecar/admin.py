"""The admin listener: health, readiness, stats, cache purge and circuit breakers."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from . import __version__

if TYPE_CHECKING:
    from .app import Runtime

RUNTIME = web.AppKey("runtime", object)
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})


@web.middleware
async def require_token(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Bearer token on everything but health probes, when admin.token is set."""
    runtime: Runtime = request.app[RUNTIME]  # type: ignore[assignment]
    token = runtime.config.admin.token
    if token and request.path not in _OPEN_PATHS:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response(
                {"error": "unauthorized", "detail": "send 'Authorization: Bearer <admin.token>'"},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="sidecar-admin"'})
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    runtime: Runtime = request.app[RUNTIME]  # type: ignore[assignment]
    return web.json_response({"status": "ok", "pid": os.getpid(), "worker": runtime.worker_id,
                              "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while requests can be proxied. Redis down degrades features (shared
    cache, cluster-wide state) but not proxying, so it is reported, not failed."""
    runtime: Runtime = request.app[RUNTIME]  # type: ignore[assignment]
    body = {
        "status": "ready" if runtime.redis_up else "degraded",
        "redis": "up" if runtime.redis_up else "down",
        "routes": len(runtime.state.routes.routes),
        "reloads": runtime.reloads,
        "last_reload_error": runtime.last_reload_error,
    }
    return web.json_response(body)


async def purge(request: web.Request) -> web.Response:
    """POST {"key": "/api/products/42"} | {"prefix": "/api/products/"} | {"tag": "product-42"}.

    Returns once every instance listening on Redis has dropped its in-memory copies."""
    runtime: Runtime = request.app[RUNTIME]  # type: ignore[assignment]
    try:
        body = await request.json()
    except ValueError:
        body = None
    kinds = [k for k in ("key", "prefix", "tag") if isinstance(body, dict) and k in body]
    if (not isinstance(body, dict) or len(kinds) != 1 or len(body) != 1
            or not isinstance(body[kinds[0]], str) or not body[kinds[0]]):
        return web.json_response({
            "error": "bad_request",
            "detail": 'send exactly one of {"key": "/path?query"}, {"prefix": "/path/"} or '
                      '{"tag": "name"} as a JSON object with a non-empty string',
        }, status=400)
    kind = kinds[0]
    value = body[kind]
    if kind in ("key", "prefix") and not value.startswith("/"):
        return web.json_response({"error": "bad_request",
                                  "detail": f"a {kind} is a path starting with '/'"}, status=400)
    result = await runtime.cache.purge(kind, value)
    return web.json_response(result)


async def stats(request: web.Request) -> web.Response:
    """A JSON snapshot of what each subsystem counts (this worker)."""
    runtime: Runtime = request.app[RUNTIME]  # type: ignore[assignment]
    return web.json_response({"pid": os.getpid(), "worker": runtime.worker_id,
                              "cache": await runtime.cache.stats(),
                              "dedup": runtime.dedup.stats(),
                              "breakers": runtime.breakers.stats()})


async def breakers(request: web.Request) -> web.Response:
    """Every circuit breaker of this worker: state, failures counted, when it half-opens."""
    runtime: Runtime = request.app[RUNTIME]  # type: ignore[assignment]
    return web.json_response({"pid": os.getpid(), "worker": runtime.worker_id,
                              "breakers": runtime.breakers.stats()})


async def reset_breaker(request: web.Request) -> web.Response:
    """Close a breaker now (cluster-scoped ones close on every instance)."""
    runtime: Runtime = request.app[RUNTIME]  # type: ignore[assignment]
    name = request.match_info["name"]
    if not runtime.breakers.reset(name):
        known = sorted(runtime.breakers.breakers)
        return web.json_response({
            "error": "not_found",
            "detail": f"no breaker named {name!r}; known: {', '.join(known) or 'none'}",
        }, status=404)
    return web.json_response({"name": name, "state": "closed"})


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[require_token])
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/admin/cache/purge", purge)
    app.router.add_get("/admin/stats", stats)
    app.router.add_get("/admin/breakers", breakers)
    app.router.add_post("/admin/breakers/{name}/reset", reset_breaker)
    return app
