"""TLS on the public listener: the server context built from `server.tls`, and the accept loop
that looks at a connection's first byte before its handshake.

Why an accept loop of its own instead of `create_server(ssl=...)`: a client speaking plain HTTP
to the TLS port would get its connection dropped by a failed handshake, with nothing said.
Looking at the first byte (MSG_PEEK, as nginx does) tells a TLS ClientHello (a handshake
record, 0x16) from anything else; anything else is answered `400` in plain HTTP, saying what
went wrong, and closed. A handshake goes to uvloop's TLS implementation with the bytes still
unread (`connect_accepted_socket`), so the sidecar carries no TLS code of its own. What this
costs is one peek and one more wake-up per connection, not per request.

The context is read again on each reload (renewed certificates without a restart): the server
holds it in an attribute that each new connection reads, so connections already open keep the
certificate they were made with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("sidecar.connection")

_HANDSHAKE = 0x16  # the TLS record type of a ClientHello
_PLAIN_TO_TLS = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                 b"Connection: close\r\nContent-Length: 62\r\n\r\n"
                 b"This port speaks HTTPS: a plain HTTP request was sent to it.\r\n")
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSettings(Protocol):
    """What the listener needs of `server.tls` (config.TlsConfig), named here so that the
    config's check can load the files without the edge importing the config."""

    @property
    def cert(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def min_version(self) -> str: ...
    @property
    def client_ca(self) -> str | None: ...


def server_context(tls: TlsSettings, base: Path) -> ssl.SSLContext:
    """The listener's context: the certificate chain and key (paths relative to the config
    file's directory), the lowest version allowed, ALPN `http/1.1`, and client certificates
    required when `client_ca` is set. Raises ValueError naming the file and the reason."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.set_alpn_protocols(["http/1.1"])
    cert, key = base / tls.cert, base / tls.key
    for path in (cert, key, *([base / tls.client_ca] if tls.client_ca else [])):
        if not path.is_file():
            raise ValueError(f"cannot read {path}: no such file")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot use the certificate {cert} with the key {key}: "
                         f"{getattr(exc, 'reason', None) or exc} (PEM files, the key matching "
                         "the certificate's)") from None
    if tls.client_ca is not None:
        ca = base / tls.client_ca
        try:
            context.load_verify_locations(ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"cannot read the client CA file {ca}: "
                             f"{getattr(exc, 'reason', None) or exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsAcceptor:
    """Accepts on `sock`, sorts each connection by its first byte, and hands the TLS ones to
    `protocol_factory` through uvloop's TLS transport with `context()`."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol],
                 context: Callable[[], ssl.SSLContext], first_byte_timeout: float) -> None:
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.context = context
        self.first_byte_timeout = first_byte_timeout
        self.loop = asyncio.get_running_loop()
        self._accepting: asyncio.Task[None] | None = None
        self._sorting: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.sock.setblocking(False)
        self._accepting = self.loop.create_task(self._accept(), name="tls-accept")

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._sorting) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.sock.close()

    async def _accept(self) -> None:
        while True:
            try:
                conn, _ = await self.loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and the like: the next accept may work
                log.warning("accept failed", extra={"error": str(exc)})
                await asyncio.sleep(0.1)
                continue
            task = self.loop.create_task(self._sort(conn))
            self._sorting.add(task)
            task.add_done_callback(self._sorting.discard)

    async def _sort(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            first = await self._peek(conn)
            if not first:
                conn.close()
                return
            if first[0] != _HANDSHAKE:
                with contextlib.suppress(OSError):
                    conn.send(_PLAIN_TO_TLS)
                    conn.shutdown(socket.SHUT_WR)
                conn.close()
                return
            await self.loop.connect_accepted_socket(
                self.protocol_factory, conn, ssl=self.context(),
                ssl_handshake_timeout=self.first_byte_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.debug("TLS connection refused", extra={"error": str(exc) or type(exc).__name__})
            conn.close()
        except BaseException:
            conn.close()
            raise

    async def _peek(self, conn: socket.socket) -> bytes:
        """The connection's first bytes, left unread; b"" if it closed or said nothing within
        the head timeout."""
        readable: asyncio.Future[None] = self.loop.create_future()
        fd = conn.fileno()
        self.loop.add_reader(fd, _done, readable)
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                await readable
        except TimeoutError:
            return b""
        finally:
            self.loop.remove_reader(fd)
        try:
            return conn.recv(8, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return b""


def _done(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket as `create_server` would make it (IPv6 for an IPv6 host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host or "0.0.0.0", port), family=family, backlog=1024,
                                reuse_port=reuse_port)
