"""One worker's runtime: the current State, the listeners, Redis, and every background task.

Lifecycle lives here and only here: start() builds everything, stop() drains and closes it.
A reload builds a new State beside the old one and swaps a single reference, so requests in
flight finish under the rules they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import logging
import os
import signal
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from aiohttp import web

from . import __version__, audit, native
from .admin import build_admin_app
from .aio import cancel_and_wait
from .balancer import Upstream, make_upstream
from .config import Config, ConfigError, LoadedConfig, Problem, RouteConfig, load_config
from .core.redact import Redactor
from .crypto import Sealer
from .dashboard import Sampler
from .edge.handler import EdgeHandler
from .edge.protocol import EdgeServer
from .edge.tls import server_context
from .errors import UpstreamError
from .http.forwarding import build_request_head
from .jobs.callbacks import CallbackSender
from .jobs.queue import JobService
from .jobs.schedules import Scheduler
from .logs import AccessLog, configure_logging
from .metrics import Recorder, Share, share_from_env
from .pipeline import (
    CANONICAL_ORDER,
    UPGRADE_POLICIES,
    Handler,
    Policy,
    ProxyRequest,
    ProxyResponse,
    build_chain,
)
from .policies.breaker import BreakerPolicy
from .policies.cache import CachePolicy
from .policies.compress import CompressCounts, CompressPolicy, EncodePolicy
from .policies.dedup import DedupPolicy
from .policies.etag import EtagPolicy
from .policies.idempotency import IdempotencyPolicy
from .policies.offload import OffloadPolicy
from .policies.ratelimit import RateLimitPolicy
from .policies.retry import RetryPolicy
from .process.embedded_redis import budget_for
from .routing import RouteTable
from .state import State
from .stores.boundary import StoreUnavailable
from .stores.breakers import BreakerService
from .stores.connections import RedisConnections, command_timeout, job_clients
from .stores.dedup import DedupService
from .stores.subscriber import Bus
from .stores.tiered import CacheService

if TYPE_CHECKING:
    from .jobs.runner import JobRunner
    from .tracing import Tracing

log = logging.getLogger("sidecar")


def _upstream_handler(pool: Upstream, recorder: Recorder, *,
                      upgrade: bool = False) -> Handler:
    """The chain's last step: the request to the upstream, timed and counted. `upgrade`: the
    chain of requests asking to switch protocols, whose head keeps Upgrade and whose 101 comes
    back with the connection itself (ProxyResponse.tunnel)."""
    name = pool.name

    async def call_upstream(request: ProxyRequest) -> ProxyResponse:
        started = time.perf_counter()
        head = (build_request_head(request.head, request.route, request.request_id,
                                   request.chunked, upgrade=True)
                if upgrade else request.upstream_head)
        trace = request.trace
        span = None
        if trace is not None:  # a client span per attempt, its context in traceparent
            span, head = trace.upstream(name, head)
        try:
            response = await pool.request(head, request.body, request.chunked, request.timeout,
                                          request.method == "HEAD", upgrade, request)
        except UpstreamError as exc:
            recorder.upstream_call(name, None, time.perf_counter() - started)
            if trace is not None and span is not None:
                trace.end_upstream(span, None, exc.code)
            raise
        seconds = time.perf_counter() - started
        recorder.upstream_call(name, response.status, seconds)
        if trace is not None and span is not None:
            trace.end_upstream(span, response.status)
        result = ProxyResponse.from_upstream(response)
        result.upstream_seconds = seconds
        return result

    return call_upstream


@dataclass(frozen=True, slots=True)
class Services:
    """What policies are built with besides their config: the worker's shared services."""

    cache: CacheService
    dedup: DedupService
    breakers: BreakerService
    jobs: JobService
    compression: CompressCounts


PolicyBuilder = Callable[[RouteConfig, Config, Services], "Policy | None"]


def _rate_limit(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    if route.rate_limit is None:
        return None
    return RateLimitPolicy(route.name, route.rate_limit, services.dedup)


def _etag(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    return EtagPolicy() if route.etag else None


def _idempotency(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    if route.idempotency is None:
        return None
    return IdempotencyPolicy(route.name, route.idempotency, services.dedup)


def _cache(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    if route.cache is None:
        return None
    # A route with dedup has its misses coalesced there already: one lock per miss, not two.
    return CachePolicy(route.name, route.cache, services.cache, generate_etag=route.etag,
                       coalesce=route.cache.coalesce and route.dedup is None,
                       cluster=services.dedup,
                       unvaried=frozenset({"accept-encoding"}) if route.compress else frozenset())


def _compress(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    if route.compress is None:
        return None
    return CompressPolicy(route.name, route.compress, services.compression)


def _encode(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    if route.compress is None:
        return None
    return EncodePolicy(route.name, route.compress, services.compression,
                        stored=route.cache is not None)


def _dedup(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    if route.dedup is None:
        return None
    return DedupPolicy(route.name, route.dedup, services.dedup)


def _offload(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    if route.offload is None:
        return None
    return OffloadPolicy(route.name, route.upstream, route.offload, services.jobs,
                         config.jobs, config.queues[route.offload.queue])


def _breaker(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    """The route's own breaker, else its upstream's, if either is set."""
    breaker = route.breaker or config.upstreams[route.upstream].breaker
    if breaker is None:
        return None
    name = f"route:{route.name}" if route.breaker else f"upstream:{route.upstream}"
    return BreakerPolicy(name, route.upstream, breaker, services.breakers)


def _retry(route: RouteConfig, config: Config, services: Services) -> Policy | None:
    """The route's own retry setting, else its upstream's."""
    retry = route.retry or config.upstreams[route.upstream].retry
    if retry is None or retry.attempts <= 0:
        return None
    return RetryPolicy(route.name, retry, services.dedup.counts)


# How each policy of pipeline.CANONICAL_ORDER is built for a route (None: the route has none).
# Chains follow CANONICAL_ORDER, never this table's order; tests/test_pipeline.py checks that
# the two name the same policies.
POLICY_BUILDERS: dict[str, PolicyBuilder] = {
    "rate_limit": _rate_limit, "compress": _compress, "etag": _etag,
    "idempotency": _idempotency, "cache": _cache, "dedup": _dedup, "compress.encode": _encode,
    "offload": _offload, "breaker": _breaker, "retry": _retry,
}


def build_policies(route: RouteConfig, config: Config, services: Services, *,
                   upgrade: bool = False) -> list[Policy]:
    """The route's policies, outermost first, in pipeline.CANONICAL_ORDER. `upgrade`: for a
    request that asks to switch protocols, only those of pipeline.UPGRADE_POLICIES."""
    policies: list[Policy] = []
    for name in CANONICAL_ORDER:
        if upgrade and name not in UPGRADE_POLICIES:
            continue
        policy = POLICY_BUILDERS[name](route, config, services)
        if policy is not None:
            policies.append(policy)
    return policies


def build_state(loaded: LoadedConfig, previous: State | None, cache: CacheService,
                dedup: DedupService, breakers: BreakerService, jobs: JobService,
                recorder: Recorder, compression: CompressCounts | None = None) -> State:
    """Compile a config; upstream pools whose settings did not change are carried over."""
    config = loaded.config
    pools: dict[str, Upstream] = {}
    for name, upstream in config.upstreams.items():
        old = previous.pools.get(name) if previous else None
        pools[name] = old if old is not None and old.config == upstream else make_upstream(
            name, upstream)
    routes = RouteTable(config)
    services = Services(cache, dedup, breakers, jobs,
                        Counter() if compression is None else compression)
    chains = {
        route.name: build_chain(build_policies(route.config, config, services),
                                _upstream_handler(pools[route.upstream], recorder))
        for route in routes.routes
    }
    upgrade_chains = {
        route.name: build_chain(build_policies(route.config, config, services, upgrade=True),
                                _upstream_handler(pools[route.upstream], recorder, upgrade=True))
        for route in routes.routes
    }
    return State(
        loaded=loaded,
        config=config,
        routes=routes,
        pools=pools,
        chains=chains,
        upgrade_chains=upgrade_chains,
        via_response_bytes=f"1.1 {config.server.via}".encode("latin-1"),
        via_request_id=f"Via: 1.1 {config.server.via}\r\nX-Request-ID: ".encode("latin-1"),
        jobs_path=config.jobs.path,
        redactor=Redactor(config.log.redact.query, config.log.redact.headers),
    )


def tracing_for(config: Config, worker_id: int) -> Tracing | None:
    """The worker's tracer for `tracing:`, or None; the SDK is imported only then."""
    if config.tracing is None:
        return None
    from .tracing import Tracing

    redact = config.log.redact
    return Tracing(config.tracing, Redactor(redact.query, redact.headers), worker_id)


def _signature(loaded: LoadedConfig) -> tuple[Any, ...]:
    """What the watcher compares: every file read, plus what the include globs match now."""
    entries: list[tuple[str, int | None, int | None]] = []
    paths = set(loaded.files)
    base = loaded.path.parent
    for pattern in loaded.config.include:
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        paths.update(Path(p) for p in glob.glob(full))
    for path in sorted(paths):
        try:
            stat = path.stat()
            entries.append((str(path), stat.st_mtime_ns, stat.st_size))
        except OSError:
            entries.append((str(path), None, None))
    return tuple(entries)


class Runtime:
    def __init__(self, loaded: LoadedConfig, redis_url: str, *, reuse_port: bool = False,
                 worker_id: int = 0) -> None:
        self.cache = CacheService()
        self.dedup = DedupService()
        self.breakers = BreakerService()
        self.jobs = JobService()
        # One sealer for everything stored from clients and upstreams (crypto.py); a reload
        # gives it the keys of the new config (a rotation).
        self.sealer = Sealer(loaded.config.redis.keys())
        self.cache.sealer = self.dedup.sealer = self.jobs.sealer = self.sealer
        self.callbacks = CallbackSender(self, self.jobs)
        self.runner: JobRunner | None = None
        self.scheduler: Scheduler | None = None
        self.metrics = Recorder(loaded.config)
        self.metrics_share: Share | None = share_from_env()
        self.series = Sampler()  # the dashboard's time series, from the counters above
        self.compression: CompressCounts = Counter()  # (route, coding, result) -> count
        self.state = build_state(loaded, None, self.cache, self.dedup, self.breakers, self.jobs,
                                 self.metrics, self.compression)
        self.cache.set_quota(loaded.config.cache.redis.max_bytes)
        self.cache.set_l1_without_redis(loaded.config.cache.l1_without_redis)
        self.redis_url = redis_url
        self.reuse_port = reuse_port
        self.worker_id = worker_id
        self.access_log = AccessLog(loaded.config.log)
        self.tracing: Tracing | None = None  # started with the worker when `tracing:` is set
        self.redis: aioredis.Redis | None = None
        self.connections: RedisConnections | None = None
        self.redis_up = False
        self.edge: EdgeServer | None = None
        self.reloads = {"ok": 0, "error": 0}
        self.last_reload_error: str | None = None
        self._stack = contextlib.AsyncExitStack()  # how to undo what start() started
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.public_port: int | None = None
        self.admin_port: int | None = None

    @property
    def config(self) -> Config:
        return self.state.config

    @property
    def pools(self) -> dict[str, Upstream]:
        return self.state.pools

    @property
    def schedule_runs(self) -> dict[tuple[str, str], int]:
        return dict(self.scheduler.counts) if self.scheduler is not None else {}

    def progress_base(self) -> str:
        """Where upstreams POST job progress: jobs.progress_url, else this admin listener."""
        return progress_base(self.config, self.admin_port)

    async def start(self) -> None:
        """Build and start everything. A step that fails stops what the steps before it had
        started, in reverse, and raises StartupError with a one-line reason: a half-started
        worker leaves no listener, client or task behind."""
        stack = contextlib.AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            await _unwind(stack)
            raise
        self._stack = stack

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Each step registers how it is undone as soon as it has started: `stop()` (or a
        failed start) undoes them in reverse, the last started first."""
        config = self.config
        stack.callback(self.access_log.flush)
        self.tracing = tracing_for(config, self.worker_id)
        stack.callback(self._stop_tracing)
        # Three clients besides the job queue's (stores/connections.py says which and why).
        connections = self.connections = RedisConnections(self.redis_url,
                                                          config.redis.connect_timeout)
        self.redis = connections.commands
        stack.push_async_callback(connections.close)
        await self._check_redis()
        bus = Bus(connections.pubsub)
        stack.push_async_callback(bus.close)  # after the services, unwinding in reverse
        self.cache.attach(self.redis, bus)
        stack.push_async_callback(self.cache.close)
        self.dedup.attach(self.redis, bus, bulk=connections.bulk,
                          command_timeout=connections.command_timeout)
        stack.push_async_callback(self.dedup.close)
        self.breakers.attach(self.redis, bus)
        stack.push_async_callback(self.breakers.close)
        bus.start()
        attach_jobs(self.jobs, self.redis_url, config, runs_jobs=config.jobs.workers)
        stack.push_async_callback(self.jobs.close)
        # Every process sends callbacks, job workers or not: a cancel made here owes one too.
        await self.callbacks.start()
        stack.push_async_callback(self.callbacks.stop)
        stack.push_async_callback(self._close_pools)  # once the edge and the jobs are done
        tls = None
        if config.server.tls is not None:
            try:
                tls = server_context(config.server.tls, self.state.loaded.path.parent)
            except ValueError as exc:
                raise StartupError(f"server.tls: {exc}") from exc
        edge = EdgeServer(EdgeHandler(self), config.server.limits,
                          keepalive_timeout=config.server.keepalive_timeout, tls=tls)
        listen = config.server.listen
        try:
            self.public_port = await edge.start(listen.host, listen.port,
                                                reuse_port=self.reuse_port)
        except OSError as exc:
            raise StartupError(_cannot_listen(listen.host, listen.port, "server.listen",
                                              exc)) from exc
        self.edge = edge
        stack.push_async_callback(self._stop_edge)
        admin = web.AppRunner(build_admin_app(self), access_log=None, shutdown_timeout=2.0)
        await admin.setup()
        stack.push_async_callback(admin.cleanup)
        address = config.server.admin_listen
        site = web.TCPSite(admin, address.host, address.port, reuse_port=self.reuse_port,
                           backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(_cannot_listen(address.host, address.port,
                                              "server.admin_listen", exc)) from exc
        self.admin_port = _bound_port(admin)
        if self.metrics_share is not None:
            stack.callback(self.metrics_share.close, self)  # after its task has ended
        self.series.sample(self)  # the baseline: what comes after it shows in the series
        self._tasks = [
            asyncio.create_task(self.access_log.run(), name="access-log"),
            asyncio.create_task(self._watch_redis(), name="redis-health"),
            asyncio.create_task(self.series.run(self), name="dashboard-series"),
        ]
        stack.push_async_callback(cancel_and_wait, self._tasks)  # those appended below too
        if self.metrics_share is not None:
            self._tasks.append(asyncio.create_task(self.metrics_share.run(self), name="metrics"))
        if config.server.watch_config:
            self._tasks.append(asyncio.create_task(self._watch_config(), name="config-watch"))
        if config.jobs.workers:
            from .jobs.runner import JobRunner

            self.runner = JobRunner(self, self.jobs)
            await self.runner.start()
            stack.push_async_callback(self.runner.stop)
        self.scheduler = Scheduler(self, self.redis)
        await self.scheduler.start()
        stack.push_async_callback(self.scheduler.stop)
        log.info("sidecar listening", extra={
            "listen": f"{config.server.listen.host}:{self.public_port}",
            "admin": f"{config.server.admin_listen.host}:{self.admin_port}",
            "worker": self.worker_id, "pid": os.getpid(), "version": __version__,
            "compiled": f"{len(native.compiled())}/{len(native.COMPILED)}",
        })
        stale = native.stale()
        if stale:
            log.warning("compiled modules are older than their sources: the old code runs; "
                        "rebuild with `make setup` (or `pip install -e .`)",
                        extra={"modules": stale})

    def _stop_tracing(self) -> None:
        tracing, self.tracing = self.tracing, None
        if tracing is not None:
            tracing.shutdown()

    async def _stop_edge(self) -> None:
        if self.edge is not None:
            await self.edge.stop(self.config.server.shutdown_grace)
            self.edge = None

    async def _close_pools(self) -> None:
        for pool in self.state.pools.values():
            await pool.close()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(
            self.reload("SIGHUP")))
        loop.add_signal_handler(signal.SIGTERM, self._stopped.set)
        loop.add_signal_handler(signal.SIGINT, self._stopped.set)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def request_stop(self) -> None:
        self._stopped.set()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within server.shutdown_grace, then
        undo the rest of start-up in reverse."""
        log.info("shutting down", extra={"grace_s": self.config.server.shutdown_grace,
                                         "worker": self.worker_id})
        await self._stop_edge()  # first: requests in flight finish with everything else up
        stack, self._stack = self._stack, contextlib.AsyncExitStack()
        await _unwind(stack)

    # -- reload ---------------------------------------------------------------------------------

    async def reload(self, reason: str, *, audited: bool = True) -> bool:
        """Load, validate and swap the config; on any problem keep serving the old one. Writes
        the reload's audit line unless the caller writes its own (`audited` False: the admin
        API's, which knows who asked)."""
        ok = await self._reload(reason)
        if audited:
            audit.record("config.reload", str(self.state.loaded.path),
                         audit.OK if ok else audit.FAILED, token=None, client=None,
                         worker=self.worker_id, reason=reason,
                         **({} if ok else {"error": self.last_reload_error}))
        return ok

    async def _reload(self, reason: str) -> bool:
        async with self._reload_lock:
            old = self.state
            try:
                loaded = await asyncio.to_thread(load_config, old.loaded.path)
                new = build_state(loaded, old, self.cache, self.dedup, self.breakers, self.jobs,
                                  self.metrics, self.compression)
                tls = await self._tls_for(loaded)
            except ConfigError as exc:
                self.reloads["error"] += 1
                self.last_reload_error = str(exc)
                log.error("config reload rejected; the previous config keeps serving", extra={
                    "reason": reason, "problems": [str(p) for p in exc.problems]})
                return False
            except Exception as exc:  # a bug must not take the old config down with it
                self.reloads["error"] += 1
                self.last_reload_error = repr(exc)
                log.exception("config reload failed; the previous config keeps serving",
                              extra={"reason": reason})
                return False
            restart_needed = _restart_needed(old.config, new.config)
            self.state = new
            if self.edge is not None and tls is not None and self.edge.tls is not None:
                self.edge.tls = tls  # new connections get the certificate read just now
            self.cache.set_quota(new.config.cache.redis.max_bytes)
            self.cache.set_l1_without_redis(new.config.cache.l1_without_redis)
            self.sealer.configure(new.config.redis.keys())
            await self._bound_embedded_redis(old.config, new.config)
            self.reloads["ok"] += 1
            self.last_reload_error = None
            configure_logging(new.config.log, new.loaded.path.parent)
            if new.config.tracing != old.config.tracing or (
                    new.config.log.redact != old.config.log.redact):
                tracing, self.tracing = self.tracing, tracing_for(new.config, self.worker_id)
                if tracing is not None:  # what it holds is exported in its own thread
                    await asyncio.to_thread(tracing.shutdown)
            self.access_log.configure(new.config.log)
            self.metrics.configure(new.config)
            for name, pool in old.pools.items():
                if new.pools.get(name) is not pool:
                    await pool.close()
            log.info("config reloaded", extra={"reason": reason, "routes": len(new.routes.routes),
                                               "worker": self.worker_id})
            if restart_needed:
                log.warning("some changes apply only after a restart", extra={
                    "sections": restart_needed})
            return True

    async def _tls_for(self, loaded: LoadedConfig) -> ssl.SSLContext | None:
        """The listener's TLS context from the files as they are now (a renewed certificate);
        a file that cannot be used rejects the reload, as a config error does."""
        tls = loaded.config.server.tls
        if tls is None:
            return None
        try:
            return await asyncio.to_thread(server_context, tls, loaded.path.parent)
        except ValueError as exc:
            raise ConfigError([Problem(str(loaded.path), "server.tls", str(exc))]) from None

    async def _bound_embedded_redis(self, old: Config, new: Config) -> None:
        """The embedded Redis's maxmemory follows a reload's budget (the L2 quota, the queues,
        redis.headroom: process/embedded_redis.py); `sidecar run` set it at start."""
        if new.redis.url != "embedded" or self.connections is None:
            return
        total = budget_for(new).total
        if total == budget_for(old).total:
            return
        try:
            await self.connections.set_maxmemory(total)
        except StoreUnavailable as exc:
            log.warning("the embedded Redis's maxmemory was not changed", extra={
                "maxmemory": total, "error": str(exc) or type(exc).__name__})

    async def _watch_config(self) -> None:
        signature = await asyncio.to_thread(_signature, self.state.loaded)
        while True:
            await asyncio.sleep(self.config.server.watch_interval)
            current = await asyncio.to_thread(_signature, self.state.loaded)
            if current != signature:
                # Let an editor finish writing (several writes, or write-then-rename) first.
                await asyncio.sleep(0.1)
                await self.reload("file changed")
                signature = await asyncio.to_thread(_signature, self.state.loaded)

    # -- redis ----------------------------------------------------------------------------------

    async def _check_redis(self) -> None:
        assert self.connections is not None
        try:
            await self.connections.ping()
            up = True
        except StoreUnavailable as exc:
            up = False
            if self.redis_up:
                log.warning("redis unreachable; proxying continues without it",
                            extra={"error": str(exc) or type(exc).__name__})
        if up and not self.redis_up:
            log.info("redis reachable", extra={"url": _redact(self.redis_url)})
        self.redis_up = up
        self.cache.redis_up = up
        self.dedup.redis_up = up
        self.breakers.redis_up = up
        self.jobs.redis_up = up

    async def _watch_redis(self) -> None:
        while True:
            await asyncio.sleep(self.config.redis.health_interval)
            await self._check_redis()


def _restart_needed(old: Config, new: Config) -> list[str]:
    """The sections whose changes a reload cannot apply; redis.headroom it can (it only moves
    the embedded Redis's maxmemory), and redis.encryption_keys (a key rotation)."""
    # TLS files and settings apply at a reload (Runtime._tls_for); turning TLS on or off does
    # not: the listener accepts differently with it.
    found = ["server"] if (old.server.model_copy(update={"tls": None})
                           != new.server.model_copy(update={"tls": None})
                           or (old.server.tls is None) != (new.server.tls is None)) else []
    applied = {"headroom": 0, "encryption_keys": []}  # a reload applies these
    if old.redis.model_copy(update=applied) != new.redis.model_copy(update=applied):
        found.append("redis")
    return found


def attach_jobs(service: JobService, redis_url: str, config: Config, *,
                runs_jobs: bool = True) -> None:
    """The job service's own clients (stores/connections.py; the wake-up one only where job
    loops run); client requests bound their calls with the command timeout of the others."""
    timeout = config.redis.connect_timeout
    service.attach(*job_clients(redis_url, timeout, wake_ups=runs_jobs),
                   command_timeout=command_timeout(timeout))


def progress_base(config: Config, admin_port: int | None) -> str:
    if config.jobs.progress_url:
        return config.jobs.progress_url.rstrip("/")
    host = config.server.admin_listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{admin_port or config.server.admin_listen.port}"


class StartupError(Exception):
    """A worker could not start; the message is the one-line reason (what, where, why)."""


def _cannot_listen(host: str, port: int, key: str, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    why = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot listen on {where} ({key}): {why}"


async def _unwind(stack: contextlib.AsyncExitStack) -> None:
    """Undo start-up steps in reverse. One that fails is logged and the others still run
    (AsyncExitStack goes on past a failing callback and raises the last error at the end)."""
    try:
        await stack.aclose()
    except Exception:
        log.exception("a step of the shutdown failed; the others ran")


def _bound_port(runner: web.BaseRunner) -> int | None:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    return None


def _redact(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


async def serve(loaded: LoadedConfig, redis_url: str, *, reuse_port: bool = False,
                worker_id: int = 0) -> None:
    """Run one worker until SIGTERM/SIGINT, then drain and stop."""
    runtime = Runtime(loaded, redis_url, reuse_port=reuse_port, worker_id=worker_id)
    await runtime.start()
    runtime.install_signal_handlers()
    # What start-up built lives as long as the process: keep it out of every later collection.
    gc.collect()
    gc.freeze()
    await runtime.wait_stopped()
    await runtime.stop()
