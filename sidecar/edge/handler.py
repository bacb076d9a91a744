"""A parsed request -> its route -> the route's policy chain -> the response on the wire.

Reads `runtime.state` once per request, so a reload never changes the rules under a request in
flight. This is where a SidecarError raised anywhere below becomes an HTTP response
(responses.error_response), where metrics and the access log see every request, and where a
response is written: whole in one write when it can be, else streamed with back-pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import NoRouteError, SidecarError, UpstreamError
from ..jobs.api import JobsEndpoint, JobsHost, under
from ..metrics import JOBS_ROUTE, NO_ROUTE
from ..pipeline import ProxyRequest, ProxyResponse
from .body import ClientGone
from .responses import error_response, new_request_id, response_head, status_line
from .upgrade import Tunnel
from .websocket import WebSocket

if TYPE_CHECKING:
    from ..core.redact import Redactor
    from ..http.request import RequestHead
    from ..logs import AccessLog
    from ..metrics import Recorder
    from ..routing import Route
    from ..state import State
    from ..tracing import Tracing
    from ..upstream import Body
    from .protocol import EdgeProtocol, Exchange

log = logging.getLogger("sidecar.proxy")
connection_log = logging.getLogger("sidecar.connection")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=\-]{1,128}$")
# Bodies up to this size are read whole before forwarding: one write, and a replayable request.
_SMALL_BODY = 64 * 1024
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_NO_BODY_STATUS = frozenset({204, 304})


class EdgeHost(JobsHost, Protocol):
    """What the handler needs of the worker it serves (app.Runtime)."""

    @property
    def state(self) -> State:
        """The config in force: read once per request."""
        ...

    @property
    def metrics(self) -> Recorder: ...

    @property
    def access_log(self) -> AccessLog: ...

    @property
    def tracing(self) -> Tracing | None:
        """The worker's tracer when `tracing:` is set; None costs the request nothing."""
        ...


class EdgeHandler:
    """The public listener's one handler (see the module's docstring)."""

    def __init__(self, runtime: EdgeHost) -> None:
        self.runtime = runtime
        self.jobs = JobsEndpoint(runtime)

    @property
    def max_body(self) -> int:
        """server.limits.max_body of the config in force (a reload changes it)."""
        return self.runtime.state.config.server.limits.max_body

    async def serve(self, exchange: Exchange, conn: EdgeProtocol) -> None:
        started = time.perf_counter()
        runtime = self.runtime
        state = runtime.state
        metrics = runtime.metrics
        metrics.inflight += 1
        head = exchange.head
        given = head.headers.get_bytes(b"x-request-id")
        if given is None:
            request_id = new_request_id()
        else:
            request_id = given.decode("latin-1")
            if not _REQUEST_ID.match(request_id):
                request_id = new_request_id()
        route: Route | None = None
        elapsed = 0.0  # set when the response was written whole
        label = NO_ROUTE  # the metrics' route label when no route matched
        status = 499
        sent = 0
        tracing = runtime.tracing
        trace = tracing.start(head) if tracing is not None else None
        answered: ProxyResponse | None = None  # for the span
        failure: str | None = None
        try:
            if exchange.error is not None:
                raise exchange.error
            path = head.path
            if path.startswith(state.jobs_path) and under(path, state.jobs_path):
                label = JOBS_ROUTE
                result = await self.jobs.handle(head, path, request_id)
            else:
                route = state.routes.match(head.method, head.host, path, head.headers)
                if route is None:
                    raise NoRouteError(f"no route matches {head.method} {path}")
                # The connection is the request's sink: it writes the upstream's 1xx responses
                # as they come (EdgeProtocol.interim).
                if exchange.body is None:
                    request = ProxyRequest(head, route, request_id, None, False, route.timeout,
                                           None, conn, trace)
                else:
                    body, chunked = await _request_body(exchange, conn)
                    request = ProxyRequest(head, route, request_id, body, chunked,
                                           route.timeout, None, conn, trace)
                if exchange.upgrade:
                    result = await state.upgrade_chains[route.name](request)
                else:
                    result = await state.chains[route.name](request)
            status = result.status
            if trace is not None:
                answered = result
            if result.body is not None and (
                    head.http11 and head.keep_alive and not conn.closing and not exchange.close
                    and status >= 200 and status != 204 and status != 304
                    and head.method != "HEAD"):
                # The usual case: a whole body for a keep-alive HTTP/1.1 request that has one,
                # no framing question: Content-Length says it all, one write. Its duration, to
                # the write, is the one Server-Timing shows and the histogram records.
                elapsed = time.perf_counter() - started
                sent = self._write_whole(conn, exchange, result, request_id, state,
                                         _server_timing(result, elapsed)
                                         if metrics.server_timing else b"")
            elif result.tunnel is not None:
                self._join(conn, exchange, result, request_id, state)
            elif result.socket is not None:
                await self._accept_socket(conn, exchange, result, request_id, state)
            else:
                timing = (_server_timing(result, time.perf_counter() - started)
                          if metrics.server_timing else None)
                sent = await self._respond(conn, exchange, result, request_id, state, timing)
        except SidecarError as exc:
            status = exc.status
            failure = exc.code
            sent = self._refused(exc, exchange, conn, request_id, route)
        except ConnectionError:  # ClientGone included: nobody to answer
            status = 499
        except Exception:
            log.exception("request failed", extra={"request_id": request_id,
                                                   "route": route.name if route else None})
            status = 500
            if not exchange.started:
                sent = self._write_error(conn, exchange, SidecarError("internal error"),
                                         request_id)
            exchange.close = True
        finally:
            metrics.inflight -= 1
            if metrics.enabled:
                metrics.request(route.name if route is not None else label, head.method,
                                status, elapsed or time.perf_counter() - started)
            access = runtime.access_log
            if access.enabled:
                access.write(_access_fields(head, route, label, status, request_id, started,
                                            sent, state.redactor))
            if trace is not None:
                trace.end(route.name if route is not None else None, status,
                          _span_attributes(answered, failure, request_id, sent))

    # -- errors ----------------------------------------------------------------------------------

    def _refused(self, exc: SidecarError, exchange: Exchange, conn: EdgeProtocol,
                 request_id: str, route: Route | None) -> int:
        """Log and answer a refusal; the body bytes written (for the access log)."""
        if exchange.started:
            # Too late for an error response: cut the connection so the client sees a
            # truncated response, never a clean end of a wrong one.
            conn.abort()
            return 0
        if isinstance(exc, UpstreamError) and exc.code != "breaker_open":
            # (an open breaker is logged once, when it opens, not once per refusal)
            log.warning("upstream request failed", extra={
                "request_id": request_id, "route": route.name if route else None,
                "upstream": exc.upstream, "error": exc.code, "detail": exc.detail,
            })
        elif exchange.error is exc:
            # Refused by the connection before any route saw it. A "request" with a bad
            # method is mostly TLS or a scanner on the HTTP port: kept out of the warnings.
            quiet = exc.code == "malformed_request" and exc.detail == "invalid method"
            connection_log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "malformed request refused; connection closed" if exchange.malformed else
                "request refused; connection closed", extra={
                    "request_id": request_id, "client": exchange.head.client,
                    "status": exc.status, "error": exc.code, "detail": exc.detail})
        elif exc.close_connection:
            log.warning("request refused; connection closed", extra={
                "request_id": request_id, "client": exchange.head.client,
                "route": route.name if route else None, "status": exc.status,
                "error": exc.code, "detail": exc.detail,
            })
        return self._write_error(conn, exchange, exc, request_id)

    @staticmethod
    def _write_error(conn: EdgeProtocol, exchange: Exchange, exc: SidecarError,
                     request_id: str) -> int:
        """The JSON error written; its body's size (0 for HEAD)."""
        head = exchange.head
        close = exc.close_connection or not head.keep_alive or conn.closing
        body = exchange.body
        if body is not None and not body.done and not exchange.started:
            # The body is unread: a client waiting for a 100 Continue that will not come, or a
            # body gone wrong, ends the connection; otherwise the rest is read away after the
            # answer (EdgeProtocol: lingering) and the connection goes on.
            close = close or body.failed or exchange.expect_continue
        if close:
            exchange.close = True
        exchange.started = True
        answer = error_response(exc, request_id, close=close, head_only=head.method == "HEAD")
        with contextlib.suppress(ClientGone):
            conn.write(answer)
        return 0 if head.method == "HEAD" else len(answer) - answer.index(b"\r\n\r\n") - 4

    # -- responses -------------------------------------------------------------------------------

    @staticmethod
    def _write_whole(conn: EdgeProtocol, exchange: Exchange, result: ProxyResponse,
                     request_id: str, state: State, timing: bytes) -> int:
        """The usual case (see `serve`), in one write: a cache entry's headers come
        serialized."""
        body = result.body
        assert body is not None
        wire = result.wire
        if wire is not None:
            data = b"".join((
                status_line(result.status, result.reason), wire, timing, state.via_request_id,
                request_id.encode("latin-1"), b"\r\n\r\n", body))
        else:
            data = response_head(result.status, result.reason, result.headers, request_id,
                                 state.via_response_bytes, length=len(body),
                                 extra=timing) + body
        exchange.started = True
        conn.write(data)
        return len(body)

    async def _respond(self, conn: EdgeProtocol, exchange: Exchange, result: ProxyResponse,
                       request_id: str, state: State, timing: bytes | None) -> int:
        head = exchange.head
        body = result.body
        status = result.status
        extra = timing or b""
        close = not head.keep_alive or conn.closing or exchange.close
        no_body = head.method == "HEAD" or status < 200 or status in _NO_BODY_STATUS
        framing = _CLOSE if close else b"" if head.http11 else _KEEP_ALIVE
        stream = result.stream
        if body is not None or stream is None:
            body = body or b""
            if no_body:
                # HEAD: the length the GET would have (a stored body's, else the upstream's)
                length = len(body) if body and head.method == "HEAD" else None
                data = response_head(status, result.reason, result.headers, request_id,
                                     state.via_response_bytes, length=length,
                                     keep_length=length is None, extra=extra, framing=framing)
            else:
                data = response_head(status, result.reason, result.headers, request_id,
                                     state.via_response_bytes, length=len(body), extra=extra,
                                     framing=framing) + body
            exchange.started = True
            conn.write(data)
            if stream is not None:
                stream.close()
            return 0 if no_body else len(body)
        if no_body:
            stream.close()
            exchange.started = True
            conn.write(response_head(status, result.reason, result.headers, request_id,
                                     state.via_response_bytes, length=None, keep_length=True,
                                     extra=extra, framing=framing))
            return 0
        framed = any(name.lower() == b"content-length" for name, _ in result.headers)
        chunked = not framed and head.http11
        if not framed and not head.http11:
            # An HTTP/1.0 client and no length: the body ends when the connection does.
            exchange.close = True
            framing = _CLOSE
        elif chunked:
            framing += _CHUNKED
        exchange.started = True
        sent = 0
        try:
            conn.write(response_head(status, result.reason, result.headers, request_id,
                                     state.via_response_bytes, length=None, keep_length=framed,
                                     extra=extra, framing=framing))
            while chunk := await stream.read():
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
                if conn.write_paused:
                    await conn.drain()
            if chunked:
                conn.write(b"0\r\n\r\n")
        except UpstreamError as exc:
            log.warning("upstream failed mid-response", extra={
                "request_id": request_id, "upstream": exc.upstream, "error": exc.code,
                "detail": exc.detail, "bytes_sent": sent,
            })
            conn.abort()
        except ConnectionError:
            stream.close()  # the client went away
        except asyncio.CancelledError:
            stream.close()  # a shared body must not wait for a reader that is gone
            raise
        return sent

    @staticmethod
    def _join(conn: EdgeProtocol, exchange: Exchange, result: ProxyResponse, request_id: str,
              state: State) -> None:
        """Write the upstream's 101 and join the two connections."""
        upstream = result.tunnel
        assert upstream is not None
        exchange.started = True
        try:
            conn.write(response_head(101, result.reason, result.headers, request_id,
                                     state.via_response_bytes, length=None, upgrade=True,
                                     framing=b"Connection: upgrade\r\n"))
        except ClientGone:
            upstream.abort()
            raise
        Tunnel(conn, upstream).open()


    @staticmethod
    async def _accept_socket(conn: EdgeProtocol, exchange: Exchange, result: ProxyResponse,
                             request_id: str, state: State) -> None:
        """Write the sidecar's own 101 and serve the WebSocket until it closes."""
        messages = result.socket
        assert messages is not None
        exchange.started = True
        try:
            conn.write(response_head(101, result.reason, result.headers, request_id,
                                     state.via_response_bytes, length=None, upgrade=True,
                                     framing=b"Connection: upgrade\r\n"))
        except ClientGone:
            await messages.aclose()
            raise
        await WebSocket(conn, messages).run()


async def _request_body(exchange: Exchange, conn: EdgeProtocol) -> tuple[Body, bool]:
    """The body to forward: None, whole bytes when small, else the stream as it arrives."""
    body = exchange.body
    if body is None:
        return None, False
    conn.send_continue(exchange)
    head = exchange.head
    length = head.content_length
    if head.chunked:
        return body, True
    if length is not None and length <= _SMALL_BODY:
        return await body.whole(), False
    return body, False


def _server_timing(result: ProxyResponse, elapsed: float) -> bytes:
    """The `Server-Timing` header line (W3C): what the cache did, the upstream's time, the
    sidecar's total. On every response, so with one format string per cache outcome, made
    once."""
    upstream = result.upstream_seconds
    cache = result.cache or b""
    if upstream is None:
        line = _TOTAL_ONLY.get(cache)
        if line is None:
            line = _TOTAL_ONLY[cache] = b"Server-Timing: " + cache.replace(
                b"%", b"%%") + b"total;dur=%.3f\r\n"
        return line % (elapsed * 1000)
    line = _WITH_UPSTREAM.get(cache)
    if line is None:
        line = _WITH_UPSTREAM[cache] = b"Server-Timing: " + cache.replace(
            b"%", b"%%") + b"upstream;dur=%.3f, total;dur=%.3f\r\n"
    return line % (upstream * 1000, elapsed * 1000)


# cache outcome (pipeline.ProxyResponse.cache: a few constants) -> its Server-Timing format
_TOTAL_ONLY: dict[bytes, bytes] = {}
_WITH_UPSTREAM: dict[bytes, bytes] = {}


def _span_attributes(result: ProxyResponse | None, failure: str | None, request_id: str,
                     sent: int) -> dict[str, Any]:
    """What a request's server span says besides its method, route and status."""
    attributes: dict[str, Any] = {"sidecar.request_id": request_id,
                                  "http.response.body.size": sent}
    if failure is not None:
        attributes["error.type"] = failure
        if failure == "breaker_open":
            attributes["sidecar.breaker"] = "open"
    if result is not None:
        if result.cache is not None:  # b"cache;desc=hit, "
            attributes["sidecar.cache"] = result.cache.decode("latin-1").split("=", 1)[-1] \
                .rstrip(", ")
        for name, value in result.headers:
            if name.lower() == b"x-sidecar-dedup":
                attributes["sidecar.dedup"] = value.decode("latin-1")
    return attributes


def _access_fields(head: RequestHead, route: Route | None, label: str, status: int,
                   request_id: str, started: float, sent: int, redactor: Redactor
                   ) -> dict[str, Any]:
    """`route`: the matched route's name, else what answered (`_jobs`, the jobs API), else
    None (no route matched)."""
    return {
        "ts": AccessLogClock.now(),
        "request_id": request_id,
        "client": head.client,
        "method": head.method,
        "path": redactor.target(head.target[:512]),
        "route": route.name if route else (None if label == NO_ROUTE else label),
        "upstream": route.upstream if route else None,
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        "bytes": sent,
    }


class AccessLogClock:
    """A timestamp string per second, not per request: formatting time is not free."""

    _second: ClassVar[int] = 0
    _text: ClassVar[str] = ""

    @classmethod
    def now(cls) -> str:
        now = time.time()
        second = int(now)
        if second != cls._second:
            cls._second = second
            cls._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{cls._text}.{int(now % 1 * 1000):03d}Z"
