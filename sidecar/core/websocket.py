"""The opening handshake of a WebSocket the sidecar answers itself (RFC 6455 §4.2), without
I/O: whether a request asks for one, and the `Sec-WebSocket-Accept` it gets, or why not.

Upgrades on proxied routes never come here: their handshake is the upstream's, and the edge
only joins the two connections (edge/upgrade.py). The frames after a handshake are wsproto's
(edge/websocket.py).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from wsproto.utilities import generate_accept_token

VERSION = "13"  # the only version RFC 6455 defines, and what a refusal names (§4.4)


class HandshakeRefused(ValueError):
    """The request asks for a WebSocket but breaks §4.2.1; `status` is the answer's: 426 for
    a version the sidecar does not speak (§4.4), else 400."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


def _tokens(values: Sequence[bytes]) -> set[bytes]:
    return {token.strip().lower() for value in values for token in value.split(b",")}


def wants_websocket(upgrade: Sequence[bytes]) -> bool:
    """Whether the request's `Upgrade` fields name `websocket` (§4.2.1 item 3). A request that
    asks for another protocol is answered as plain HTTP (RFC 9110 §7.8 lets a server ignore
    Upgrade)."""
    return b"websocket" in _tokens(upgrade)


def accept_token(*, method: str, http11: bool, connection: Sequence[bytes],
                 versions: Sequence[bytes], keys: Sequence[bytes]) -> bytes:
    """`Sec-WebSocket-Accept` for a request that wants a WebSocket (`wants_websocket`), from its
    method, version and every value of its `Connection`, `Sec-WebSocket-Version` and
    `Sec-WebSocket-Key` fields; HandshakeRefused says what is wrong."""
    if method != "GET":
        raise HandshakeRefused(f"a WebSocket opens with GET, not {method} (RFC 6455 §4.1)")
    if not http11:
        raise HandshakeRefused("a WebSocket opens with an HTTP/1.1 request (RFC 6455 §4.1)")
    if b"upgrade" not in _tokens(connection):
        raise HandshakeRefused("a WebSocket request needs 'Connection: Upgrade' "
                               "(RFC 6455 §4.2.1)")
    if not versions:
        raise HandshakeRefused(f"Sec-WebSocket-Version is missing; send "
                               f"'Sec-WebSocket-Version: {VERSION}' (RFC 6455 §4.2.1)")
    if _tokens(versions) != {VERSION.encode()}:
        offered = b", ".join(versions).decode("latin-1")[:100]
        raise HandshakeRefused(f"Sec-WebSocket-Version {offered!r} is not supported; "
                               f"this server speaks version {VERSION} (RFC 6455 §4.4)", 426)
    if len(keys) != 1:
        raise HandshakeRefused("a WebSocket request needs exactly one Sec-WebSocket-Key "
                               "(RFC 6455 §4.2.1)")
    key = keys[0].strip()
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeRefused("Sec-WebSocket-Key must be 16 random bytes in base64 "
                               "(24 characters; RFC 6455 §4.2.1)")
    return generate_accept_token(key)
