"""The aiohttp edge: web request -> ProxyRequest -> route's chain -> web response.

Owns the HTTP rules of a proxy: hop-by-hop headers, X-Forwarded-*, Via, X-Request-ID, streaming
both ways, and the one place where SidecarError becomes an HTTP response.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import hdrs, web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from .errors import NoRouteError, RequestBodyTooLargeError, SidecarError, UpstreamError
from .forwarding import HOP_BY_HOP, connection_tokens
from .jobsapi import JobsEndpoint, under
from .metrics import JOBS_ROUTE, NO_ROUTE
from .pipeline import ProxyRequest, ProxyResponse
from .upstream import Body, RawHeaders

if TYPE_CHECKING:
    from .app import Runtime, State
    from .routing import Route

log = logging.getLogger("sidecar.proxy")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=\-]{1,128}$")
# Request ids need to be unique, not secret: a random per-process prefix and a counter cost far
# less than 16 fresh random bytes per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    return _ID_PREFIX + format(next(_ID_COUNTER), "016x")


# Bodies up to this size are read whole before forwarding: one write, and a replayable request.
_SMALL_BODY = 64 * 1024


def response_headers(raw: RawHeaders, request_id: str, via: str) -> CIMultiDict[str]:
    items = []
    connection: bytes | None = None
    via_seen: str | None = None
    for name, value in raw:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection = value if connection is None else connection + b"," + value
            continue
        if lname == b"via":
            via_seen = value.decode("latin-1") if via_seen is None else (
                via_seen + ", " + value.decode("latin-1"))
            continue
        if lname == b"x-request-id":
            continue
        items.append((name.decode("latin-1"), value.decode("latin-1")))
    if connection:
        named = {t.decode("latin-1") for t in connection_tokens(connection.decode("latin-1"))}
        items = [(k, v) for k, v in items if k.lower() not in named]
    items.append(("Via", via if via_seen is None else via_seen + ", " + via))
    items.append(("X-Request-ID", request_id))
    return CIMultiDict(items)


_STATUS_LINES: dict[tuple[int, str], bytes] = {}


def status_line(status: int, reason: str) -> bytes:
    """`HTTP/1.1 200 OK\r\n`, formatted once per status and reason."""
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1"))
        if len(_STATUS_LINES) < 256:  # reasons come from upstreams: bound what is kept
            _STATUS_LINES[(status, reason)] = line
    return line


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_date_second = 0
_date_value = b""


def http_date_now() -> bytes:
    """The Date value, formatted once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    return _date_value


def serialize_whole(status: int, reason: str, raw: RawHeaders, body: bytes, request_id: str,
                    via: bytes, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response as bytes, straight from the upstream's raw headers: no header
    dict, no decoding and re-encoding, one write."""
    out = [status_line(status, reason)]
    append = out.append
    connection: bytes | None = None
    via_seen: bytes | None = None
    has_date = False
    for name, value in raw:
        lname = name.lower()
        if lname in _WHOLE_SPECIAL:
            if lname == b"connection":
                if value not in _PLAIN_CONNECTION:
                    connection = value if connection is None else connection + b"," + value
            elif lname == b"via":
                via_seen = value if via_seen is None else via_seen + b", " + value
            elif lname == b"date":
                has_date = True
                append(b"%s: %s\r\n" % (name, value))
            continue
        append(b"%s: %s\r\n" % (name, value))
    if connection:
        named = connection_tokens(connection.decode("latin-1"))
        out = [out[0]] + [line for line in out[1:]
                          if line.split(b":", 1)[0].lower() not in named]
        append = out.append
    if not has_date:
        append(b"Date: " + http_date_now() + b"\r\n")
    append(b"Content-Length: %d\r\n" % len(body))
    if extra:
        append(extra)
    append(b"Via: " + (via_seen + b", " + via if via_seen else via) + b"\r\n")
    append(b"X-Request-ID: " + request_id.encode("latin-1") + b"\r\n\r\n")
    append(body)
    return b"".join(out)


_WHOLE_SPECIAL = HOP_BY_HOP | {b"via", b"date", b"content-length", b"x-request-id"}


class WholeResponse:
    """A complete response written to the transport in one call.

    aiohttp's request handler needs only `prepare()`, `write_eof()` and `keep_alive` from what a
    handler returns; building a web.Response (header dict, serialization, Server and
    Content-Type defaults to undo) costs more than the rest of a cache hit or a small proxied
    response. Used only where no framing question arises: HTTP/1.1 keep-alive requests, not
    HEAD, responses that have a body.
    """

    __slots__ = ("_data", "keep_alive", "status")

    def __init__(self, data: bytes, status: int) -> None:
        self._data = data
        self.status = status
        self.keep_alive = True

    async def prepare(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        transport.write(self._data)

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class _Transparent:
    """aiohttp adds Server and a default Content-Type to every response; a proxy must not.

    This hooks aiohttp's private `_prepare_headers` (pinned range in pyproject.toml; the header
    tests fail if a new aiohttp changes it).
    """

    async def _prepare_headers(self) -> None:
        headers: CIMultiDict[str] = self._headers  # type: ignore[attr-defined]
        had_type = hdrs.CONTENT_TYPE in headers
        had_server = hdrs.SERVER in headers
        await super()._prepare_headers()  # type: ignore[misc]
        if not had_type:
            headers.popall(hdrs.CONTENT_TYPE, None)
        if not had_server:
            headers.popall(hdrs.SERVER, None)


class PassResponse(_Transparent, web.Response):
    pass


class PassStreamResponse(_Transparent, web.StreamResponse):
    pass


def error_body(exc: SidecarError, request_id: str) -> bytes:
    return orjson.dumps({"error": exc.code, "detail": exc.detail, "request_id": request_id})


def error_response(exc: SidecarError, request_id: str) -> web.Response:
    response = web.Response(status=exc.status, body=error_body(exc, request_id),
                            content_type="application/json")
    response.headers.update(exc.headers)
    response.headers["X-Request-ID"] = request_id
    response.headers["Cache-Control"] = "no-store"
    if exc.close_connection:
        response.force_close()
    return response


class ProxyHandler:
    """The public listener's one handler. Reads `runtime.state` once per request, so a reload
    never changes the rules under a request in flight."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.jobs = JobsEndpoint(runtime)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        state = self.runtime.state
        metrics = self.runtime.metrics
        metrics.inflight += 1
        headers = request.headers
        request_id = headers.get("X-Request-ID")
        if request_id is None or not _REQUEST_ID.match(request_id):
            request_id = new_request_id()
        route: Route | None = None
        label = NO_ROUTE  # the metrics' route label when no route matched
        response: web.StreamResponse | None = None
        sent = 0
        try:
            method = request.method
            path = _request_path(request)
            if path.startswith(state.jobs_path) and under(path, state.jobs_path):
                label = JOBS_ROUTE
                response = await self.jobs.handle(request, path, request_id)
                return response
            route = state.routes.match(method, request.host, path, headers)
            if route is None:
                raise NoRouteError(f"no route matches {method} {request.path}")
            if hdrs.UPGRADE in headers and headers[hdrs.UPGRADE].lower() == "websocket":
                from .websocket import proxy_websocket

                response = await proxy_websocket(self.runtime, state, route, request,
                                                 request_id)
                return response
            if request.body_exists:
                body, chunked = await _request_body(request, state.config.server.limits.max_body)
            else:
                body, chunked = None, False
            proxy_request = ProxyRequest(request, route, request_id, body, chunked,
                                         route.config.timeout, state)
            result = await state.chains[route.name](proxy_request)
            timing = _server_timing(result, started) if metrics.server_timing else None
            response, sent = await self._respond(request, result, request_id, state, timing)
            return response
        except SidecarError as exc:
            response = error_response(exc, request_id)
            if isinstance(exc, UpstreamError) and exc.code != "breaker_open":
                # (an open breaker is logged once, when it opens, not once per refusal)
                log.warning("upstream request failed", extra={
                    "request_id": request_id, "route": route.name if route else None,
                    "upstream": exc.upstream, "error": exc.code, "detail": exc.detail,
                })
            elif exc.close_connection:
                log.warning("request refused; connection closed", extra={
                    "request_id": request_id, "client": request.remote,
                    "route": route.name if route else None, "status": exc.status,
                    "error": exc.code, "detail": exc.detail,
                })
            return response
        finally:
            metrics.inflight -= 1
            if metrics.enabled:
                metrics.request(
                    route.name if route is not None else label, request.method,
                    response.status if response is not None else 499,
                    time.perf_counter() - started)
            access = self.runtime.access_log
            if access.enabled:
                access.write(self._access_fields(request, route, response, request_id, started,
                                                 sent))

    async def _respond(self, request: web.BaseRequest, result: ProxyResponse, request_id: str,
                       state: State, timing: bytes | None) -> tuple[web.StreamResponse, int]:
        body = result.body
        if (body is not None and request.version[1] == 1 and request.keep_alive
                and result.status >= 200 and result.status not in (204, 304)
                and request.method != "HEAD"):
            wire = result.wire
            extra = timing or b""
            if wire is not None:
                data = b"".join((
                    status_line(result.status, result.reason),
                    wire, extra, b"Via: ", state.via_response_bytes, b"\r\nX-Request-ID: ",
                    request_id.encode("latin-1"), b"\r\n\r\n", body))
            else:
                data = serialize_whole(result.status, result.reason, result.headers, body,
                                       request_id, state.via_response_bytes, extra)
            return WholeResponse(data, result.status), len(body)  # type: ignore[return-value]
        headers = response_headers(result.headers, request_id, state.via_response)
        if timing is not None:
            headers.add("Server-Timing", timing[15:-2].decode("latin-1"))
        if result.body is not None:
            return PassResponse(status=result.status, reason=result.reason, headers=headers,
                                body=result.body), len(result.body)
        stream = result.stream
        assert stream is not None
        response = PassStreamResponse(status=result.status, reason=result.reason,
                                      headers=headers)
        sent = 0
        try:
            await response.prepare(request)
            while chunk := await stream.read():
                await response.write(chunk)
                sent += len(chunk)
        except UpstreamError as exc:
            # Headers are gone already: cut the connection so the client sees a truncated body,
            # never a clean end of a wrong one.
            log.warning("upstream failed mid-response", extra={
                "request_id": request_id, "upstream": exc.upstream, "error": exc.code,
                "detail": exc.detail, "bytes_sent": sent,
            })
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            stream.close()  # the client went away
        except asyncio.CancelledError:
            stream.close()  # a shared body must not wait for a reader that is gone
            raise
        return response, sent

    @staticmethod
    def _access_fields(request: web.BaseRequest, route: Route | None,
                       response: web.StreamResponse | None, request_id: str, started: float,
                       sent: int) -> dict[str, Any]:
        return {
            "ts": AccessLogClock.now(),
            "request_id": request_id,
            "client": request.remote,
            "method": request.method,
            "path": request.raw_path[:512],
            "route": route.name if route else None,
            "upstream": route.upstream if route else None,
            "status": response.status if response is not None else 499,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "bytes": sent,
        }


def _server_timing(result: ProxyResponse, started: float) -> bytes:
    """The `Server-Timing` header line (W3C): what the cache did, the upstream's time, the
    sidecar's total."""
    line = b"total;dur=%.3f\r\n" % ((time.perf_counter() - started) * 1000)
    upstream = result.upstream_seconds
    if upstream is not None:
        line = b"upstream;dur=%.3f, %s" % (upstream * 1000, line)
    cache = result.cache
    return b"Server-Timing: " + line if cache is None else b"Server-Timing: " + cache + line


class AccessLogClock:
    """A timestamp string per second, not per request: formatting time is not free."""

    _second = 0
    _text = ""

    @classmethod
    def now(cls) -> str:
        now = time.time()
        second = int(now)
        if second != cls._second:
            cls._second = second
            cls._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{cls._text}.{int(now % 1 * 1000):03d}Z"


def _request_path(request: web.BaseRequest) -> str:
    """request.path without its cost (a URL parse per request) when the raw target has nothing
    to decode: origin-form, no percent-escapes, no fragment."""
    raw = request.raw_path
    if raw[:1] == "/" and "%" not in raw and "#" not in raw:
        return raw.partition("?")[0]
    return request.path


async def _request_body(request: web.BaseRequest, max_body: int) -> tuple[Body, bool]:
    """The body to forward (there is one): whole bytes when small, else a stream of chunks.

    Its framing was settled, and checked, by connection.EdgeProtocol, which also cuts a body
    that stalls (server.limits.body_timeout); its size is checked here (max_body).
    """
    length = request.content_length
    if length is not None and length > max_body:
        raise RequestBodyTooLargeError(_too_large(max_body))
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if length is not None and length <= _SMALL_BODY:
        return await request.read(), False
    if length is None:
        return _capped(request.content, max_body), True
    return request.content.iter_any(), False


async def _capped(content: StreamReader, limit: int) -> AsyncIterator[bytes]:
    """A chunked body, cut past `limit` bytes: raising here aborts the upstream request that
    is streaming it (upstream.py), and the client gets a 413 unless its response has begun."""
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            raise RequestBodyTooLargeError(_too_large(limit))
        yield chunk


def _too_large(limit: int) -> str:
    return f"request body over {limit} bytes (server.limits.max_body)"
