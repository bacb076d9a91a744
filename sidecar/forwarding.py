"""What the upstream sees of a client's request: the request line and headers, rebuilt from
the client's raw headers with hop-by-hop fields dropped and the forwarding fields set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import hdrs

if TYPE_CHECKING:
    from aiohttp import web

    from .app import State
    from .routing import Route

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection. Expect is answered
# by the sidecar itself (100 Continue), not forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection", b"expect",
})
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


def connection_tokens(value: str) -> frozenset[bytes]:
    return frozenset(t.strip().lower().encode("latin-1") for t in value.split(",") if t.strip())


def build_request_head(request: web.BaseRequest, state: State, route: Route,
                       request_id: str, chunked: bool) -> bytes:
    """The request line and headers for the upstream, from the client's raw headers."""
    upstream = state.upstream_configs[route.upstream]
    # Every Connection header names hop-by-hop fields, not only the first one.
    connections = request.headers.getall(hdrs.CONNECTION, ())
    if not connections or (len(connections) == 1 and connections[0].lower() in _PLAIN_VALUES):
        drop = _DROPPED
    else:
        drop = _DROPPED | (connection_tokens(",".join(connections)) - _FRAMING)
    host = xff = xfproto = xfhost = via = None
    raw_path = request.raw_path
    if raw_path[:1] != "/" and raw_path != "*":
        # Absolute-form (`GET http://other/x`): the route was chosen by the Host header, so the
        # upstream gets that same view, origin-form, rather than an authority of its own.
        raw_path = request.rel_url.raw_path_qs
    target = raw_path.encode("utf-8", "surrogateescape")
    out = [request.method.encode("latin-1"), b" ", target, b" HTTP/1.1\r\n"]
    append = out.append
    for name, value in request.raw_headers:
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
    client = (request.remote or "").encode("latin-1")
    if not upstream.preserve_host or host is None:
        out_host = state.upstream_netlocs[route.upstream]
    else:
        out_host = host
    trust = state.config.server.trust_forwarded
    append(b"Host: " + out_host + b"\r\n")
    append(b"X-Forwarded-For: " + (xff + b", " + client if xff else client) + b"\r\n")
    append(b"X-Forwarded-Proto: "
           + (xfproto if trust and xfproto else request.scheme.encode("latin-1")) + b"\r\n")
    if trust and xfhost:
        append(b"X-Forwarded-Host: " + xfhost + b"\r\n")
    elif host is not None:
        append(b"X-Forwarded-Host: " + host + b"\r\n")
    version = b"1.1 " if request.version[1] == 1 else b"1.0 "
    append(b"Via: " + (via + b", " if via else b"") + version + state.via + b"\r\n")
    append(b"X-Request-ID: " + request_id.encode("latin-1") + b"\r\n")
    if chunked:
        append(b"Transfer-Encoding: chunked\r\n")
    append(b"\r\n")
    return b"".join(out)


