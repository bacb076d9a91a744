"""`dedup`: identical requests in flight at the same time reach the upstream once.

The first request for a key starts a flight: a task, not tied to any client, that calls the rest
of the chain. Every identical request arriving while it runs, the first one included, waits for
the flight and gets its own copy of the response: a whole body is shared by reference, a
streamed one is fanned out by a Broadcast (sidecar/broadcast.py). With `scope: cluster` the
flight first competes for a Redis lock: the winner's instance calls the upstream and publishes
the result; the others wait for the publication (see sidecar/stores/dedup.py).

Privacy: a response carrying `Set-Cookie` is never handed to another request, and a `private`
one only when the key includes both `Authorization` and `Cookie` (the default), so it goes
only to callers with the same credentials. A follower whose `Vary`'d headers differ from the
leader's calls the upstream itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..broadcast import Broadcast
from ..core.cachekey import (
    TRUSTED_FORWARDING,
    normalize_target,
    primary_key,
    vary_names,
    vary_values,
)
from ..core.freshness import parse_cache_control
from ..pipeline import Handler, ProxyRequest, ProxyResponse
from ..stores.dedup import Coordination, DedupService, SharedResult
from .cache import get_header

if TYPE_CHECKING:
    from ..config import DedupConfig

log = logging.getLogger("sidecar.dedup")

FOLLOWER = (b"X-Sidecar-Dedup", b"follower")
_FOLLOWER_WIRE = b"X-Sidecar-Dedup: follower\r\n"
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since", b"if-match",
                           b"if-unmodified-since", b"if-range"})
_CREDENTIALS = frozenset({"authorization", "cookie"})


@dataclass(slots=True)
class Shared:
    """The flight's outcome as every waiting request receives it."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | None  # whole, or None with `broadcast`
    broadcast: Broadcast | None
    wire: bytes | None
    etag: str | None
    set_cookie: bool
    private: bool
    vary: tuple[str, ...]
    vary_values: tuple[str | None, ...]
    vary_star: bool
    remote: bool = False  # answered by another instance's flight


class FlightAbandoned(Exception):
    """The flight was cancelled (shutdown): its waiters ask the upstream themselves."""


class Flight:
    __slots__ = ("future", "joinable", "key", "pending", "task")

    def __init__(self, key: str) -> None:
        self.key = key
        self.pending = 0  # receivers that joined and have not yet taken their copy
        self.future: asyncio.Future[Shared] = asyncio.get_running_loop().create_future()
        self.joinable = True
        self.task: asyncio.Task[None] | None = None


class DedupPolicy:
    def __init__(self, route: str, config: DedupConfig, service: DedupService) -> None:
        self.route = route
        self.config = config
        self.service = service
        self.methods = frozenset(config.methods)
        self.key_headers = tuple(config.key.headers)
        keyed = {h.lower() for h in config.key.headers}
        # server.trust_forwarded: two public hosts behind the balancer are two answers.
        self.trusted_key_headers = (
            *self.key_headers, *(h for h in TRUSTED_FORWARDING if h.lower() not in keyed))
        self.credentials_keyed = keyed >= _CREDENTIALS
        # Credentials left out of the key: requests carrying them are not coalesced at all,
        # or one caller would get a response meant for another.
        self.unkeyed_credentials = tuple(sorted(_CREDENTIALS - keyed))
        self.counts = service.counts

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        headers = request.head.headers
        if (request.method not in self.methods or request.body is not None
                or "Range" in headers
                or any(name in headers for name in self.unkeyed_credentials)):
            return await call_next(request)
        key = self._key(request)
        flights = self.service.flights
        flight = flights.get(key)
        if flight is not None and flight.joinable:
            self.counts[(self.route, "follower")] += 1
            return await self._receive(flight, request, call_next, follower=True)
        flight = flights[key] = Flight(key)
        self.counts[(self.route, "leader")] += 1
        flight.task = self.service.spawn(self._fly(flight, request, call_next))
        return await self._receive(flight, request, call_next, follower=False)

    def _key(self, request: ProxyRequest) -> str:
        head = request.head
        target = normalize_target(head.target, self.config.key.query)
        trusted = request.route.trust_forwarded
        raw = primary_key(head.host, target, head.headers,
                          self.trusted_key_headers if trusted else self.key_headers, ())
        digest = hashlib.sha256(f"{self.route}\n{request.method}\n{raw}\n".encode(
            "utf-8", "surrogateescape"))
        # Conditionals as they go upstream (the client's, or the cache's validators when it
        # revalidates): a 304 goes only to requests that asked the same question.
        for line in request.upstream_head.split(b"\r\n")[1:]:
            if line[:3].lower() == b"if-" and line.split(b":", 1)[0].lower() in _CONDITIONALS:
                digest.update(line.lower() + b"\n")
        return digest.hexdigest()

    # -- the flight -----------------------------------------------------------------------------

    async def _fly(self, flight: Flight, request: ProxyRequest, call_next: Handler) -> None:
        service = self.service
        try:
            if self.config.scope == "cluster" and service.cluster_ready:
                shared = await self._fly_cluster(flight, request, call_next)
            else:
                shared = self._share(flight, await call_next(request), request)
            flight.future.set_result(shared)
            if shared.broadcast is not None:
                # Readers register as the waiters wake; if none does, free the upstream.
                asyncio.get_running_loop().call_later(5.0, shared.broadcast.abandon_if_unread)
        except Exception as exc:
            flight.future.set_exception(exc)
        except BaseException:
            flight.future.set_exception(FlightAbandoned())
            raise
        finally:
            future = flight.future
            if future.exception() is not None or future.result().broadcast is None:
                self._land(flight)

    def _land(self, flight: Flight) -> None:
        flight.joinable = False
        if self.service.flights.get(flight.key) is flight:
            del self.service.flights[flight.key]

    def _share(self, flight: Flight, response: ProxyResponse, request: ProxyRequest,
               collect_up_to: int = 0) -> Shared:
        raw = response.headers
        cache_control = parse_cache_control(get_header(raw, b"cache-control"))
        vary = get_header(raw, b"vary")
        names = vary_names(vary)
        broadcast = None
        if response.body is None:
            assert response.stream is not None
            broadcast = Broadcast(response.stream, collect_up_to=collect_up_to)
            broadcast.on_closed = lambda: self._land(flight)
            broadcast.may_trim = lambda: flight.pending == 0
        return Shared(
            status=response.status, reason=response.reason, headers=tuple(raw),
            body=response.body, broadcast=broadcast, wire=response.wire, etag=response.etag,
            set_cookie=get_header(raw, b"set-cookie") is not None,
            private="private" in cache_control, vary=names,
            vary_values=vary_values(names, request.head.headers),
            vary_star=vary is not None and "*" in vary)

    async def _fly_cluster(self, flight: Flight, request: ProxyRequest,
                           call_next: Handler) -> Shared:
        """Lead across instances, or take the result of the instance that does."""
        token = os.urandom(12).hex()
        outcome = await self.service.coordinate(flight.key, token, wait=self.config.wait,
                                                lease=self.config.lease, note=self._note,
                                                on_wait=lambda: self._note("cluster_wait"))
        if outcome is Coordination.LEAD:
            return await self._lead_cluster(flight, request, call_next, token)
        if isinstance(outcome, SharedResult):
            self.counts[(self.route, "cluster_follower")] += 1
            return self._from_result(outcome, request)
        return self._share(flight, await call_next(request), request)

    def _note(self, event: str) -> None:
        self.counts[(self.route, event)] += 1

    async def _lead_cluster(self, flight: Flight, request: ProxyRequest, call_next: Handler,
                            token: str) -> Shared:
        service = self.service
        key = flight.key
        renewing = service.spawn(service.keep(key, token, self.config.lease, self._note))
        try:
            response = await call_next(request)
        except BaseException:
            renewing.cancel()
            # Wake the other instances' followers at once: one of them takes over.
            service.spawn(service.give_up(key, token))
            raise
        shared = self._share(flight, response, request, collect_up_to=self.config.max_body)
        declared = get_header(shared.headers, b"content-length")
        if (not self._shareable(shared) or shared.broadcast is None or (
                declared is not None and declared.isdigit()
                and int(declared) > self.config.max_body)):
            # Answer the other instances now: with the result, or with "ask for yourselves".
            renewing.cancel()
            result = None
            if (self._shareable(shared) and shared.body is not None
                    and len(shared.body) <= self.config.max_body):
                result = self._result(shared)
            # Before anyone is answered: a request that comes after the answer must find the
            # flight over (the lock gone), not join it. But a Redis that hangs must not hold
            # the answer (the bulk client waits long for big bodies): past the small commands'
            # timeout the publication goes on in the background, and a request coming
            # meanwhile may still be given this answer.
            publishing = service.spawn(service.finish(key, token, result))
            await asyncio.wait((publishing,), timeout=service.command_timeout)
        else:
            broadcast = shared.broadcast

            async def publish_when_read() -> None:
                try:
                    await broadcast.finished()
                finally:
                    renewing.cancel()
                collected = broadcast.collected
                result = None
                if broadcast.done and collected is not None:
                    result = self._result(shared, b"".join(collected))
                await service.finish(key, token, result)

            service.spawn(publish_when_read())
        return shared

    def _result(self, shared: Shared, body: bytes | None = None) -> SharedResult:
        body = shared.body if body is None else body
        assert body is not None
        return SharedResult(shared.status, shared.reason, shared.headers, body,
                            shared.vary_values)

    def _from_result(self, result: SharedResult, request: ProxyRequest) -> Shared:
        raw = list(result.headers)
        cache_control = parse_cache_control(get_header(raw, b"cache-control"))
        vary = get_header(raw, b"vary")
        names = vary_names(vary)
        etag = get_header(raw, b"etag")
        return Shared(
            status=result.status, reason=result.reason, headers=result.headers,
            body=result.body, broadcast=None, wire=None, etag=etag,
            set_cookie=get_header(raw, b"set-cookie") is not None,
            private="private" in cache_control, vary=names,
            vary_values=result.vary_values,
            vary_star=vary is not None and "*" in vary, remote=True)

    # -- receiving ------------------------------------------------------------------------------

    async def _receive(self, flight: Flight, request: ProxyRequest, call_next: Handler, *,
                       follower: bool) -> ProxyResponse:
        flight.pending += 1
        shared: Shared | None = None
        try:
            try:
                async with asyncio.timeout(self.config.wait if follower else None):
                    shared = await asyncio.shield(flight.future)
            except TimeoutError:
                self.counts[(self.route, "wait_expired")] += 1
            except FlightAbandoned:
                pass
            response = self._copy(shared, request, follower) if shared is not None else None
        finally:
            flight.pending -= 1
            if shared is not None and shared.broadcast is not None:
                shared.broadcast.retrim()
        return response if response is not None else await call_next(request)

    def _copy(self, shared: Shared, request: ProxyRequest, follower: bool
              ) -> ProxyResponse | None:
        """This request's own copy of the flight's response; None when it must ask for
        itself (privacy, Vary, or a streamed body that has moved on)."""
        follower = follower or shared.remote
        if follower and not self._may_share(shared, request):
            self.counts[(self.route, "not_shared")] += 1
            return None
        headers = list(shared.headers)
        wire = shared.wire
        if follower:
            headers.append(FOLLOWER)
            wire = wire + _FOLLOWER_WIRE if wire is not None else None
        broadcast = shared.broadcast
        if broadcast is None:
            return ProxyResponse(shared.status, shared.reason, headers, body=shared.body,
                                 wire=wire, etag=shared.etag)
        if not broadcast.joinable:
            self.counts[(self.route, "late")] += 1
            return None
        return ProxyResponse(shared.status, shared.reason, headers,
                             stream=broadcast.reader(),
                             etag=shared.etag)

    def _shareable(self, shared: Shared) -> bool:
        """May this response go to any other request with the same key (Vary aside)?"""
        if shared.set_cookie or shared.vary_star:
            return False
        return not shared.private or self.credentials_keyed

    def _may_share(self, shared: Shared, request: ProxyRequest) -> bool:
        if not self._shareable(shared):
            return False
        return not shared.vary or vary_values(shared.vary, request.head.headers) == (
            shared.vary_values)
