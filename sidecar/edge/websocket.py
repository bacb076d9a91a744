"""A WebSocket the sidecar answers itself (a job's events, jobs/api.py), after its 101.

The frames are wsproto's (sans-I/O, by the authors of h11): it encodes what the sidecar sends,
decodes what the client sends (masking, fragments, UTF-8, control frames) and tracks the closing
handshake. This module only does the I/O on the client's connection (edge/protocol.py), which
hands it every byte once the 101 is written:

- each message of the source goes out as a text frame, waiting for the client when its write
  buffer is full; a None from the source (nothing new for a while) goes out as a ping;
- the client's pings are answered with pongs; its text and binary messages are read and
  dropped (the events flow one way);
- when the source ends, a close frame (1000) goes out and the client's close is awaited (at
  most CLOSE_TIMEOUT), then the TCP connection closes, server first (RFC 6455 §7.1.1);
- when the client closes (a close frame, a FIN, a reset) the source is closed at once; a close
  frame is answered with the same code; a protocol error gets a close with its code (1002,
  1007...) and the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Protocol

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

if TYPE_CHECKING:
    from ..pipeline import SocketMessages
    from .upgrade import ClientPeer

CLOSE_TIMEOUT = 5.0  # how long a client has to answer the sidecar's close frame


class SocketSide(Protocol):
    """What a WebSocket needs of the client's connection (edge/protocol.py)."""

    transport: asyncio.Transport | None

    @property
    def write_paused(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def start_tunnel(self, tunnel: ClientPeer) -> None: ...

    def close(self) -> None: ...


class WebSocket:
    """One accepted WebSocket: `messages` sent to the client until they end or it leaves."""

    __slots__ = ("client", "closed", "messages", "ws")

    def __init__(self, client: SocketSide, messages: SocketMessages) -> None:
        self.client = client
        self.messages = messages
        self.ws = Connection(ConnectionType.SERVER)
        # set when the client is done: its close frame came (or answered ours), or the
        # connection ended
        self.closed = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        """Serve the WebSocket to its end (its 101 is written)."""
        self.client.start_tunnel(self)
        sender = asyncio.ensure_future(self._send_all())
        try:
            await asyncio.wait((sender, self.closed), return_when=asyncio.FIRST_COMPLETED)
            if not self.closed.done():  # the source ended, or failed, with the client there
                failure = sender.exception()
                if failure is not None:
                    if self.ws.state is ConnectionState.OPEN:
                        self._send(CloseConnection(CloseReason.INTERNAL_ERROR))
                    raise failure  # the handler's to log
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closed, CLOSE_TIMEOUT)
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
            await self.messages.aclose()
            self.client.close()

    async def _send_all(self) -> None:
        client = self.client
        async for message in self.messages:
            if self.ws.state is not ConnectionState.OPEN:
                return
            self._send(Ping(b"") if message is None else TextMessage(message))
            if client.write_paused:
                await client.drain()
        if self.ws.state is ConnectionState.OPEN:
            self._send(CloseConnection(CloseReason.NORMAL_CLOSURE))

    def _send(self, event: Event) -> None:
        self.client.write(self.ws.send(event))

    def _done(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    # -- the client's side (upgrade.ClientPeer) -------------------------------------------------

    def from_client(self, data: bytes) -> None:
        ws = self.ws
        if ws.state is ConnectionState.CLOSED:
            return  # after the close handshake: nothing more is read
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Ping):
                if ws.state is ConnectionState.OPEN:
                    self._send(event.response())
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send(event.response())  # the client closed: same code back
                elif ws.state is ConnectionState.OPEN:
                    # wsproto's answer to bytes that break RFC 6455 (a protocol error, text
                    # that is not UTF-8, an unmasked frame): close with its code and go.
                    self._send(event)
                self._done()
                self.client.close()
                return
            # text and binary messages (and pongs) are read and dropped

    def client_eof(self) -> bool:
        self._done()
        return False  # nothing more to say to a client that stopped: close

    def client_lost(self) -> None:
        self._done()

    def client_paused(self) -> None:
        """(The sender waits for the client itself: `drain`.)"""

    def client_resumed(self) -> None:
        """(See `client_paused`.)"""

    def __repr__(self) -> str:
        return f"<WebSocket {self.ws.state.name.lower()}>"
