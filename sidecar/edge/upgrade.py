"""After a 101: the client's connection and the upstream's joined byte for byte, as nginx does
for WebSocket and any other protocol an `Upgrade` asks for. Neither side's bytes are parsed:
the sidecar only carries them, with back-pressure (a side whose peer cannot keep up stops being
read), and passes on half-closes and closes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..upstream import UpstreamTunnel


class ClientPeer(Protocol):
    """What takes over a client's connection once it stops speaking HTTP (a 101): a Tunnel to
    the upstream, or the sidecar's own WebSocket (edge/websocket.py). The connection
    (edge/protocol.py) hands it every byte and event from then on."""

    def from_client(self, data: bytes) -> None: ...

    def client_eof(self) -> bool:
        """The client half-closed; True keeps the connection open for writing."""
        ...

    def client_lost(self) -> None: ...

    def client_paused(self) -> None:
        """The client's write buffer is full."""
        ...

    def client_resumed(self) -> None: ...


class ClientSide(Protocol):
    """What a tunnel needs of the client's connection (edge/protocol.py)."""

    client: str  # the peer's address, for logs
    transport: asyncio.Transport | None

    def start_tunnel(self, tunnel: ClientPeer) -> None: ...

    def close(self) -> None: ...


class Tunnel:
    """Joins the client's connection (an EdgeProtocol) and an UpstreamTunnel (the upstream)."""

    __slots__ = ("client", "client_done", "closed", "upstream", "upstream_done")

    def __init__(self, client: ClientSide, upstream: UpstreamTunnel) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False
        # each side's end of stream (a half-close); once both have ended, both close
        self.client_done = False
        self.upstream_done = False

    def open(self) -> None:
        self.client.start_tunnel(self)
        self.upstream.attach(self)

    # -- the client's side -----------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.upstream.write(data)

    def client_eof(self) -> bool:
        self.client_done = True
        self.upstream.write_eof()
        if self.upstream_done:
            self._close()
        return True  # half-closed: the upstream may still answer

    def client_lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.upstream.close()

    def client_paused(self) -> None:
        self.upstream.pause_reading()

    def client_resumed(self) -> None:
        self.upstream.resume_reading()

    # -- the upstream's side (TunnelPeer) --------------------------------------------------------

    def tunnel_data(self, data: bytes) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.write(data)

    def tunnel_eof(self) -> None:
        self.upstream_done = True
        transport = self.client.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        if self.client_done:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()
            self.upstream.close()

    def tunnel_closed(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()

    def tunnel_pause(self) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.pause_reading()

    def tunnel_resume(self) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.resume_reading()

    def __repr__(self) -> str:
        return f"<Tunnel {self.client.client} <-> {self.upstream!r} closed={self.closed}>"
