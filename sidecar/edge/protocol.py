"""The client connection: one asyncio.Protocol per connection, parsing with httptools (llhttp).

What it owns, and nothing more:

- Parsing and the refusals a reverse proxy makes before a request reaches a route: sizes over
  `server.limits` (414 for the request line, 431 for header fields), framing two parsers could
  read differently (llhttp refuses most; Transfer-Encoding other than `chunked` is 501, in
  HTTP/1.0 400), CONNECT (405), HTTP versions other than 1.x (505). Each becomes the sidecar's
  JSON error, in the request's turn, and the connection closes after it.
- Keep-alive and pipelining: requests are answered one at a time, in order; heads parsed
  meanwhile wait in a queue (reading pauses when it grows).
- Flow control both ways: a request body past its high-water mark pauses reading
  (edge/body.py); a response waits for the client when the transport's write buffer is full.
- Timers, checked by one sweep per server rather than a timer per request (a timer armed and
  cancelled per request costs more than a cache hit's key lookup): `header_timeout` from a
  head's first byte (408, or a silent close if nothing came), `body_timeout` while a body
  arrives (the reader gets RequestTimeoutError: 408), `keepalive_timeout` while idle.
- Upgrades: after a 101 the connection becomes a tunnel (edge/upgrade.py).
- Interim responses: it is the sink of its requests' 1xx (`interim`), written the moment the
  upstream sends them, beside the policy chain, which only ever returns the final response.
- Graceful shutdown (EdgeServer.stop): idle connections close at once, busy ones after their
  response, all of them by `server.shutdown_grace`.

Requests are served by the handler (edge/handler.py) in one task per connection, which sleeps
between requests: a task per request would cost a task object and its start for every request,
and a cache hit runs to its answer without awaiting anything that is not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from ..errors import (
    HttpVersionNotSupportedError,
    MalformedRequestError,
    RequestBodyTooLargeError,
    RequestHeadersTooLargeError,
    RequestLineTooLongError,
    RequestTimeoutError,
    SidecarError,
    TransferCodingNotImplementedError,
    TunnelNotAllowedError,
)
from ..http.headers import Headers, RawHeaders
from ..http.request import RequestHead
from .body import ClientGone, RequestBody
from .responses import error_response, interim_head, new_request_id
from .tls import TlsAcceptor, listening_socket

if TYPE_CHECKING:
    from ..config import LimitsConfig
    from ..pipeline import ProxyRequest
    from .upgrade import ClientPeer

log = logging.getLogger("sidecar.connection")

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                     "OPTIONS")}
# Pipelined heads waiting behind the request being served: past this many, stop reading.
_MAX_QUEUED = 16
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Fields that make a head more than the usual bodiless request (on_headers_complete).
_BODY_OR_UPGRADE = frozenset({b"content-length", b"transfer-encoding", b"upgrade"})
# httptools' error messages, for the refusal's detail (the messages quote the client's bytes).
_LABELS: tuple[tuple[type[Exception], str], ...] = (
    (httptools.HttpParserInvalidMethodError, "invalid method"),
    (httptools.HttpParserInvalidURLError, "invalid request target"),
)


class Exchange:
    """One request on a connection: its head, its body as it arrives, and how it ends."""

    __slots__ = ("body", "close", "error", "expect_continue", "head", "malformed", "started",
                 "upgrade")

    def __init__(self, head: RequestHead, body: RequestBody | None,
                 error: SidecarError | None = None) -> None:
        self.head = head
        self.body = body
        self.error = error  # answered in its turn, then the connection closes
        self.close = error is not None  # the connection ends after this response
        self.malformed = False  # the error is the parser's: the bytes were not HTTP
        self.expect_continue = False
        self.upgrade = False  # asks to switch protocols, and the sidecar passes that on
        self.started = False  # a byte of the response was written

    def __repr__(self) -> str:
        return f"<Exchange {self.head!r} error={self.error!r}>"


class EdgeProtocol(asyncio.Protocol):
    """One client connection (see the module's docstring)."""

    __slots__ = (
        "_body_time", "_current", "_drain", "_first", "_head_bytes", "_head_started",
        "_headers", "_idle_since", "_in_head", "_lingering", "_parsing", "_queue",
        "_read_paused", "_rest", "_task", "_tunnel", "_upgrading", "_url", "_waiter",
        "_write_paused", "client", "closing", "limits", "loop", "parser", "server",
        "transport",
    )

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.client = ""
        self.closing = False  # answer what is in flight, then close
        # the head being parsed
        self._url = b""
        self._headers: RawHeaders = []
        self._first: dict[bytes, bytes] = {}
        self._in_head = False
        self._head_bytes = 0  # of a head arriving in pieces
        self._head_started = 0.0  # when the head being waited for began (0: none)
        # requests
        self._parsing: Exchange | None = None  # the one whose body the parser is reading
        self._current: Exchange | None = None  # the one being answered
        self._queue: deque[Exchange] = deque()
        self._task: asyncio.Task[None] | None = None  # serves the requests, one at a time
        self._waiter: asyncio.Future[None] | None = None  # it waits here for the next
        self._lingering: Exchange | None = None  # answered; the rest of its body read away
        self._upgrading: Exchange | None = None
        self._rest = b""  # bytes after an upgrade request, until it is settled
        self._tunnel: ClientPeer | None = None
        self._idle_since = 0.0
        self._body_time = 0.0
        self._read_paused = 0  # bit 1: a body's buffer is full, bit 2: the queue is
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        self._head_started = self.loop.time()
        self.server.connections.add(self)
        self._task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.from_client(data)
            return
        parser = self.parser
        if parser is None:  # waiting to hear how an upgrade or a refusal ends
            self._rest += data
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._parser_stopped(data[exc.args[0]:] if exc.args else b"")
            return
        except httptools.HttpParserError as exc:
            self._parse_failed(exc, data)
            return
        if self._in_head:
            # A head arriving in pieces: note when it began, and bound what it may hold (the
            # parser gathers a field's bytes until its line ends).
            if not self._head_started:
                self._head_started = self.loop.time()
            self._idle_since = 0.0
            self._head_bytes += len(data)
            limits = self.limits
            if self._head_bytes > (limits.max_request_line + 4
                                   + limits.max_headers * (limits.max_header_size + 4)):
                self._refuse(self._too_large_head())

    def eof_received(self) -> bool | None:
        if self._tunnel is not None:
            return self._tunnel.client_eof()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.server.forget(self)
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.client_lost()
        gone = ClientGone("the client closed the connection")
        for exchange in (self._parsing, self._current, self._lingering, *self._queue):
            if exchange is not None and exchange.body is not None and not exchange.body.done:
                exchange.body.fail(gone)
        self._queue.clear()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(gone)
        self.parser = None
        self._wake()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._tunnel is not None:
            self._tunnel.client_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self._tunnel is not None:
            self._tunnel.client_resumed()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []
        self._first = {}

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) + 16 > self.limits.max_request_line:
            raise _Refused(RequestLineTooLongError(
                f"request line over {self.limits.max_request_line} bytes "
                "(server.limits.max_request_line)"))

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        limits = self.limits
        if len(name) + len(value) > limits.max_header_size:
            raise _Refused(RequestHeadersTooLargeError(
                f"a header field over {limits.max_header_size} bytes "
                "(server.limits.max_header_size)"))
        if len(headers) > limits.max_headers:
            raise _Refused(RequestHeadersTooLargeError(
                f"more than {limits.max_headers} header fields (server.limits.max_headers)"))
        lname = name.lower()
        if lname not in self._first:
            self._first[lname] = value
        elif lname == b"host":
            # RFC 9112 §3.2: a request with more than one Host is answered 400.
            raise _Refused(MalformedRequestError("more than one Host header"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._head_started = 0.0
        parser = self.parser
        assert parser is not None
        first = self._first
        url = self._url
        method = _METHODS.get(parser.get_method())
        if (method is not None and url[:1] == b"/" and b"host" in first
                and first.keys().isdisjoint(_BODY_OR_UPGRADE)
                and parser.get_http_version() == "1.1"):
            # The usual request (origin-form, HTTP/1.1, Host, no body, no upgrade): nothing in
            # it to refuse, so none of _exchange's questions.
            exchange = Exchange(RequestHead(
                method, url.decode("utf-8", "surrogateescape"), Headers(self._headers, first),
                True, self.client, self.server.scheme, parser.should_keep_alive()), None)
        else:
            exchange = self._exchange(parser, first)
            if exchange.error is not None:
                self._queue.append(exchange)
                self._stop_reading()
                self._wake()
                raise _Stop  # nothing after a refused head is read
            body = exchange.body
            if body is not None:
                self._parsing = exchange
                self._body_time = self.loop.time()
                expect = first.get(b"expect")
                exchange.expect_continue = (expect is not None
                                            and expect.lower() == b"100-continue")
        queue = self._queue
        queue.append(exchange)
        if len(queue) > _MAX_QUEUED:
            self._pause_reading(2)
        self._wake()

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is not None and exchange.body is not None:
            self._body_time = self.loop.time()
            exchange.body.feed(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        if exchange is None:
            return
        self._parsing = None
        if exchange.body is not None:
            exchange.body.finish()
        if exchange is self._lingering:
            self._lingering = None
            self._wake()

    # -- parsing -------------------------------------------------------------------------------

    def _exchange(self, parser: httptools.HttpRequestParser,
                  first: dict[bytes, bytes]) -> Exchange:
        """The parsed head as an Exchange, or as a refusal to answer in its turn."""
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii", "replace")
        version = parser.get_http_version()
        url = self._url
        error: SidecarError | None = None
        target = origin = url.decode("utf-8", "surrogateescape")
        if url[:1] != b"/" and url != b"*":
            # Absolute-form (`GET http://other/x`): the route is chosen by Host, so the
            # upstream gets that same view, origin-form, rather than an authority of its own.
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                parsed = None
            if parsed is None or not parsed.path or method == "CONNECT":
                origin = "/"
                if method != "CONNECT":
                    error = MalformedRequestError("invalid request target")
            else:
                origin = parsed.path.decode("utf-8", "surrogateescape")
                if parsed.query:
                    origin += "?" + parsed.query.decode("utf-8", "surrogateescape")
        te = first.get(b"transfer-encoding")
        length = first.get(b"content-length")
        if method == "CONNECT":
            error = TunnelNotAllowedError("CONNECT is not supported: this is a reverse proxy")
        elif version not in ("1.1", "1.0"):
            error = HttpVersionNotSupportedError(f"HTTP/{version} is not supported; send HTTP/1.1")
        elif version == "1.1" and b"host" not in first:
            error = MalformedRequestError("no Host header (RFC 9112 §3.2)")
        elif te is not None:
            if version == "1.0":
                # RFC 9112 §6.1: an HTTP/1.0 hop may not have understood it: faulty framing.
                error = MalformedRequestError("Transfer-Encoding in an HTTP/1.0 request")
            elif te.strip(b" \t").lower() != b"chunked" or sum(
                    1 for name, _ in self._headers if name.lower() == b"transfer-encoding") > 1:
                # e.g. `gzip, chunked`: forwarded as plain chunked, the upstream would take the
                # gzip-coded bytes for the body itself.
                error = TransferCodingNotImplementedError(
                    f"Transfer-Encoding {te.decode('latin-1')[:100]!r} is not supported; "
                    "send 'chunked' alone")
        content_length = None
        max_body = 0
        if (length is not None or te is not None) and error is None:
            # The config in force now: a reload applies max_body (the other limits, a restart).
            max_body = self.server.handler.max_body
            if length is not None:
                content_length = int(length)  # llhttp checked it is digits, and one value
                if content_length > max_body:
                    error = RequestBodyTooLargeError(
                        f"request body over {max_body} bytes (server.limits.max_body)")
        head = RequestHead(method, target, Headers(self._headers, first), version == "1.1",
                           self.client, self.server.scheme, parser.should_keep_alive(),
                           content_length,
                           te is not None, origin)
        if error is not None:
            return Exchange(head, None, error)
        body = RequestBody(self, max_body) if te is not None or content_length else None
        exchange = Exchange(head, body)
        if b"upgrade" in first and parser.should_upgrade():
            upgrade = first.get(b"upgrade")
            # h2c is never passed on: an upstream that speaks it would take the connection
            # over, past every rule here (h2c smuggling). The request goes as plain HTTP.
            if upgrade is not None and upgrade.strip().lower() != b"h2c":
                exchange.upgrade = True
                self._upgrading = exchange
        return exchange

    def _parse_failed(self, exc: httptools.HttpParserError, data: bytes) -> None:
        cause = exc.__context__
        if isinstance(cause, _Stop):
            self.parser = None
            return
        error = cause.error if isinstance(cause, _Refused) else self._refusal(exc)
        self._refuse(error)

    def _refusal(self, exc: httptools.HttpParserError) -> SidecarError:
        for kind, label in _LABELS:
            if isinstance(exc, kind):
                return MalformedRequestError(label)
        # llhttp's reason, without the quoted bytes.
        detail = str(exc).split("\n", 1)[0].rstrip(": ") or "malformed request"
        return MalformedRequestError(detail[:200])

    def _too_large_head(self) -> SidecarError:
        limits = self.limits
        if not self._headers:
            return RequestLineTooLongError(
                f"request line over {limits.max_request_line} bytes "
                "(server.limits.max_request_line)")
        return RequestHeadersTooLargeError(
            f"a header field over {limits.max_header_size} bytes "
            "(server.limits.max_header_size)")

    def _refuse(self, error: SidecarError) -> None:
        """A request that cannot be parsed: answered in its turn (after any request before it
        on this connection), then the connection closes; nothing more is read."""
        self.parser = None
        self._in_head = False
        self._head_started = 0.0
        parsing = self._parsing
        if parsing is not None and parsing.body is not None:
            # A body that went wrong (a bad chunk): its reader sees the error.
            parsing.body.fail(error)
            self._parsing = None
            parsing.close = True
            if parsing is not self._lingering and (parsing is self._current
                                                   or parsing in self._queue):
                self._stop_reading()
                return
        # Requests parsed along with the bad bytes and not yet started are dropped: what came
        # in one breath with a framing error may be part of it (a smuggling attempt).
        self._queue.clear()
        head = RequestHead("GET", "/", Headers([], {}), client=self.client, keep_alive=False)
        refusal = Exchange(head, None, error)
        refusal.malformed = True
        self._queue.append(refusal)
        self._stop_reading()
        if self._lingering is not None:
            self._lingering = None
        self._wake()

    def _parser_stopped(self, rest: bytes) -> None:
        """llhttp stops after a request asking to upgrade (and after CONNECT). If the sidecar
        passes the upgrade on, what follows waits for the upstream's answer; otherwise it is
        parsed as HTTP again."""
        self.parser = None
        self._rest += rest
        upgrading = self._upgrading
        if upgrading is not None and (upgrading is self._current or upgrading in self._queue):
            self._pause_reading(4)
            return
        self._restart_parser()

    def _restart_parser(self) -> None:
        self._upgrading = None
        if self.transport is None or self._read_paused & 8:
            return
        self.parser = httptools.HttpRequestParser(self)
        self._resume_reading(4)
        rest, self._rest = self._rest, b""
        if rest:
            self.data_received(rest)

    # -- serving -------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _serve(self) -> None:
        """Answer the requests of this connection in order, until it closes."""
        queue = self._queue
        handler = self.server.handler
        loop = self.loop
        while self.transport is not None:
            if not queue or self._lingering is not None:
                if not queue and self._lingering is None:
                    self._idle_since = loop.time()
                self._waiter = loop.create_future()
                await self._waiter
                self._waiter = None
                continue
            exchange = queue.popleft()
            if self._read_paused & 2 and len(queue) <= _MAX_QUEUED // 2:
                self._resume_reading(2)
            self._current = exchange
            self._idle_since = 0.0
            try:
                await handler.serve(exchange, self)
            except Exception:
                log.exception("request handler failed")
                self.abort()
                return
            finally:
                self._current = None
            if (exchange.close or exchange.body is not None or self.transport is None
                    or self._tunnel is not None or self.closing or not exchange.head.keep_alive
                    or exchange is self._upgrading) and not self._finished(exchange):
                return  # (else the usual case: _finished would say go on)

    def _finished(self, exchange: Exchange) -> bool:
        """After a response: whether the connection carries on."""
        if self.transport is None or self._tunnel is not None:
            return False
        if exchange.close or self.closing or not exchange.head.keep_alive:
            self.close()
            return False
        body = exchange.body
        if body is not None and not body.done:
            if body.failed:
                self.close()
                return False
            # Answered before its body was read (a refusal, a cache hit on a POST): read the
            # rest away, within body_timeout, and go on with the connection after it.
            body.fail(ClientGone("answered already"))
            self._lingering = exchange
            self._resume_reading(1)
        elif exchange is self._upgrading:
            self._restart_parser()
        return True

    # -- what the handler calls ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            raise ClientGone("the client closed the connection")
        transport.write(data)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    async def drain(self) -> None:
        """Wait until the client has taken enough of what was written."""
        if not self._write_paused:
            return
        if self.transport is None:
            raise ClientGone("the client closed the connection")
        self._drain = drain = self.loop.create_future()
        try:
            await drain
        finally:
            self._drain = None

    def send_continue(self, exchange: Exchange) -> None:
        """`100 Continue`, when the client waits for it and has sent none of the body yet."""
        body = exchange.body
        if exchange.expect_continue and body is not None and not body.received:
            exchange.expect_continue = False
            self.write(_CONTINUE)

    def interim(self, request: ProxyRequest, status: int, reason: str,
                headers: RawHeaders) -> None:
        """An interim response (1xx) from the upstream for `request` (pipeline.InterimSink):
        written at once if that request is the one being answered and nothing of its answer
        has gone out (not for a background revalidation, nor for a request answered already),
        and the client speaks HTTP/1.1 (RFC 9110 §15.2: none to an HTTP/1.0 client). Dropped
        too while the client does not read (they must not pile up here), and a 100 Continue
        for a request with `Expect: 100-continue`: the edge answers that itself
        (send_continue), so a client gets one at most."""
        exchange = self._current
        head = request.head
        transport = self.transport
        if (exchange is None or exchange.head is not head or exchange.started
                or not head.http11 or transport is None or self._write_paused):
            return
        if status == 100:
            expect = head.headers.get_bytes(b"expect")
            if expect is not None and expect.lower() == b"100-continue":
                return
        transport.write(interim_head(status, reason, headers, b"1.1 " + request.route.via))

    def start_tunnel(self, tunnel: ClientPeer) -> None:
        """The 101 is written: from now on the connection's bytes go to `tunnel` (the upstream's
        connection joined to this one, or the sidecar's own WebSocket), not to the parser."""
        self._tunnel = tunnel
        self._upgrading = None
        self._queue.clear()
        rest, self._rest = self._rest, b""
        self._read_paused = 0
        if self.transport is not None:
            self.transport.resume_reading()
        if rest:
            tunnel.from_client(rest)

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.abort()

    # -- flow control --------------------------------------------------------------------------

    def pause_for_body(self) -> None:
        self._pause_reading(1)

    def resume_for_body(self) -> None:
        if self._read_paused & 1:
            self._resume_reading(1)

    def _pause_reading(self, reason: int) -> None:
        if not self._read_paused and self.transport is not None:
            self.transport.pause_reading()
        self._read_paused |= reason

    def _resume_reading(self, reason: int) -> None:
        if not self._read_paused & reason:
            return
        self._read_paused &= ~reason
        if not self._read_paused and self.transport is not None:
            self.transport.resume_reading()

    def _stop_reading(self) -> None:
        self._pause_reading(8)  # for good: the connection closes after its last answer

    # -- timers (EdgeServer's sweep) -----------------------------------------------------------

    def check_timers(self, now: float) -> None:
        if self.transport is None or self._tunnel is not None:
            return
        limits = self.limits
        busy = self._current is not None or self._queue
        if self._head_started and not busy and now - self._head_started > limits.header_timeout:
            self._head_expired()
            return
        if self._idle_since and now - self._idle_since > self.server.keepalive_timeout:
            self.close()
            return
        parsing = self._parsing
        if parsing is not None and parsing.body is not None and not parsing.body.done:
            if self._read_paused & 1:
                self._body_time = now  # the sidecar stopped reading: the client is not idle
            elif now - self._body_time > limits.body_timeout:
                self._body_expired(parsing)
        elif self._lingering is not None and now - self._body_time > limits.body_timeout:
            self.close()

    def _head_expired(self) -> None:
        self._head_started = 0.0
        transport = self.transport
        assert transport is not None
        if self._in_head:
            request_id = new_request_id()
            timeout = self.limits.header_timeout
            error = RequestTimeoutError(
                f"the request head did not arrive within {timeout:g}s "
                "(server.limits.header_timeout)")
            log.warning("request head too slow; connection closed", extra={
                "request_id": request_id, "client": self.client, "status": error.status,
                "error": error.code, "detail": error.detail})
            transport.write(error_response(error, request_id))
        # else: a connection that never sent a byte is closed without a word, as nginx does.
        self.close()

    def _body_expired(self, exchange: Exchange) -> None:
        body = exchange.body
        assert body is not None
        timeout = self.limits.body_timeout
        self._parsing = None
        exchange.close = True
        self._stop_reading()
        body.fail(RequestTimeoutError(
            f"no request body bytes for {timeout:g}s (server.limits.body_timeout)"))
        if exchange is self._lingering or (exchange is not self._current
                                           and exchange not in self._queue):
            self.close()

    def cancel(self) -> asyncio.Task[None] | None:
        """The grace period is over: drop the connection and whatever it was doing."""
        self.abort()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            return task
        return None

    def shutdown(self) -> None:
        """Stop: close now when idle, else after the response in flight."""
        self.closing = True
        if self._tunnel is not None:
            return  # joined connections end with the grace period
        if self._current is None and not self._queue:
            self.close()

    def __repr__(self) -> str:
        state = ("tunnel" if self._tunnel else "busy" if self._current else
                 "closed" if self.transport is None else "idle")
        return f"<EdgeProtocol {self.client} {state} queued={len(self._queue)}>"


class _Refused(Exception):
    """Raised from a parser callback: the head breaks a limit."""

    def __init__(self, error: SidecarError) -> None:
        super().__init__(error.detail)
        self.error = error


class _Stop(Exception):
    """Raised from a parser callback: a refusal is queued; parse nothing more."""


class RequestHandler(Protocol):
    """What answers the requests (edge/handler.py's EdgeHandler)."""

    @property
    def max_body(self) -> int:
        """server.limits.max_body of the config in force."""
        ...

    async def serve(self, exchange: Exchange, conn: EdgeProtocol) -> None: ...


class EdgeServer:
    """The public listener: an EdgeProtocol per connection, the sweep of their timers, and a
    graceful stop."""

    def __init__(self, handler: RequestHandler, limits: LimitsConfig, *,
                 keepalive_timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.keepalive_timeout = keepalive_timeout
        # TLS on the listener (edge/tls.py): a reload swaps the context for new connections.
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self._acceptor: TlsAcceptor | None = None
        self.loop = asyncio.get_running_loop()
        self.connections: set[EdgeProtocol] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None  # set while stopping
        # Timers fire within a quarter of the shortest of them (and within a second).
        self._interval = max(0.05, min(1.0, limits.header_timeout / 4, limits.body_timeout / 4,
                                       keepalive_timeout / 4))

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; the port bound (for port 0)."""
        if self.tls is not None:
            sock = listening_socket(host, port, reuse_port=reuse_port)
            self._acceptor = TlsAcceptor(sock, lambda: EdgeProtocol(self), self._context,
                                         self.limits.header_timeout)
            self._acceptor.start()
            self._sweeper = self.loop.call_later(self._interval, self._sweep)
            return int(sock.getsockname()[1])
        self._server = await self.loop.create_server(
            lambda: EdgeProtocol(self), host or None, port, reuse_port=reuse_port or None,
            backlog=1024)
        self._sweeper = self.loop.call_later(self._interval, self._sweep)
        # Typed as asyncio.Server, whose `sockets` the stubs call a tuple; uvloop's is a list,
        # which compiled code (sidecar/native.py) would refuse as a tuple.
        server: Any = self._server
        return int(server.sockets[0].getsockname()[1])

    def _context(self) -> ssl.SSLContext:
        assert self.tls is not None
        return self.tls

    def forget(self, conn: EdgeProtocol) -> None:
        self.connections.discard(conn)
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            try:
                conn.check_timers(now)
            except Exception:  # one connection's bug must not stop every timer
                log.exception("connection timer failed")
                conn.abort()
        self._sweeper = self.loop.call_later(self._interval, self._sweep)

    async def stop(self, grace: float) -> None:
        """Stop accepting; let requests in flight finish within `grace`; close the rest."""
        server = self._server
        acceptor = self._acceptor
        if server is None and acceptor is None:
            return
        self._server = self._acceptor = None
        if server is not None:
            server.close()
        if acceptor is not None:
            await acceptor.close()
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
        tasks = [task for conn in list(self.connections) if (task := conn.cancel()) is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if server is not None:
            await server.wait_closed()
