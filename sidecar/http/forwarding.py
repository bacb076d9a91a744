"""What the upstream sees of a client's request: the request line and headers, rebuilt from
the client's raw headers with hop-by-hop fields dropped and the forwarding fields set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .headers import HOP_BY_HOP, connection_tokens

if TYPE_CHECKING:
    from ..routing import Route
    from .request import RequestHead

_REPLACED = frozenset({
    b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via",
    b"x-request-id",
})
_PLAIN_VALUES = frozenset({"keep-alive", "close"})
# Never dropped because the client's Connection names them: a body forwarded without its
# Content-Length would be read by the upstream as the next request (smuggled), and Host is what
# the route was chosen by.
_FRAMING = frozenset({b"content-length", b"host"})
# Hop-by-hop fields, and lookalikes of the framing fields that CGI-style servers (`_` read as
# `-`) could take for the real ones: the body would then be framed two ways.
_DROPPED = HOP_BY_HOP | {b"transfer_encoding", b"content_length"}
# An upgrade keeps its Upgrade field: the upstream must see what the client asks to switch to.
_DROPPED_UPGRADE = _DROPPED - {b"upgrade"}


def build_request_head(request: RequestHead, route: Route, request_id: str, chunked: bool,
                       *, upgrade: bool = False) -> bytes:
    """The request line and headers for the upstream, from the client's raw headers.
    `upgrade`: the request asks to switch protocols (WebSocket...) and the upstream is to see
    that (Upgrade kept, `Connection: upgrade`)."""
    headers = request.headers
    # Every Connection header names hop-by-hop fields, not only the first one.
    connections = headers.getall("Connection") if "Connection" in headers else ()
    base = _DROPPED_UPGRADE if upgrade else _DROPPED
    if not connections or (len(connections) == 1 and connections[0].lower() in _PLAIN_VALUES):
        drop = base
    else:
        drop = base | (connection_tokens(",".join(connections)) - _FRAMING)
        if upgrade:
            drop = drop - {b"upgrade"}
    host = xff = xfproto = xfhost = via = None
    target = request.origin_target.encode("utf-8", "surrogateescape")
    out = [request.method.encode("latin-1"), b" ", target, b" HTTP/1.1\r\n"]
    append = out.append
    for name, value in headers.raw:
        lname = name.lower()
        if lname in drop:
            continue
        if lname in _REPLACED:
            if lname == b"host":
                host = value
            elif lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lname == b"via":
                via = value if via is None else via + b", " + value
            elif lname == b"x-forwarded-proto":
                xfproto = value
            elif lname == b"x-forwarded-host":
                xfhost = value
            continue
        append(name)
        append(b": ")
        append(value)
        append(b"\r\n")
    client = request.client.encode("latin-1")
    trust = route.trust_forwarded
    # The sidecar's own fields in one format (one C call rather than a dozen joins).
    append(b"Host: %b\r\nX-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\n" % (
        host if route.preserve_host and host is not None else route.netloc,
        xff + b", " + client if xff else client,
        xfproto if trust and xfproto else request.scheme.encode("latin-1")))
    if trust and xfhost:
        append(b"X-Forwarded-Host: " + xfhost + b"\r\n")
    elif host is not None:
        append(b"X-Forwarded-Host: " + host + b"\r\n")
    append(b"Via: %b%b %b\r\nX-Request-ID: %b\r\n" % (
        via + b", " if via else b"", b"1.1" if request.http11 else b"1.0", route.via,
        request_id.encode("latin-1")))
    if upgrade:
        append(b"Connection: upgrade\r\n")
    if chunked:
        append(b"Transfer-Encoding: chunked\r\n")
    append(b"\r\n")
    return b"".join(out)
