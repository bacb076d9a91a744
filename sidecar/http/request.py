"""`RequestHead`: what the sidecar knows of a client's request before its body, owned by the
sidecar rather than by a web framework, so policies run (and are tested) without one."""

from __future__ import annotations

from urllib.parse import unquote

from .headers import Headers


class RequestHead:
    """The request line and headers of one client request, as parsed by the edge.

    `target` is the request target as sent, what cache and dedup keys are made of;
    `origin_target` the same in origin-form (`/path?query`), what the upstream gets: an
    absolute-form target (`GET http://other/x`) loses its authority, since the route is chosen
    by Host. `path` is the percent-decoded path routes match; `query` the raw query.
    """

    __slots__ = ("chunked", "client", "content_length", "headers", "host", "http11",
                 "keep_alive", "method", "origin_target", "path", "query", "raw_path", "scheme",
                 "target")

    def __init__(self, method: str, target: str, headers: Headers, http11: bool = True,
                 client: str = "", scheme: str = "http", keep_alive: bool = True,
                 content_length: int | None = None, chunked: bool = False,
                 origin_target: str | None = None) -> None:
        self.method = method
        self.target = target
        self.origin_target = target if origin_target is None else origin_target
        raw_path, _, query = self.origin_target.partition("?")
        self.raw_path = raw_path
        self.query = query
        # Attributes, not properties: both are read on every request.
        self.path = (raw_path if "%" not in raw_path  # percent-decoded: what routes match
                     else unquote(raw_path, errors="surrogateescape"))
        host = headers.get_bytes(b"host")
        self.host = "" if host is None else host.decode("latin-1")  # '' when there is none
        self.headers = headers
        self.http11 = http11
        self.client = client
        self.scheme = scheme
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked

    @property
    def version(self) -> str:
        return "1.1" if self.http11 else "1.0"

    def __repr__(self) -> str:
        return f"<RequestHead {self.method} {self.target[:80]} HTTP/{self.version}>"
