"""The WebSocket opening handshake the sidecar answers itself (RFC 6455 §4.2), without
sockets: every refusal and the accept token."""

from __future__ import annotations

import pytest

from sidecar.core.websocket import HandshakeRefused, accept_token, wants_websocket

# RFC 6455 §1.3's own example.
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
GOOD = {"method": "GET", "http11": True, "connection": [b"keep-alive, Upgrade"],
        "versions": [b"13"], "keys": [KEY]}


def test_the_accept_token_is_the_rfcs() -> None:
    assert accept_token(**GOOD) == ACCEPT  # type: ignore[arg-type]


@pytest.mark.parametrize(("upgrade", "wanted"), [
    ([b"websocket"], True), ([b"WebSocket"], True), ([b"foo, websocket"], True),
    ([b"h2c"], False), ([], False), ([b"websockets"], False),
])
def test_wants_websocket(upgrade: list[bytes], wanted: bool) -> None:
    assert wants_websocket(upgrade) is wanted


@pytest.mark.parametrize(("change", "status", "says"), [
    ({"method": "POST"}, 400, "opens with GET"),
    ({"http11": False}, 400, "HTTP/1.1"),
    ({"connection": [b"keep-alive"]}, 400, "Connection: Upgrade"),
    ({"versions": []}, 400, "Sec-WebSocket-Version is missing"),
    ({"versions": [b"8"]}, 426, "speaks version 13"),
    ({"versions": [b"13, 8"]}, 426, "speaks version 13"),
    ({"keys": []}, 400, "exactly one Sec-WebSocket-Key"),
    ({"keys": [KEY, KEY]}, 400, "exactly one Sec-WebSocket-Key"),
    ({"keys": [b"short"]}, 400, "16 random bytes"),
    ({"keys": [b"!!!!not base64!!!!!!!!=="]}, 400, "16 random bytes"),
])
def test_refusals(change: dict[str, object], status: int, says: str) -> None:
    with pytest.raises(HandshakeRefused) as refused:
        accept_token(**{**GOOD, **change})  # type: ignore[arg-type]
    assert refused.value.status == status
    assert says in refused.value.detail
