"""`idempotency`: a retried unsafe request with the same `Idempotency-Key` reaches the upstream
once; the retry gets the first response again (IETF httpapi Idempotency-Key draft).

The first request with a key claims a Redis record under a short lease, renewed while the
upstream call runs, so a leader that dies blocks the key for one lease, not for `ttl`. The
response is stored for `ttl`; a retry with the same request gets it back marked as a replay, a
retry while the first is in flight gets 409, the same key with another request gets 422.
Records are scoped by route and by the caller's credentials (`Authorization`, `Cookie`), so one
client never sees another's response. With Redis down the policy steps aside (fail open).
See docs/idempotency.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
from typing import TYPE_CHECKING, assert_never

from ..crypto import SealError
from ..errors import (
    IdempotencyBodyTooLargeError,
    IdempotencyConflictError,
    IdempotencyKeyInvalidError,
    IdempotencyMismatchError,
    UpstreamError,
)
from ..pipeline import BodyTooLarge, Handler, ProxyRequest, ProxyResponse, whole_body
from ..stores.boundary import StoreUnavailable
from ..stores.dedup import DedupService
from ..stores.idempotency import IdempotencyRecord, IdempotencyStore, RecordState, record_key
from .cache import rewrite_head

if TYPE_CHECKING:
    from ..config import IdempotencyConfig

_RETRYABLE = frozenset({502, 503, 504})
log = logging.getLogger("sidecar.idempotency")

REPLAYED = ((b"X-Sidecar-Dedup", b"replay"), (b"Idempotent-Replayed", b"true"))
MAX_KEY_LENGTH = 255
# Without a route timeout the lease is this long; a live leader renews it every third.
DEFAULT_LEASE = 60.0
MIN_LEASE = 1.0
_CREDENTIALS = frozenset({b"authorization", b"cookie"})
_REFRAMED = frozenset({b"transfer-encoding", b"content-length"})


class IdempotencyPolicy:
    def __init__(self, route: str, config: IdempotencyConfig, service: DedupService) -> None:
        self.route = route
        self.config = config
        self.service = service
        self.methods = frozenset(config.methods)
        self.counts = service.counts
        self._store: IdempotencyStore | None = None
        self._bypassing = False  # warn once per Redis outage, not once per request

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if request.method not in self.methods:
            return await call_next(request)
        values = request.head.headers.getall(self.config.header)
        if not values:
            return await call_next(request)
        idempotency_key = self._valid_key(values)
        request, body = await self._whole_body(request)
        fingerprint = _fingerprint(request, body)
        store = self._current_store()
        if store is None:
            return await self._bypass(request, call_next, None)
        key = record_key(self.route, _credentials(request), idempotency_key)
        claim = IdempotencyRecord(RecordState.IN_FLIGHT, fingerprint, token=os.urandom(12).hex())
        lease = max(MIN_LEASE, request.timeout or DEFAULT_LEASE)
        try:
            existing = await store.claim(key, claim, lease)
        except StoreUnavailable as exc:
            return await self._bypass(request, call_next, exc)
        except SealError as exc:  # a record sealed with a key no longer listed, or altered
            log.warning("an idempotency record did not open; the request goes through "
                        "without replay", extra={"route": self.route, "error": str(exc)})
            return await call_next(request)
        self._bypassing = False
        if existing is None:
            self.counts[(self.route, "idempotency_leader")] += 1
            return await self._lead(request, call_next, store, key, claim, lease)
        return self._answer(existing, fingerprint)

    # -- the request ----------------------------------------------------------------------------

    def _valid_key(self, values: list[str]) -> str:
        header = self.config.header
        if len(values) > 1:
            raise IdempotencyKeyInvalidError(f"send one {header} header, not {len(values)}")
        value = values[0].strip()
        if not value:
            raise IdempotencyKeyInvalidError(f"the {header} header is empty")
        if len(value) > MAX_KEY_LENGTH:
            raise IdempotencyKeyInvalidError(
                f"the {header} header is longer than {MAX_KEY_LENGTH} characters")
        return value

    async def _whole_body(self, request: ProxyRequest) -> tuple[ProxyRequest, bytes]:
        """The body, read whole to fingerprint it, and a request that forwards those bytes."""
        streamed = request.body is not None and not isinstance(request.body, bytes)
        try:
            data = await whole_body(request, self.config.max_body)
        except BodyTooLarge:
            raise self._too_large() from None
        if data is None or not streamed:
            return request, data or b""
        # The upstream gets these bytes in one write: framed by Content-Length, never chunked.
        head = rewrite_head(request.upstream_head, _REFRAMED,
                            [b"Content-Length: %d" % len(data)])
        return request.with_body(data, head), data

    def _too_large(self) -> IdempotencyBodyTooLargeError:
        return IdempotencyBodyTooLargeError(
            f"requests with {self.config.header} are read whole and may carry at most "
            f"{self.config.max_body} bytes of body")

    # -- answering from a record ----------------------------------------------------------------

    def _answer(self, record: IdempotencyRecord, fingerprint: str) -> ProxyResponse:
        header = self.config.header
        if record.fingerprint != fingerprint:
            self.counts[(self.route, "mismatch")] += 1
            raise IdempotencyMismatchError(
                f"this {header} was first used for another request (method, target or body "
                "differ); use a new key for a new request")
        match record.state:
            case RecordState.IN_FLIGHT:
                self.counts[(self.route, "conflict")] += 1
                raise IdempotencyConflictError(
                    f"the first request with this {header} is still in progress; retry later")
            case RecordState.DONE:
                if record.body is None:
                    self.counts[(self.route, "conflict")] += 1
                    raise IdempotencyConflictError(
                        f"the first request with this {header} was answered, but its response "
                        "was too large to store, so it cannot be replayed")
                self.counts[(self.route, "replay")] += 1
                return ProxyResponse(record.status, record.reason,
                                     [*record.headers, *REPLAYED], body=record.body)
            case _:
                assert_never(record.state)

    # -- the first request ----------------------------------------------------------------------

    async def _lead(self, request: ProxyRequest, call_next: Handler, store: IdempotencyStore,
                    key: str, claim: IdempotencyRecord, lease: float) -> ProxyResponse:
        renewer = self.service.spawn(self._renew(store, key, claim, lease))
        try:
            response = await call_next(request)
            body = await response.read_whole(self.config.max_response)
        except UpstreamError:
            # No response was had: free the key so that the client's retry can go through.
            renewer.cancel()
            try:
                await store.release(key, claim)
            except StoreUnavailable as exc:
                self.service.redis_failed(exc)  # the lease runs out on its own
            raise
        finally:
            renewer.cancel()
        if response.status in _RETRYABLE:
            # The upstream (or a gateway before it) says it did not do the work: a retry with
            # the same key must reach it again, not get this answer replayed for a day.
            try:
                await store.release(key, claim)
            except StoreUnavailable as exc:
                self.service.redis_failed(exc)
            return response
        done = IdempotencyRecord(RecordState.DONE, claim.fingerprint, status=response.status,
                                 reason=response.reason, headers=tuple(response.headers),
                                 body=body)
        try:
            await store.complete(key, claim, done, self.config.ttl)
        except StoreUnavailable as exc:
            self.service.redis_failed(exc)
        return response

    async def _renew(self, store: IdempotencyStore, key: str, claim: IdempotencyRecord,
                     lease: float) -> None:
        while True:
            await asyncio.sleep(lease / 3)
            try:
                if not await store.renew(key, claim, lease):
                    return  # the lease ran out and the key moved on: nothing left to hold
            except StoreUnavailable as exc:
                self.service.redis_failed(exc)

    # -- without Redis --------------------------------------------------------------------------

    def _current_store(self) -> IdempotencyStore | None:
        """The store over the service's client (attached after the policies are built)."""
        client = self.service.redis
        if client is None or not self.service.redis_up:
            return None
        store = self._store
        if store is None or store.client is not client:
            store = self._store = IdempotencyStore(client, self.service.sealer)
        return store

    async def _bypass(self, request: ProxyRequest, call_next: Handler,
                      exc: BaseException | None) -> ProxyResponse:
        if exc is not None:
            self.service.redis_failed(exc)
        if not self._bypassing:
            self._bypassing = True
            log.warning("redis unavailable; Idempotency-Key is not enforced on this route "
                        "until it is back", extra={
                            "route": self.route,
                            "error": (str(exc) or type(exc).__name__) if exc else "redis down"})
        self.counts[(self.route, "idempotency_bypass")] += 1
        return await call_next(request)


def _fingerprint(request: ProxyRequest, body: bytes) -> str:
    """What makes a retry "the same request": method, raw target (path and query), body."""
    digest = hashlib.sha256(request.method.encode("latin-1"))
    digest.update(b" " + request.head.target.encode("utf-8", "surrogateescape") + b"\n")
    digest.update(body)
    return digest.hexdigest()


def _credentials(request: ProxyRequest) -> bytes:
    """Every Authorization and Cookie line as sent, length-framed so that no two differ only
    in where one value ends; b"" for an anonymous client."""
    parts = []
    for name, value in request.head.headers.raw:
        lname = name.lower()
        if lname in _CREDENTIALS:
            parts.append(struct.pack("!BI", len(lname), len(value)) + lname + value)
    return b"".join(parts)
