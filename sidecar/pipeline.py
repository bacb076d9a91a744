"""The policy chain: what runs between the edge (edge/handler.py) and the upstream, in the
sidecar's order.

A policy is a small object with one async method. It may answer by returning a response (a cache
hit, a 429, a 202) or call `call_next`; it never calls another policy or the upstream itself.
Chains are built once per route when a config loads, never per request.

The canonical order, outermost first (later policies slot into it; a config cannot reorder it):

    rate_limit -> etag -> idempotency -> cache -> dedup -> offload -> breaker -> retry
    -> upstream

Around all of them the edge (edge/handler.py) records metrics and turns errors into HTTP;
the upstream call itself applies the timeout. The cache sits outside dedup: a hit never waits
for a flight; misses and revalidations are coalesced, and only the leader's response is stored.
Without dedup on the route the cache coalesces its misses itself (policies/cache.py).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from .http.forwarding import build_request_head
from .http.headers import RawHeaders

if TYPE_CHECKING:
    from .http.request import RequestHead
    from .routing import Route
    from .tracing import Trace
    from .upstream import Body, UpstreamResponse, UpstreamTunnel

# The one list of the order (app.POLICY_BUILDERS says how each is built for a route).
CANONICAL_ORDER = (
    "rate_limit", "compress", "etag", "idempotency", "cache", "dedup", "compress.encode",
    "offload", "breaker", "retry",
)
# What applies to a request asking to switch protocols (WebSocket...): nothing that stores,
# shares, replays or retries a response applies to a connection that changes protocol.
UPGRADE_POLICIES = frozenset({"rate_limit", "breaker"})


class BodyStream(Protocol):
    """A response body arriving in pieces: the upstream's, or one the sidecar produces (a job's
    event stream). `read()` gives b"" at the end; `close()` gives up on the rest."""

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


# What the sidecar itself says over a WebSocket it accepts (a job's events, jobs/api.py): each
# item a text message, None when there was nothing to say for a while (the edge pings, so that
# proxies keep the idle connection); its end closes the WebSocket normally.
SocketMessages = AsyncGenerator[str | None, None]


class InterimSink(Protocol):
    """Where the interim responses (1xx) to a request go: the connection of the client that
    sent it (edge/protocol.py), which writes them at once if that request is still the one it
    is answering and nothing of the answer has gone out."""

    def interim(self, request: ProxyRequest, status: int, reason: str,
                headers: RawHeaders) -> None: ...


class ProxyRequest:
    """What policies see of a request: built once by the edge, read-only by convention.

    `head` is the client's request (`RequestHead`); `upstream_head` the request line and
    headers as the upstream is to get them, built on first use. `sink` takes the 1xx responses
    the upstream sends ahead of its answer: they go to the client beside the chain, never
    through a policy (nothing stores, shares or replays them)."""

    __slots__ = ("_upstream_head", "body", "chunked", "head", "method", "request_id", "route",
                 "sink", "timeout", "trace")

    def __init__(self, head: RequestHead, route: Route, request_id: str, body: Body,
                 chunked: bool, timeout: float | None,
                 upstream_head: bytes | None = None, sink: InterimSink | None = None,
                 trace: Trace | None = None) -> None:
        self.head = head
        self.method = head.method
        self.route = route
        self.request_id = request_id
        self.body = body
        self.chunked = chunked
        self.timeout = timeout
        self._upstream_head = upstream_head
        self.sink = sink
        self.trace = trace  # the request's spans when it is traced (tracing.py)

    def interim(self, status: int, reason: str, headers: RawHeaders) -> None:
        """An interim response from the upstream (upstream.Interim): to the client, if any."""
        sink = self.sink
        if sink is not None:
            sink.interim(self, status, reason, headers)

    @property
    def upstream_head(self) -> bytes:
        """The request line and headers as sent to the upstream: built on first use, so a
        request answered by a policy (a cache hit) never pays for it."""
        head = self._upstream_head
        if head is None:
            head = self._upstream_head = build_request_head(self.head, self.route,
                                                            self.request_id, self.chunked)
        return head

    def with_upstream_head(self, upstream_head: bytes) -> ProxyRequest:
        """The same request, forwarded with other headers."""
        return ProxyRequest(self.head, self.route, self.request_id, self.body, self.chunked,
                            self.timeout, upstream_head, self.sink, self.trace)

    def with_body(self, body: bytes, upstream_head: bytes) -> ProxyRequest:
        """The same request with its body read whole (and the head framing it so)."""
        return ProxyRequest(self.head, self.route, self.request_id, body, False, self.timeout,
                            upstream_head, self.sink, self.trace)


class BodyTooLarge(Exception):
    """`whole_body`: the request body is over the caller's limit."""


async def whole_body(request: ProxyRequest, limit: int) -> bytes | None:
    """The request's whole body (None when it has none), read into memory when it streams;
    BodyTooLarge past `limit` bytes, before reading when the declared length says so."""
    body = request.body
    if body is None or isinstance(body, bytes):
        if body is not None and len(body) > limit:
            raise BodyTooLarge
        return body
    declared = request.head.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class ProxyResponse:
    """A response on its way back: whole (`body`) or streaming from the upstream (`stream`)."""

    __slots__ = ("body", "cache", "etag", "headers", "reason", "socket", "status", "stream",
                 "tunnel", "upstream_seconds", "wire")

    def __init__(self, status: int, reason: str, headers: RawHeaders, body: bytes | None = None,
                 stream: BodyStream | None = None, *, wire: bytes | None = None,
                 etag: str | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.stream = stream
        # `headers` already serialized (end-to-end fields, Content-Length and Date included),
        # as a cache entry keeps them: the edge then writes them as they are. A policy that
        # changes `headers` must set `wire` to None.
        self.wire = wire
        self.etag = etag  # known ETag, so later policies need not search the headers
        self.upstream_seconds: float | None = None  # set when this request's upstream answered
        self.cache: bytes | None = None  # what the cache did, for Server-Timing
        # A 101 to an upgrade: the upstream connection, handed over for the edge to join to
        # the client's (edge/upgrade.py).
        self.tunnel: UpstreamTunnel | None = None
        # A 101 the sidecar answers itself (a WebSocket of a job's events): what it sends over
        # the connection (edge/websocket.py).
        self.socket: SocketMessages | None = None

    async def read_whole(self, limit: int) -> bytes | None:
        """The whole body when it is at most `limit` bytes (a streamed one is read into
        `body`); else None, and the response still streams from its first byte."""
        if self.body is not None:
            return self.body if len(self.body) <= limit else None
        stream = self.stream
        assert stream is not None
        for name, value in self.headers:
            if name.lower() == b"content-length":
                if not (value.isascii() and value.isdigit()) or int(value) > limit:
                    return None
                break
        chunks: list[bytes] = []
        size = 0
        while chunk := await stream.read():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                self.stream = _Prefixed(chunks, stream)
                return None
        body = self.body = b"".join(chunks)
        self.stream = None
        return body

    @classmethod
    def from_upstream(cls, response: UpstreamResponse) -> ProxyResponse:
        if response.complete:
            result = cls(response.status, response.reason, response.headers, body=response.body)
            if response.tunnel is not None:  # a 101: the connection is the rest of it
                result.tunnel = response.tunnel
            return result
        return cls(response.status, response.reason, response.headers, stream=response)


class _Prefixed:
    """A response body already partly read into memory, then the rest from the upstream."""

    def __init__(self, chunks: list[bytes], rest: BodyStream) -> None:
        self._chunks = deque(chunks)
        self._rest = rest

    async def read(self) -> bytes:
        if self._chunks:
            return self._chunks.popleft()
        return await self._rest.read()

    def close(self) -> None:
        self._rest.close()


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Policy(Protocol):
    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse: ...


def build_chain(policies: Sequence[Policy], terminal: Handler) -> Handler:
    """Wrap `terminal` in `policies`, the first one outermost."""
    handler = terminal
    for policy in reversed(policies):
        handler = _bind(policy, handler)
    return handler


def _bind(policy: Policy, call_next: Handler) -> Handler:
    # A partial, not a wrapping coroutine: one coroutine frame per policy per request, not two.
    return functools.partial(policy.handle, call_next=call_next)
