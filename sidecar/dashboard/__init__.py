"""The dashboard on the admin listener: a single page (`GET /`, assets under `/ui/`) shipped in
the package, and the per-route time series it draws (docs/dashboard.md).

The page is static: it asks for the admin token, keeps it in sessionStorage and calls the JSON
admin API with it, so the files themselves need no token. The series is sampled here, once a
second, from the same cumulative figures /metrics adds up across workers (metrics.snapshot and
the files of metrics.Share): the request path does no extra work for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

from aiohttp import web

from ..core.series import FIELDS, Ring, Totals
from ..metrics import MetricsHost, Snapshot, merge, snapshot

log = logging.getLogger("sidecar.dashboard")

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain"}
# The page draws with the DOM and CSSOM only: no inline script or style attribute, no other
# origin. Framing is refused (the page has buttons).
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_HIT = frozenset({"hit", "stale"})


def assets() -> dict[str, bytes]:
    """The files of static/, by name, read once when the admin app is built."""
    folder = resources.files(__package__).joinpath("static")
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()
            if entry.is_file() and os.path.splitext(entry.name)[1] in _TYPES}


def add_routes(app: web.Application) -> None:
    """`GET /` and `GET /ui/{name}` on the admin app (the guard lets both through)."""
    files = assets()

    def serve(name: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            wanted = request.match_info.get("name", name)
            body = files.get(wanted)
            if body is None:
                raise web.HTTPNotFound(text=f"no dashboard asset named {wanted!r}")
            content_type = _TYPES[os.path.splitext(wanted)[1]]
            return web.Response(body=body, headers={**_HEADERS, "Content-Type": content_type})
        return handler

    app.router.add_get("/", serve("index.html"))
    app.router.add_get("/ui/{name}", serve(""))


def totals(merged: Snapshot, routes: Iterable[str], bounds: tuple[float, ...]
           ) -> dict[str, Totals]:
    """Each route's cumulative figures (core/series.FIELDS and latency buckets) out of merged
    metrics snapshots."""
    names = list(routes)
    counts = {name: [0] * len(FIELDS) for name in names}
    counters = merged["counters"]
    for (route, _method, status), n in counters.get("sidecar_requests_total", {}).items():
        if route in counts:
            counts[route][0] += n
            if str(status).startswith("5"):
                counts[route][1] += n
    for (route, _layer, result), n in counters.get("sidecar_cache_requests_total", {}).items():
        if route in counts and result != "bypass":
            counts[route][3] += n
            if result in _HIT:
                counts[route][2] += n
    for (route, role), n in counters.get("sidecar_dedup_total", {}).items():
        if route in counts and role == "follower":
            counts[route][4] += n
    for (route,), n in counters.get("sidecar_ratelimit_rejected_total", {}).items():
        if route in counts:
            counts[route][5] += n
    histograms = merged["histograms"].get("sidecar_request_duration_seconds", {})
    out = {}
    for name in names:
        found = histograms.get((name, bounds))
        buckets = tuple(found[0]) if found else (0,) * (len(bounds) + 1)
        out[name] = Totals(tuple(counts[name]), bounds, buckets)
    return out


class Sampler:
    """One sample a second of every route's figures, whole cluster, into a Ring."""

    def __init__(self, size: int = 300, clock: Callable[[], float] = time.time) -> None:
        self.ring = Ring(size)
        self.clock = clock

    def __repr__(self) -> str:
        return f"<Sampler {self.ring!r}>"

    def sample(self, runtime: MetricsHost) -> None:
        own = snapshot(runtime)
        snaps = [own]
        share = runtime.metrics_share
        if share is not None:
            snaps += share.others()
        config = runtime.config
        merged = merge(snaps, {own["pid"]})
        self.ring.add(int(self.clock()), totals(merged, (r.name for r in config.routes),
                                                tuple(config.metrics.buckets)))

    async def run(self, runtime: MetricsHost) -> None:
        while True:
            await asyncio.sleep(1.0 - self.clock() % 1.0)  # on the second, as the other workers
            try:
                self.sample(runtime)
            except (OSError, ValueError, KeyError, TypeError):
                log.exception("dashboard series: a sample failed; the next one is tried")
