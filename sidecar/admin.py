"""The admin listener: health and readiness now; metrics and /admin/* endpoints join it later."""

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


def build_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[require_token])
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
