"""The client connection: aiohttp's server protocol, with what a proxy facing the internet needs
and aiohttp lacks.

aiohttp's RequestHandler parses requests strictly (llhttp, or its Python parser under
AIOHTTP_NO_EXTENSIONS=1) and enforces `max_line_size`, `max_field_size` and `max_headers`. It
has no timer for a request that arrives slowly, though: its `keepalive_timeout` also runs while
a head trickles in, so a slowloris client holds a connection for the whole keep-alive time, and
a stalled body is waited for as long as the handler reads it. And it answers a malformed request
with a text/plain 400 and a logged traceback. EdgeProtocol adds, and nothing more:

- `server.limits.header_timeout`: a timer armed when a request head starts (at accept, then at
  the first byte after a response) and cancelled when the parser hands the request over; on
  expiry the client gets a 408 (none if it sent nothing) and the connection is closed.
- `server.limits.body_timeout`: while a body is arriving, each read notes the time; once no
  byte has come for that long (and not because the sidecar itself stopped reading: that is
  back-pressure), the body's reader gets RequestTimeoutError. The edge answers 408 and the
  upstream request the body was streaming into is aborted (upstream.py).
- What the parser lets through but two parsers could frame differently, or a reverse proxy
  should not carry, is refused before the handler sees it: a Transfer-Encoding other than
  `chunked` (501, as nginx), Transfer-Encoding in HTTP/1.0 (400), CONNECT (405), HTTP
  versions other than 1.x (505).
- Parse errors and those refusals become the sidecar's JSON errors (proxy.error_response): 414
  for the request line, 431 for the header limits, 400 for the rest, with a one-line log, and
  the connection is closed.

Cost per request: a counter compare and a few attribute checks when a head arrives whole (the
usual case); a timer handle only for a head or a body that arrives in pieces.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .config import LimitsConfig
from .errors import (
    HttpVersionNotSupportedError,
    MalformedRequestError,
    RequestHeadersTooLargeError,
    RequestLineTooLongError,
    RequestTimeoutError,
    SidecarError,
    TransferCodingNotImplementedError,
    TunnelNotAllowedError,
)
from .proxy import error_body, error_response, new_request_id

log = logging.getLogger("sidecar.connection")

# aiohttp's errors whose message quotes the client's bytes: answered and logged with a label.
_LABELS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (BadHttpMethod, "invalid method"),
    (BadStatusLine, "invalid request line"),
    (InvalidURLError, "invalid request target"),
    (InvalidHeader, "invalid header field"),
    (TransferEncodingError, "invalid chunked body"),
)


class EdgeServer(web.Server):
    """aiohttp's low-level server, making EdgeProtocols."""

    def __init__(self, handler: Any, *, limits: LimitsConfig, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._limits = limits
        self._protocol_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return EdgeProtocol(self, loop=self._loop, limits=self._limits, **self._protocol_kwargs)


class EdgeProtocol(RequestHandler):
    """One client connection (see the module's docstring)."""

    __slots__ = ("_body", "_body_time", "_body_timer", "_head_bytes", "_head_timer", "_limits",
                 "_line_bytes", "_refused_in_line")

    def __init__(self, manager: web.Server, *, limits: LimitsConfig, **kwargs: Any) -> None:
        super().__init__(manager, max_line_size=limits.max_request_line,
                         max_field_size=limits.max_header_size, max_headers=limits.max_headers,
                         **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # some of a head has arrived since the timer was armed
        # Bytes of that head before its first line end, -1 once one arrived: which limit a
        # LineTooLong is about (the parsers do not say), for 414 or 431.
        self._line_bytes = 0
        self._refused_in_line = False  # the last parse error was over max_request_line
        self._body: StreamReader | None = None  # the body the parser is filling, if any
        self._body_time = 0.0  # when a byte of it last arrived
        self._body_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(self._limits.header_timeout,
                                                 self._head_expired)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        RequestHandler.data_received(self, data)  # (not super(): this runs for every read)
        if self._request_count == count:
            if data:
                self._more_bytes(data)
            return
        # A head is in. The usual case, one HTTP/1.1 head without a body that arrived whole, costs
        # the checks of this condition and nothing more. (Both parsers give CONNECT a body: the
        # tunnel; and only llhttp's HTTP/1.1 is the HttpVersion11 object.)
        message, payload = self._messages[-1]
        if (payload is not EMPTY_PAYLOAD or self._head_timer is not None or self._head_bytes
                or self._request_count - count != 1 or isinstance(message, _ErrInfo)
                or message.version is not HttpVersion11):
            self._heads_done(data, self._request_count - count)
        elif self._body is not None:
            self._body = None

    def _more_bytes(self, data: bytes) -> None:
        """Bytes, and no whole head: of a body, or of a head arriving in pieces."""
        body = self._body
        if body is not None and not body.is_eof():
            self._body_time = self._loop.time()
            return
        # Bytes of a request head that is not whole yet.
        if self._head_timer is None:
            if self._payload_parser is not None or self._upgraded:
                return  # a WebSocket now: no more heads
            self._head_timer = self._loop.call_later(self._limits.header_timeout,
                                                     self._head_expired)
        self._head_bytes = True
        if self._line_bytes >= 0:
            end = data.find(b"\n")
            self._line_bytes = -1 if end >= 0 else self._line_bytes + len(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        self._body = None
        super().connection_lost(exc)

    # -- aiohttp's error answer ------------------------------------------------------------------

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, ConnectionResetError) and self.transport is None:
            # The client left mid-request (its body was being read): routine, not a bug, and
            # there is nobody to answer. The response is dropped when aiohttp writes it.
            log.debug("client went away mid-request", extra={"client": request.remote})
            return web.Response(status=499)
        if isinstance(exc, SidecarError):
            error = exc  # refused by _heads_done
        elif isinstance(exc, HttpProcessingError):
            error = self._refusal(exc)
        else:
            return super().handle_error(request, status, exc, message)  # a handler's bug
        request_id = new_request_id()
        # A first "request" with a bad method is mostly TLS or a scanner on the HTTP port: as
        # aiohttp does, keep it out of the warnings.
        quiet = isinstance(exc, BadHttpMethod) and self._request_count == 1
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "request refused; connection closed" if error is exc else
                "malformed request refused; connection closed", extra={
                    "request_id": request_id, "client": request.remote, "status": error.status,
                    "error": error.code, "detail": error.detail})
        return error_response(error, request_id)

    def _refusal(self, exc: HttpProcessingError) -> SidecarError:
        limits = self._limits
        if isinstance(exc, LineTooLong):
            if self._refused_in_line:
                return RequestLineTooLongError(
                    f"request line over {limits.max_request_line} bytes "
                    "(server.limits.max_request_line)")
            return RequestHeadersTooLargeError(
                f"a header field over {limits.max_header_size} bytes "
                "(server.limits.max_header_size)")
        if exc.message.startswith("Too many headers"):
            return RequestHeadersTooLargeError(
                f"more than {limits.max_headers} header fields (server.limits.max_headers)")
        for kind, label in _LABELS:
            if isinstance(exc, kind):
                return MalformedRequestError(label)
        # llhttp's reason, without the quoted bytes it adds after the first line.
        detail = exc.message.split("\n", 1)[0].rstrip(": ") or "malformed request"
        return MalformedRequestError(detail[:200])

    # -- heads and timers ------------------------------------------------------------------------

    def _heads_done(self, data: bytes, count: int) -> None:
        """The parser handed over `count` requests (or a parse error): a head is in."""
        timer = self._head_timer
        if timer is not None:
            timer.cancel()
            self._head_timer = None
        messages = self._messages
        for i in range(len(messages) - count, len(messages)):
            message = messages[i][0]
            if isinstance(message, _ErrInfo):
                line = self._line_bytes
                if line >= 0:
                    end = data.find(b"\n")
                    line += end if end >= 0 else len(data)
                self._refused_in_line = line > self._limits.max_request_line
            elif message.method == "CONNECT" or message.version[0] != 1 or message.chunked:
                error = _unsupported(message)
                if error is not None:
                    # Answered by handle_error in the request's turn, and the connection closes.
                    messages[i] = (_ErrInfo(status=error.status, exc=error,
                                            message=error.detail), EMPTY_PAYLOAD)
        self._head_bytes = False
        self._line_bytes = 0
        payload = messages[-1][1]
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            self._body = None
            return
        self._body = payload
        self._body_time = self._loop.time()
        if self._body_timer is None:
            self._body_timer = self._loop.call_later(self._limits.body_timeout,
                                                     self._body_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close or self._close or self._upgraded:
            return
        if self._request_in_progress or self._messages:
            # A pipelined head trickling in behind a request still being served: the next
            # byte re-arms the timer (data_received).
            return
        if self._head_bytes:
            request_id = new_request_id()
            timeout = self._limits.header_timeout
            error = RequestTimeoutError(
                f"the request head did not arrive within {timeout:g}s "
                "(server.limits.header_timeout)")
            peer = transport.get_extra_info("peername")
            log.warning("request head too slow; connection closed", extra={
                "request_id": request_id, "client": peer[0] if peer else None,
                "status": error.status, "error": error.code, "detail": error.detail})
            body = error_body(error, request_id)
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nCache-Control: no-store\r\nConnection: close\r\n"
                b"X-Request-ID: %s\r\n\r\n%s" % (len(body), request_id.encode(), body))
        # else: a connection that never sent a byte is closed without a word, as nginx does.
        self.force_close()

    def _body_expired(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or body.exception() is not None:
            return
        loop = self._loop
        timeout = self._limits.body_timeout
        if self._reading_paused or self._buffer_paused:
            # The sidecar stopped reading (its reader is behind): the client is not idle.
            self._body_time = loop.time()
        idle = loop.time() - self._body_time
        if idle < timeout:
            self._body_timer = loop.call_later(timeout - idle, self._body_expired)
            return
        if not self._request_in_progress:
            # Answered already, and aiohttp is reading the rest away (lingering): stop that.
            self.force_close()
            return
        body.set_exception(RequestTimeoutError(
            f"no request body bytes for {timeout:g}s (server.limits.body_timeout)"))
        # The rest of the body is not coming: after the 408, close at once instead of
        # lingering for it (a per-connection setting of aiohttp's RequestHandler).
        self._lingering_time = 0.0


def _unsupported(message: Any) -> SidecarError | None:
    """What aiohttp's parsers accept and the sidecar refuses, else None."""
    if message.method == "CONNECT":
        return TunnelNotAllowedError("CONNECT is not supported: this is a reverse proxy")
    major, minor = message.version
    if major != 1:
        return HttpVersionNotSupportedError(
            f"HTTP/{major}.{minor} is not supported; send HTTP/1.1")
    if not message.chunked:
        return None
    if minor == 0:
        # RFC 9112 §6.1: an HTTP/1.0 hop may not have understood it: the framing is faulty.
        return MalformedRequestError("Transfer-Encoding in an HTTP/1.0 request")
    coding = message.headers.get("Transfer-Encoding", "")
    if coding.strip(" \t").lower() != "chunked":
        # e.g. `gzip, chunked`: forwarded as plain chunked, the upstream would take the
        # gzip-coded bytes for the body itself.
        return TransferCodingNotImplementedError(
            f"Transfer-Encoding {coding[:100]!r} is not supported; send 'chunked' alone")
    return None
