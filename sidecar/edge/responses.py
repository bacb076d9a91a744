"""Responses as bytes: status lines, response heads built straight from the upstream's raw
headers, and the sidecar's JSON errors. `error_response` is where a SidecarError becomes HTTP
on the public listener."""

from __future__ import annotations

import itertools
import os

import orjson

from ..errors import SidecarError
from ..http.dates import http_date_now
from ..http.headers import HOP_BY_HOP, RawHeaders, connection_tokens

# Request ids need to be unique, not secret: a counter from a random 128-bit start per process
# costs far less than 16 fresh random bytes per request. The top bit set keeps every id at 32
# hex digits; hex() and a slice cost a quarter of format(n, "016x") (4.0k instructions of a
# 59k-instruction cache hit, compiled).
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(16), "big") | (1 << 127))


def new_request_id() -> str:
    return hex(next(_ID_COUNTER))[2:]


_REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    204: "No Content", 206: "Partial Content", 301: "Moved Permanently", 302: "Found",
    304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Content Too Large", 414: "URI Too Long", 422: "Unprocessable Content",
    425: "Too Early", 426: "Upgrade Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 499: "Client Closed Request",
    500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def reason_of(status: int) -> str:
    return _REASONS.get(status, "Unknown")


_STATUS_LINES: dict[tuple[int, str], bytes] = {}


def status_line(status: int, reason: str) -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`, formatted once per status and reason."""
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        text = reason.encode("latin-1", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
        line = b"HTTP/1.1 %d %s\r\n" % (status, text or reason_of(status).encode())
        if len(_STATUS_LINES) < 256:  # reasons come from upstreams: bound what is kept
            _STATUS_LINES[(status, reason)] = line
    return line


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
# Fields of the upstream's head the writer sets itself, or drops.
_SPECIAL = HOP_BY_HOP | {b"via", b"date", b"content-length", b"x-request-id"}


def response_head(status: int, reason: str, raw: RawHeaders, request_id: str, via: bytes, *,
                  length: int | None, keep_length: bool = False, extra: bytes = b"",
                  framing: bytes = b"", upgrade: bool = False,
                  named: frozenset[bytes] | None = None) -> bytes:
    """A response head for the client from the upstream's raw headers: hop-by-hop fields and
    those its Connection names dropped, `Date` added when missing, `Via` appended to, our
    `X-Request-ID`. `length` sets Content-Length; `keep_length` keeps the upstream's instead
    (a streamed body framed by it, or HEAD); `framing` adds the connection's own lines
    (`Transfer-Encoding: chunked`, `Connection: close`); `upgrade` keeps Upgrade (a 101).
    `named`: the fields the upstream's Connection header names (found by a first pass)."""
    out = [status_line(status, reason)]
    special = _SPECIAL if named is None else _SPECIAL | named
    connection: bytes | None = None
    via_seen: bytes | None = None
    has_date = False
    for name, value in raw:
        lname = name.lower()
        if lname in special:
            if named is not None and lname in named:
                continue
            if lname == b"connection":
                if value not in _PLAIN_CONNECTION:
                    connection = value if connection is None else connection + b"," + value
                continue
            if lname == b"via":
                via_seen = value if via_seen is None else via_seen + b", " + value
                continue
            if lname == b"date":
                has_date = True
            elif not ((lname == b"content-length" and keep_length)
                      or (lname == b"upgrade" and upgrade)):
                continue
        out += (name, b": ", value, b"\r\n")  # no joined temporaries: one join at the end
    if connection and named is None:
        # The upstream's Connection names fields of its own (rare): they go too.
        tokens = connection_tokens(connection.decode("latin-1"))
        if upgrade:
            tokens -= {b"upgrade"}
        if tokens:
            return response_head(status, reason, raw, request_id, via, length=length,
                                 keep_length=keep_length, extra=extra, framing=framing,
                                 upgrade=upgrade, named=tokens)
    if not has_date:
        out += (b"Date: ", http_date_now(), b"\r\n")
    if length is not None:
        out.append(b"Content-Length: %d\r\n" % length)
    if extra:
        out.append(extra)
    out += (b"Via: ", via_seen + b", " + via if via_seen else via, b"\r\nX-Request-ID: ",
            request_id.encode("latin-1"), b"\r\n")
    if framing:
        out.append(framing)
    out.append(b"\r\n")
    return b"".join(out)


# Not passed on with an interim response: hop-by-hop fields, and a length (a 1xx has no content).
_INTERIM_DROPPED = HOP_BY_HOP | {b"content-length", b"x-request-id"}


def interim_head(status: int, reason: str, raw: RawHeaders, via: bytes) -> bytes:
    """An interim (1xx) response for the client from the upstream's: its fields but hop-by-hop
    ones, those its Connection names, Content-Length and X-Request-ID; `Via` appended to.
    Nothing else is added (no Date, no request id: the answer that follows has them)."""
    drop = _INTERIM_DROPPED
    connection = [value for name, value in raw if name.lower() == b"connection"]
    if connection:
        drop = drop | connection_tokens(b",".join(connection).decode("latin-1"))
    out = [status_line(status, reason)]
    via_seen: bytes | None = None
    for name, value in raw:
        lname = name.lower()
        if lname in drop:
            continue
        if lname == b"via":
            via_seen = value if via_seen is None else via_seen + b", " + value
            continue
        out += (name, b": ", value, b"\r\n")
    out += (b"Via: ", via_seen + b", " + via if via_seen else via, b"\r\n\r\n")
    return b"".join(out)


def error_body(exc: SidecarError, request_id: str) -> bytes:
    return orjson.dumps({"error": exc.code, "detail": exc.detail, "request_id": request_id})


def error_response(exc: SidecarError, request_id: str, *, close: bool = False,
                   head_only: bool = False) -> bytes:
    """The sidecar's JSON error as a whole HTTP/1.1 response. `close`: the connection ends
    after it (also when the error says so)."""
    body = error_body(exc, request_id)
    out = [status_line(exc.status, reason_of(exc.status)),
           b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
           b"Date: " + http_date_now() + b"\r\nCache-Control: no-store\r\n"]
    for name, value in exc.headers.items():
        out.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    out.append(b"X-Request-ID: " + request_id.encode("latin-1") + b"\r\n")
    if close or exc.close_connection:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    if not head_only:
        out.append(body)
    return b"".join(out)
