"""The upstream client: one keep-alive connection pool per upstream, HTTP/1.1 on asyncio protocols.

Why not aiohttp.ClientSession: on a proxy's hot path its client side costs more CPU than the
whole server side (request objects, URL building, cookie jar, tracing hooks, decompression
plumbing). A proxy already holds the request as raw header bytes and wants the response back as
raw bytes, so this module writes the request head itself and parses the response with httptools
(llhttp, the parser aiohttp and uvicorn use). Bodies stream both ways with flow control, so
memory stays bounded whatever their size. See docs/performance.md for the measurements.

Foreign errors (OSError, timeouts, parser errors) become sidecar.errors.Upstream* here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httptools

from .config import UpstreamConfig
from .deadlines import Deadlines
from .errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from .http.headers import RawHeaders, response_codings

# Pause reading from the upstream once this much response body waits for a slow client.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# The largest response head taken (status line and headers); more is an invalid response, not a
# reason to hold it all in memory until the timeout. Envoy's default is 60 KiB, nginx's 4-8 KiB.
_MAX_HEAD = 64 * 1024

Body = bytes | AsyncIterator[bytes] | None


class Interim(Protocol):
    """Who hears of the interim responses (1xx but 101) that come ahead of an answer: the
    request they belong to (pipeline.ProxyRequest), which passes them on to its client."""

    def interim(self, status: int, reason: str, headers: RawHeaders) -> None: ...


class _StaleConnection(UpstreamConnectError):
    """A reused keep-alive connection closed before any response byte: safe to try anew."""


class UpstreamResponse:
    """Status and headers at once; the body as it arrives (`read()`), or whole (`body`)."""

    __slots__ = (
        "_chunks", "_conn", "_error", "_size", "_timeout", "_waiter",
        "complete", "headers", "keep_alive", "reason", "status", "tunnel",
    )

    def __init__(self, conn: _Connection, status: int, reason: bytes, headers: RawHeaders,
                 keep_alive: bool, timeout: float) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason.decode("latin-1")
        self.headers = headers
        self.keep_alive = keep_alive
        self.complete = False
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._timeout = timeout
        self.tunnel: UpstreamTunnel | None = None  # a 101 to an upgrade: the connection

    @property
    def body(self) -> bytes:
        """The whole body, when `complete` says it has all arrived."""
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def read(self) -> bytes:
        """The next chunk of body; b"" at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            conn = self._conn
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            if conn is not None:
                conn.pool.deadlines.set(self, self._timeout, self._on_timeout)
            try:
                await waiter
            finally:
                if conn is not None:
                    conn.pool.deadlines.clear(self)
                self._waiter = None
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        conn = self._conn
        if conn is not None and conn.reading_paused and self._size <= _LOW_WATER:
            conn.resume_reading()
        return chunk

    def close(self) -> None:
        """Give up on the rest of the body (the client went away): the connection is dropped."""
        conn = self._conn
        if conn is not None and not self.complete:
            self._conn = None
            conn.abort()

    def _on_timeout(self) -> None:
        conn = self._conn
        self._fail(UpstreamTimeoutError(
            conn.pool.name if conn else "?", "upstream stopped sending the response body"))
        if conn is not None:
            conn.abort()

    def _finish(self) -> None:
        self.complete = True
        self._conn = None
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} complete={self.complete} buffered={self._size}>"


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream, fed to an httptools response parser."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.counted = True
        self.idle_since = 0.0
        self.reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # per exchange
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._headers: RawHeaders = []
        self._reason = b""
        self._informational = False
        self._interim: Interim | None = None
        self._head_request = False
        self._request_sent = False
        self._got_bytes = False
        self._until_close = False
        self._timeout = 30.0
        self._in_head = False
        self._head_size = 0
        self._length: bytes | None = None  # the response's Content-Length, as sent
        self._upgrade = False  # this exchange asks the upstream to switch protocols
        self._switching = False  # ... and it answered 101
        self.tunnel: UpstreamTunnel | None = None
        self._head_timeout = self._on_head_timeout  # bound once: set as a deadline per request

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.received(data)
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._switching:
                self._switched(data[exc.args[0]:] if exc.args else b"")
            else:
                self._error(UpstreamProtocolError(self.pool.name,
                                                  "unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._error(UpstreamProtocolError(self.pool.name, f"invalid HTTP response: {exc}"))
        else:
            if self._in_head:
                self._head_size += len(data)
                if self._head_size > _MAX_HEAD:
                    self._error(UpstreamProtocolError(
                        self.pool.name, f"response head larger than {_MAX_HEAD // 1024} KiB"))

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        if tunnel is not None:
            return tunnel.eof()
        if self._until_close:
            # The upstream ended a body framed by the connection's close: that was all of it.
            # (A reset or an abort is not an end: connection_lost fails the body then.)
            response = self._response
            if response is not None and not response.complete:
                self._response = None
                response._finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.lost()
            return
        if self._head_waiter is not None:
            if self._response is not None:
                # A small response held back until whole: the client can still get a 502.
                error: UpstreamError = UpstreamProtocolError(
                    self.pool.name, "upstream closed the connection mid-response")
            elif self.reused and not self._got_bytes:
                error = _StaleConnection(
                    self.pool.name, "upstream closed the connection before responding")
            else:
                error = UpstreamConnectError(
                    self.pool.name, "upstream closed the connection before responding")
            self._answer(None, error)
        response = self._response
        if response is not None and not response.complete:
            if self._head_request:
                self._response = None
                response._finish()
            else:
                response._fail(UpstreamProtocolError(
                    self.pool.name, "upstream closed the connection mid-response"))
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_writing()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        waiter = self._head_waiter
        if waiter is None or waiter.done():
            # A response nobody is waiting for (a second answer to one request, bytes on an
            # idle connection): it would be taken for the answer to the next request sent here,
            # and the pool would hand the connection out twice. The parser stops here, and
            # data_received drops the connection.
            raise UpstreamProtocolError(self.pool.name, "a response no request asked for")
        self._headers = []
        self._length = None
        self._in_head = True
        self._head_size = 0

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self._length = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self.parser.get_status_code()
        if status == 101 and self._upgrade:
            # Switching protocols: the parser stops after this head (HttpParserUpgrade in
            # data_received), and the connection becomes a tunnel.
            self._switching = True
            self._response = UpstreamResponse(self, status, self._reason, self._headers, False,
                                              self._timeout)
            return
        if status < 200:
            # 100 Continue, 102 Processing, 103 Early Hints: interim, the answer follows. Passed
            # on as it comes (a 101 nobody asked for is refused: HttpParserUpgrade).
            self._informational = True
            interim = self._interim
            if interim is not None and status != 101:
                interim.interim(status, self._reason.decode("latin-1"), self._headers)
            return
        keep_alive = self.parser.should_keep_alive()
        length = self._length
        if (length is None and status != 204 and status != 304 and not self._head_request
                and not self._unlengthed(keep_alive)):
            return
        response = UpstreamResponse(self, status, self._reason, self._headers, keep_alive,
                                    self._timeout)
        self._response = response
        if (not self._head_request and length is not None and length.isdigit()
                and int(length) <= _HIGH_WATER):
            # Hand the response over whole once its body is in (usually the same read or the
            # next): one buffered write to the client instead of a streamed response.
            return
        self._answer(response)
        if self._head_request:
            # A response to HEAD has no body whatever Content-Length says; httptools cannot be
            # told so, so the exchange ends here and the parser is replaced before reuse.
            self._message_done()

    def _unlengthed(self, keep_alive: bool) -> bool:
        """A body without Content-Length: chunked, or (RFC 9112 §6.3 rules 4 and 7) until the
        connection closes, which the parser reads it as when chunked is not the final coding;
        that connection is never reused. False (and the exchange failed) when a transfer coding
        other than chunked is left on the body: the sidecar asks for none (it sends no TE),
        cannot undo one, and may not pass it on (to an HTTP/1.0 client, to the cache)."""
        chunked, codings = response_codings(
            [value for name, value in self._headers
             if len(name) == 17 and name.lower() == b"transfer-encoding"])
        if codings:
            self._error(UpstreamProtocolError(
                self.pool.name, "response body in a transfer coding the sidecar did not ask "
                f"for: {b', '.join(codings).decode('latin-1')[:100]}"))
            return False
        self._until_close = not chunked and not keep_alive
        return True

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and not self._head_request:
            response._chunks.append(body)
            response._size += len(body)
            if response._waiter is not None:
                response._wake()
            if response._size > _HIGH_WATER:
                self.pause_reading()

    def on_message_complete(self) -> None:
        if self._switching:
            return
        if self._informational:
            self._informational = False
            return
        if not self._head_request:
            self._message_done()

    # -- exchange ------------------------------------------------------------------------------

    def _switched(self, early: bytes) -> None:
        """The upstream answered 101: from here on its bytes belong to the tunnel, not to
        HTTP. The connection leaves the pool's count (it is never reused)."""
        response = self._response
        assert response is not None
        self._response = None
        self.pool._forget(self)
        tunnel = self.tunnel = UpstreamTunnel(self, early)
        response.tunnel = tunnel
        response.complete = True
        response._conn = None
        if not self._answer(response):
            tunnel.abort()

    def _message_done(self) -> None:
        response = self._response
        if response is None:
            return
        keep_alive = response.keep_alive
        self._answer(response)
        response.complete = True  # response._finish(), inline: once per request
        response._conn = None
        if response._waiter is not None:
            response._wake()
        self._response = None
        if self._request_sent and keep_alive and not self.closed:
            # The read that ended the body may also have paused reading (a slow client): the
            # response no longer needs the connection, and its next exchange must be read.
            if self.reading_paused:
                self.resume_reading()
            self.pool._release(self)
        else:
            self.abort()

    def _error(self, error: UpstreamError) -> None:
        self._answer(None, error)
        if self._response is not None:
            self._response._fail(error)
        self.abort()

    def _answer(self, response: UpstreamResponse | None,
                error: UpstreamError | None = None) -> bool:
        """Hand the response head (or the error) to the request waiting for it, if any, and
        end its deadline: from here on the connection may serve the next request (a whole
        small response releases it before the waiting task runs again)."""
        waiter = self._head_waiter
        if waiter is None:
            return False
        self._head_waiter = None
        self._interim = None
        self.pool.deadlines.clear(self)
        if waiter.done():  # given up on by its caller (abandon() closes the connection)
            return False
        if error is None:
            waiter.set_result(response)  # type: ignore[arg-type]
        else:
            waiter.set_exception(error)
        return True

    def _on_head_timeout(self) -> None:
        if self._head_waiter is None:
            return  # answered meanwhile
        self._error(UpstreamTimeoutError(
            self.pool.name, f"no response from upstream within {self._timeout:g}s"))

    def abort(self) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.close()

    def send(self, head: bytes, body: bytes | None, chunked: bool, timeout: float,
             is_head: bool, upgrade: bool = False,
             interim: Interim | None = None) -> asyncio.Future[UpstreamResponse]:
        """Write a whole request; the future gets the response head. Not a coroutine: the
        usual request costs no frame of its own here (see `UpstreamPool.request`)."""
        waiter = self._begin(is_head, upgrade, timeout, interim)
        transport = self.transport
        assert transport is not None
        if body is None:
            transport.write(head)
        elif chunked:  # the head says Transfer-Encoding: chunked: one chunk, then the end
            transport.write(head + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body
                                    else b"0\r\n\r\n"))
        else:
            transport.write(head + body)
        self._sent(timeout)
        return waiter

    async def send_streaming(self, head: bytes, body: AsyncIterator[bytes], chunked: bool,
                             timeout: float, is_head: bool, upgrade: bool = False,
                             interim: Interim | None = None,
                             ) -> asyncio.Future[UpstreamResponse]:
        """Write a request whose body streams from the client, with back-pressure; returns
        the future of the response head once the body is sent."""
        waiter = self._begin(is_head, upgrade, timeout, interim)
        transport = self.transport
        assert transport is not None
        transport.write(head)
        await self._send_stream(body, chunked, timeout)
        self._sent(timeout)
        return waiter

    def _begin(self, is_head: bool, upgrade: bool, timeout: float,
               interim: Interim | None) -> asyncio.Future[UpstreamResponse]:
        if self._head_request:
            self.parser = httptools.HttpResponseParser(self)
        self._head_request = is_head
        self._interim = interim
        self._upgrade = upgrade
        self._request_sent = False
        self._got_bytes = False
        self._until_close = False
        self._timeout = timeout
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self._head_waiter = waiter
        return waiter

    def _sent(self, timeout: float) -> None:
        self._request_sent = True
        if self._head_waiter is not None:  # not answered already (an early error, say)
            self.pool.deadlines.set(self, timeout, self._head_timeout)

    def abandon(self, waiter: asyncio.Future[UpstreamResponse] | None) -> None:
        """The caller stopped waiting for this exchange (cancelled, or it failed; `waiter`
        None: while the request was being written): unless the response came whole and fine,
        the connection cannot be used again."""
        if (waiter is None or not waiter.done() or waiter.cancelled()
                or waiter.exception() is not None):
            # Nobody is to get this exchange's answer any more, not even its error.
            self._head_waiter = None
            self._interim = None
            self.pool.deadlines.clear(self)
            self.abort()

    async def _send_stream(self, body: AsyncIterator[bytes], chunked: bool,
                           timeout: float) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if self.closed:
                return
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if self._writing_paused:
                self._drain_waiter = self.loop.create_future()
                try:
                    async with asyncio.timeout(timeout):
                        await self._drain_waiter
                except TimeoutError:
                    raise UpstreamTimeoutError(
                        self.pool.name, f"upstream did not read the request body for "
                        f"{timeout:g}s") from None
                finally:
                    self._drain_waiter = None
        if chunked and not self.closed:
            transport.write(b"0\r\n\r\n")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<UpstreamConnection {self.pool.name} {state} reused={self.reused}>"


class TunnelPeer(Protocol):
    """The other end of a tunnel (the client connection): what the upstream side calls."""

    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_eof(self) -> None: ...

    def tunnel_closed(self) -> None: ...

    def tunnel_pause(self) -> None: ...

    def tunnel_resume(self) -> None: ...


class UpstreamTunnel:
    """An upstream connection after a 101: raw bytes both ways, no HTTP. Bytes that came with
    the 101 (`early`) are handed over when a peer attaches."""

    __slots__ = ("_conn", "_early", "_eof", "_lost", "peer")

    def __init__(self, conn: _Connection, early: bytes) -> None:
        self._conn = conn
        self._early = early
        self._eof = False
        self._lost = False
        self.peer: TunnelPeer | None = None

    def attach(self, peer: TunnelPeer) -> None:
        self.peer = peer
        if self._early:
            early, self._early = self._early, b""
            peer.tunnel_data(early)
        if self._eof:
            peer.tunnel_eof()
        if self._lost:
            peer.tunnel_closed()

    # from the upstream connection
    def received(self, data: bytes) -> None:
        if self.peer is None:
            self._early += data
        else:
            self.peer.tunnel_data(data)

    def eof(self) -> bool:
        self._eof = True
        if self.peer is not None:
            self.peer.tunnel_eof()
        return True  # keep our half open: the client may still send

    def lost(self) -> None:
        self._lost = True
        if self.peer is not None:
            self.peer.tunnel_closed()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.tunnel_pause()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.tunnel_resume()

    # from the peer
    def write(self, data: bytes) -> None:
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def write_eof(self) -> None:
        transport = self._conn.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def close(self) -> None:
        self._conn.close()

    def abort(self) -> None:
        self._conn.abort()

    def __repr__(self) -> str:
        return f"<UpstreamTunnel {self._conn.pool.name} lost={self._lost}>"


class UpstreamPool:
    """Keep-alive connections to one upstream, per worker process."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.host = config.host
        self.port = config.port
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if config.scheme == "https" else None
        )
        self._idle: list[_Connection] = []
        self._count = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closing = False
        self.deadlines = Deadlines(self.loop)  # response heads and body chunks awaited

    async def request(self, head: bytes, body: Body = None, chunked: bool = False,
                      timeout: float | None = None, is_head: bool = False,
                      upgrade: bool = False, interim: Interim | None = None,
                      ) -> UpstreamResponse:
        """Send one request; return once the response's status and headers have arrived.
        `upgrade`: the head asks to switch protocols; a 101 answer comes with `tunnel` set,
        the connection then belonging to the caller. `interim` hears of the 1xx responses
        that come first, as they come; they are never part of the answer."""
        timeout = self.config.timeout if timeout is None else timeout
        replayable = body is None or isinstance(body, bytes)
        while True:
            conn = self._idle_connection()
            if conn is None:
                conn = await self._acquire(timeout)
            waiter = None
            try:
                if replayable:
                    waiter = conn.send(head, body, chunked, timeout, is_head,  # type: ignore[arg-type]
                                       upgrade, interim)
                else:
                    waiter = await conn.send_streaming(head, body, chunked,  # type: ignore[arg-type]
                                                       timeout, is_head, upgrade, interim)
                return await waiter
            except BaseException as exc:
                conn.abandon(waiter)
                if isinstance(exc, _StaleConnection) and replayable:
                    continue  # the server closed an idle keep-alive connection: try a new one
                raise

    def _idle_connection(self) -> _Connection | None:
        """A kept-alive connection, if one is idle (without a coroutine: the usual case)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if self.loop.time() - conn.idle_since > self.config.idle_timeout:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def _acquire(self, timeout: float) -> _Connection:
        loop = self.loop
        while True:
            conn = self._idle_connection()
            if conn is not None:
                return conn
            if self._count < self.config.max_connections:
                self._count += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._count -= 1
                    self._wake_one()
                    raise
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                raise UpstreamUnavailableError(
                    self.name, f"all {self.config.max_connections} connections to the upstream "
                    f"stayed busy for {timeout:g}s (raise upstreams.{self.name}.max_connections?)"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> _Connection:
        path = self.config.socket_path
        where = f"{self.host}:{self.port}" if path is None else path
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                if path is not None:
                    _, conn = await self.loop.create_unix_connection(
                        lambda: _Connection(self), path)
                else:
                    _, conn = await self.loop.create_connection(
                        lambda: _Connection(self), self.host, self.port, ssl=self._ssl)
        except TimeoutError:
            raise UpstreamTimeoutError(
                self.name, f"connect to {where} timed out after "
                f"{self.config.connect_timeout:g}s") from None
        except ssl.SSLError as exc:
            raise UpstreamConnectError(self.name, f"TLS error with {where}: {exc}") from None
        except OSError as exc:
            raise UpstreamConnectError(
                self.name, f"cannot connect to {where}: {exc.strerror or exc}") from None
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closing or len(self._idle) >= self.config.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._waiters:
            self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        if conn.counted:
            conn.counted = False
            self._count -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close idle connections now; busy ones close when their exchange ends. A request that
        started under the old config may still use the pool: it then gets a fresh connection
        that is closed after use."""
        self._closing = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    def stats(self) -> dict[str, Any]:
        return {"open": self._count, "idle": len(self._idle), "waiting": len(self._waiters)}

    def __repr__(self) -> str:
        return (f"<UpstreamPool {self.name} {self.host}:{self.port} open={self._count} "
                f"idle={len(self._idle)}>")
