"""Schedules: requests sent through a route on a timetable, each tick once across the cluster.

Every worker of every instance runs a Scheduler. At each tick (core/schedule.py says when, from
the config alone) every worker tries to claim the tick in Redis (stores/schedules.py); one
wins and sends the schedule's requests through the route's policy chain, as the edge does for a
client: on an offloaded route each becomes a job, on a cached route it fills the cache. The
winner renews a lease while the run lasts; a tick whose worker died before finishing is claimed
again once its lease runs out (at least once: its requests may then reach the upstream twice).
A worker also re-tries the newest tick every second, which is how a dead worker's tick is found.

Runs are recorded in Redis too (last run, outcome, per-request statuses), which is what
`GET /admin/schedules` shows whichever worker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..aio import cancel_and_wait
from ..core.schedule import Ticks, missed_between, runs
from ..edge.responses import new_request_id
from ..errors import SidecarError
from ..http.headers import Headers
from ..http.request import RequestHead
from ..pipeline import ProxyRequest
from ..stores.boundary import StoreUnavailable
from ..stores.schedules import ScheduleStore

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ..config import ScheduleConfig, ScheduleRequestConfig
    from ..metrics import Recorder
    from ..state import State

log = logging.getLogger("sidecar.schedules")

RECHECK = 1.0  # how often a worker looks again at each schedule's newest tick, at the longest
LEASE = 10.0  # a run's claim on its tick, renewed every third of it while it runs
MAX_RESPONSE = 16 * 1024**2  # what a run reads of each answer (to its end: a cache stores it)


class ScheduleHost(Protocol):
    """What the scheduler needs of the worker it runs in (app.Runtime)."""

    @property
    def state(self) -> State: ...

    @property
    def metrics(self) -> Recorder: ...

    @property
    def public_port(self) -> int | None: ...


class Scheduler:
    def __init__(self, host: ScheduleHost, client: aioredis.Redis,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.store = ScheduleStore(client)
        self.clock = clock
        self.holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.counts: Counter[tuple[str, str]] = Counter()  # (schedule, outcome) -> runs here
        self._ticks: dict[int, Ticks] = {}  # id(ScheduleConfig) -> its ticks
        self._runs: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self._redis_down = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="schedules")

    async def stop(self) -> None:
        """Runs under way are cut: their ticks are claimed again by another worker once their
        leases run out."""
        await cancel_and_wait([t for t in (self._task, *self._runs) if t is not None])

    def ticks(self, schedule: ScheduleConfig) -> Ticks:
        ticks = self._ticks.get(id(schedule))
        if ticks is None:
            ticks = self._ticks[id(schedule)] = schedule.ticks()
        return ticks

    # -- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        started = False
        while True:
            config = self.host.state.config
            if len(self._ticks) > 4 * len(config.schedules) + 16:
                self._ticks.clear()  # configs replaced by reloads
            now = self.clock()
            wake = now + RECHECK
            try:
                if not started:
                    for name, schedule in config.schedules.items():
                        if schedule.on_start:
                            await self._on_start(name, schedule, now)
                    started = True
                for name, schedule in config.schedules.items():
                    ticks = self.ticks(schedule)
                    tick = ticks.latest(now)
                    await self._claim(name, schedule, ticks, tick, now)
                    wake = min(wake, ticks.following(tick))
                if self._redis_down:
                    log.info("schedules: redis reachable again")
                self._redis_down = False
            except StoreUnavailable as exc:
                if not self._redis_down:
                    log.warning("schedules: redis unreachable; ticks wait until it is back",
                                extra={"error": str(exc) or type(exc).__name__})
                self._redis_down = True
            # A few ms past the tick, so that this worker's clock has passed it for sure.
            await asyncio.sleep(max(0.0, wake - self.clock()) + 0.002)

    async def _claim(self, name: str, schedule: ScheduleConfig, ticks: Ticks, tick: float,
                     now: float) -> None:
        code, previous = await self.store.claim(name, tick, LEASE, self.holder)
        if code == 0:
            return
        if code == 1 and previous is not None and schedule.missed == "skip":
            # The ticks between the last claimed and this one fell while nobody ran them.
            between = missed_between(ticks, previous, tick)
            if between:
                await self.store.count_skipped(name, between)
                self.counts[(name, "skipped")] += between
        if code == 1 and not runs(ticks, tick, now, previous, schedule.missed):
            log.info("schedule tick skipped", extra={
                "schedule": name, "tick": _iso(tick), "late_s": round(now - tick, 3),
                "reason": "new schedule" if previous is None else "missed: skip"})
            outcome = "new" if previous is None else "skipped"
            await self.store.finish(name, tick, self.holder, "tick", outcome, now, [])
            if previous is not None:
                self.counts[(name, "skipped")] += 1
            return
        trigger = "tick" if code == 1 else "recovery"
        self._spawn(self.run(name, schedule, trigger, tick))

    async def _on_start(self, name: str, schedule: ScheduleConfig, now: float) -> None:
        ticks = self.ticks(schedule)
        tick = ticks.latest(now)
        if await self.store.begin(name, ticks.following(tick) - tick):
            self._spawn(self.run(name, schedule, "start", None, begun=True))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    # -- one run --------------------------------------------------------------------------------

    async def run(self, name: str, schedule: ScheduleConfig, trigger: str,
                  tick: float | None, *, begun: bool = False) -> dict[str, Any]:
        """Send the schedule's requests in order; record the run. `trigger`: tick, recovery,
        start or manual (POST /admin/schedules/{name}/run)."""
        if not begun:
            with contextlib.suppress(StoreUnavailable):
                await self.store.begin(name, 0)  # marks when this run began (on_start reads it)
        started = self.clock()
        lease = None if tick is None else asyncio.create_task(self._renew(name, tick))
        results: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(schedule.timeout):
                for request in schedule.all_requests():
                    results.append(await self._send(name, schedule, request, tick))
        except TimeoutError:
            results.append({"error": f"the run took longer than its timeout "
                                     f"({schedule.timeout:g}s)"})
        finally:
            if lease is not None:
                await cancel_and_wait([lease])
        failed = any("error" in r or r["status"] >= 400 for r in results)
        outcome = "failed" if failed else "succeeded"
        self.counts[(name, outcome)] += 1
        duration = self.clock() - started
        (log.warning if failed else log.info)("schedule ran", extra={
            "schedule": name, "trigger": trigger, "outcome": outcome,
            "tick": _iso(tick) if tick is not None else None,
            "duration_ms": round(duration * 1000, 1),
            "statuses": [r.get("status") for r in results]})
        try:
            await self.store.finish(name, tick, self.holder, trigger, outcome, started, results)
        except StoreUnavailable as exc:
            log.warning("schedule run not recorded: redis unreachable",
                        extra={"schedule": name, "error": str(exc) or type(exc).__name__})
        return {"schedule": name, "trigger": trigger, "outcome": outcome,
                "duration_ms": round(duration * 1000, 1), "requests": results}

    async def _renew(self, name: str, tick: float) -> None:
        while True:
            await asyncio.sleep(LEASE / 3)
            try:
                if not await self.store.renew(name, tick, self.holder, LEASE):
                    return  # taken over: the run goes on, its end no longer marks the tick
            except StoreUnavailable:
                pass  # the next renewal may get through; past the lease another worker redoes it

    async def _send(self, name: str, schedule: ScheduleConfig, spec: ScheduleRequestConfig,
                    tick: float | None) -> dict[str, Any]:
        """One request through the route's chain, its answer read to the end (so that a cache
        stores it); what the run records of it."""
        state = self.host.state
        route = next((r for r in state.routes.routes if r.name == schedule.route), None)
        chain = state.chains.get(schedule.route)
        fields: dict[str, Any] = {"method": spec.method, "path": spec.path}
        if route is None or chain is None:
            return {**fields, "error": f"no route named {schedule.route!r} in the config"}
        body = spec.body.encode()
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in spec.headers.items()]
        names = {k.lower() for k, _ in raw}
        if b"host" not in names:
            raw.insert(0, (b"Host", self._default_host(state).encode()))
        raw.append((b"X-Sidecar-Schedule", name.encode()))
        if tick is not None:
            raw.append((b"X-Sidecar-Tick", _iso(tick).encode()))
        if body and b"content-length" not in names:
            raw.append((b"Content-Length", str(len(body)).encode()))
        head = RequestHead(spec.method, spec.path, Headers(raw), client="127.0.0.1",
                           content_length=len(body) if body else None)
        request_id = new_request_id()
        request = ProxyRequest(head, route, request_id, body or None, False, route.timeout)
        started = time.perf_counter()
        metrics = self.host.metrics
        status = 499
        try:
            response = await chain(request)
            status = response.status
            if (response.body is None and response.stream is not None
                    and await response.read_whole(MAX_RESPONSE) is None):
                response.stream.close()
            fields["status"] = status
            job = _header(response.headers, b"x-sidecar-job-id")
            if job is not None:
                fields["job"] = job
        except SidecarError as exc:
            status = exc.status
            fields.update(status=status, error=f"{exc.code}: {exc.detail}")
        except Exception as exc:
            log.exception("schedule request failed", extra={"schedule": name,
                                                            "request_id": request_id})
            status = 500
            fields.update(status=500, error=str(exc) or type(exc).__name__)
        finally:
            if metrics.enabled:
                metrics.request(route.name, spec.method, status, time.perf_counter() - started)
        return fields

    def _default_host(self, state: State) -> str:
        """The listener's address as a client on this machine names it (localhost for a
        wildcard), so that what a schedule caches is what such a client is answered from. Behind
        a load balancer, clients send another Host: the schedule's `headers` then say which."""
        listen = state.config.server.listen
        host = listen.host if listen.host not in ("0.0.0.0", "::", "") else "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.host.public_port or listen.port}"

    # -- what the admin API shows ---------------------------------------------------------------

    async def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        listed = []
        for name, schedule in self.host.state.config.schedules.items():
            ticks = self.ticks(schedule)
            entry: dict[str, Any] = {
                "name": name, "route": schedule.route, "timetable": ticks.describe(),
                "missed": schedule.missed, "on_start": schedule.on_start,
                "next_run": _iso(ticks.following(ticks.latest(now))),
                "requests": [f"{r.method} {r.path}" for r in schedule.all_requests()]}
            try:
                state = await self.store.state(name)
            except StoreUnavailable as exc:
                state = {"redis": "down", "error": str(exc) or type(exc).__name__}
            for key in ("last_tick", "last_done"):
                if state.get(key) is not None:
                    state[key] = _iso(state[key])
            last = state.get("last_run")
            if last:
                for key in ("tick", "started", "finished"):
                    if last.get(key) is not None:
                        last[key] = _iso(last[key])
            listed.append({**entry, **state})
        return listed


def _header(headers: Any, lname: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == lname:
            return bytes(value).decode("latin-1")
    return None


def _iso(seconds: float) -> str:
    """RFC 3339 in UTC, to the millisecond."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{round(seconds * 1000) % 1000:03d}Z"
