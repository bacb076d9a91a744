"""The sidecar's own exceptions; each knows the HTTP status it becomes
(edge/responses.error_response).

Foreign exceptions (OSError, asyncio.TimeoutError, parser errors) are translated into these at
the boundary that sees them (upstream.py), so the edge maps one small tree to responses.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


class SidecarError(Exception):
    status: int = 500
    code: str = "internal_error"
    # Fields the error response carries besides the fixed ones (Retry-After, RateLimit-*):
    # the raiser knows them, edge/responses.error_response only copies them.
    headers: Mapping[str, str] = MappingProxyType({})
    # The connection cannot carry another request after this error's response (the rest of the
    # request is unread, or its framing is suspect): the edge closes it after the answer.
    close_connection: bool = False

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if headers:
            self.headers = headers


class NoRouteError(SidecarError):
    status = 404
    code = "no_route"


class BadRequestError(SidecarError):
    status = 400
    code = "bad_request"


class UnauthorizedError(SidecarError):
    """The admin listener's bearer token is missing or wrong."""

    status = 401
    code = "unauthorized"


class RequestLineTooLongError(SidecarError):
    """Over server.limits.max_request_line (found while parsing, see edge/protocol.py)."""

    status = 414
    code = "request_line_too_long"
    close_connection = True


class RequestHeadersTooLargeError(SidecarError):
    """A header field over server.limits.max_header_size, or more than max_headers fields."""

    status = 431
    code = "request_headers_too_large"
    close_connection = True


class RequestTimeoutError(SidecarError):
    """The client stopped sending its request head or body (server.limits.*_timeout)."""

    status = 408
    code = "request_timeout"
    close_connection = True


class RequestBodyTooLargeError(SidecarError):
    """Over server.limits.max_body: by its Content-Length, or as a chunked body grows."""

    status = 413
    code = "request_body_too_large"
    close_connection = True


class MalformedRequestError(BadRequestError):
    """Framing the sidecar will not forward: what two parsers could read differently."""

    code = "malformed_request"
    close_connection = True


class TransferCodingNotImplementedError(SidecarError):
    """A Transfer-Encoding other than `chunked` (as nginx: the sidecar decodes no other)."""

    status = 501
    code = "transfer_coding_not_implemented"
    close_connection = True


class HttpVersionNotSupportedError(SidecarError):
    status = 505
    code = "http_version_not_supported"
    close_connection = True


class UpstreamError(SidecarError):
    """The upstream could not give a response."""

    status = 502
    code = "bad_gateway"

    def __init__(self, upstream: str, detail: str, *,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.upstream = upstream


class UpstreamConnectError(UpstreamError):
    status = 502
    code = "upstream_connect_error"


class UpstreamProtocolError(UpstreamError):
    status = 502
    code = "upstream_protocol_error"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamUnavailableError(UpstreamError):
    """No connection could be had from the pool in time."""

    status = 503
    code = "upstream_busy"


class IdempotencyKeyInvalidError(BadRequestError):
    """The Idempotency-Key header is empty, repeated or too long to be a key."""

    status = 400
    code = "idempotency_key_invalid"


class IdempotencyConflictError(SidecarError):
    """The first request with this key is still in flight, or its response cannot be replayed."""

    status = 409
    code = "idempotency_key_in_use"


class IdempotencyMismatchError(SidecarError):
    """The key was first used for another request (method, target or body differ)."""

    status = 422
    code = "idempotency_key_reused"


class IdempotencyBodyTooLargeError(SidecarError):
    """The body is read whole to fingerprint it; past the configured bound it is refused."""

    status = 413
    code = "request_body_too_large"


class RateLimitedError(SidecarError):
    """The caller's token bucket is empty; the headers say when to come back."""

    status = 429
    code = "rate_limited"


class MethodNotAllowedError(SidecarError):
    status = 405
    code = "method_not_allowed"


class TunnelNotAllowedError(MethodNotAllowedError):
    """CONNECT: a reverse proxy opens no tunnels, and what follows the request would be one."""

    close_connection = True


class OffloadBodyTooLargeError(SidecarError):
    """An offloaded request's body is stored whole in Redis; past offload.max_body it is
    refused."""

    status = 413
    code = "request_body_too_large"


class JobScheduleInvalidError(BadRequestError):
    """`Prefer: run-at=` or `delay=` that cannot be read, or later than offload.max_delay."""

    status = 400
    code = "job_schedule_invalid"


class JobQueueUnavailableError(SidecarError):
    """Redis cannot be reached: the request was not queued, and nothing was sent upstream."""

    status = 503
    code = "job_queue_unavailable"


class JobQueueFullError(SidecarError):
    """The queue holds queues.<name>.max_queued jobs waiting: this one was not queued."""

    status = 503
    code = "job_queue_full"


class JobNotFoundError(SidecarError):
    """No such job, it expired, or it belongs to another client (never said which)."""

    status = 404
    code = "job_not_found"


class JobResultUnreadableError(SidecarError):
    """The stored result is sealed with a key no longer in redis.encryption_keys, or altered:
    never served as if it were the response."""

    status = 500
    code = "job_result_unreadable"


class JobNotFinishedError(SidecarError):
    status = 425
    code = "job_not_finished"


class JobFinishedError(SidecarError):
    """The job failed or was cancelled, so it has no result; or it is over and cannot be
    cancelled."""

    status = 409
    code = "job_finished"


class WebSocketHandshakeError(BadRequestError):
    """A WebSocket request the sidecar answers itself (a job's events) that RFC 6455 §4.2.1
    refuses: no Sec-WebSocket-Key or a malformed one, not GET, not HTTP/1.1."""

    code = "bad_websocket_handshake"


class WebSocketVersionError(SidecarError):
    """A Sec-WebSocket-Version other than 13: the answer names the version the sidecar speaks
    (RFC 6455 §4.4) and the protocol to upgrade to (RFC 9110 §15.5.22)."""

    status = 426
    code = "websocket_version_not_supported"
