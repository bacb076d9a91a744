"""The compiled route table: request method/host/path/headers -> Route, first match wins."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import Config, RouteConfig
from .core.globs import Matcher, compile_host_glob, compile_path_glob
from .errors import BadRequestError


def resolved(path: str) -> str:
    """The (percent-decoded) path as an upstream that normalises reads it: `\\` as `/`, each
    segment's `;parameters` dropped (servlet containers), empty segments merged, `.` and `..`
    resolved (RFC 3986 §5.2.4)."""
    segments = [segment.partition(";")[0] for segment in path.replace("\\", "/").split("/")]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    trailing = "/" if out and segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(out) + trailing


@dataclass(frozen=True, slots=True)
class Route:
    """A route compiled for the request path: its matchers, and what forwarding needs of its
    upstream and of the server settings on every request, read here rather than looked up."""

    name: str
    upstream: str
    config: RouteConfig
    methods: frozenset[str] | None
    path: Matcher
    host: Matcher | None
    headers: tuple[tuple[str, str], ...]
    netloc: bytes = b""  # the upstream's host[:port], the Host it gets unless preserve_host
    preserve_host: bool = True
    trust_forwarded: bool = False  # server.trust_forwarded
    via: bytes = b"sidecar"  # server.via, this hop's name in Via
    timeout: float | None = None  # the route's own upstream timeout, if it sets one

    def matches(self, method: str, host: str, path: str, headers: Mapping[str, str]) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if not self.path(path):
            return False
        if self.host is not None and not self.host(host):
            return False
        if not self.headers:
            return True
        return all(headers.get(name) == value for name, value in self.headers)


def compile_route(route: RouteConfig, config: Config) -> Route:
    match = route.match
    methods = frozenset(match.methods) if match.methods is not None else None
    upstream = config.upstreams[route.upstream]
    return Route(
        name=route.name,
        upstream=route.upstream,
        config=route,
        methods=methods,
        path=compile_path_glob(match.path),
        host=compile_host_glob(match.host) if match.host else None,
        headers=tuple(match.headers.items()),
        netloc=upstream.netloc.encode("idna"),
        preserve_host=upstream.preserve_host,
        trust_forwarded=config.server.trust_forwarded,
        via=config.server.via.encode("latin-1"),
        timeout=route.timeout,
    )


class RouteTable:
    def __init__(self, config: Config) -> None:
        self.routes = tuple(compile_route(route, config) for route in config.routes)

    def match(
        self, method: str, host: str, path: str, headers: Mapping[str, str]
    ) -> Route | None:
        """The first route matching the request; `path` is percent-decoded.

        The upstream gets the target as sent, and it may read it as sent or normalised
        (`resolved`). Either way the same route must apply, else `/api/./admin` would slip
        past the policies of `/api/admin/**`: a path that routes one way as sent and another
        once resolved is refused (BadRequestError)."""
        for route in self.routes:
            if route.matches(method, host, path, headers):
                break
        else:
            route = None
        # What an upstream may resolve differently from the path as sent: dot segments, empty
        # ones, `;parameters`, backslashes (four substring tests: cheaper than one regex).
        if "/." in path or "//" in path or ";" in path or "\\" in path:
            normal = resolved(path)
            if normal != path and self._first(method, host, normal, headers) is not route:
                raise BadRequestError(
                    f"the path {path[:200]!r} reads as {normal[:200]!r} once '.', '..', '//', "
                    "';' parameters or '\\' are resolved, and the two are routed differently: "
                    "send the path resolved")
        return route

    def _first(
        self, method: str, host: str, path: str, headers: Mapping[str, str]
    ) -> Route | None:
        for route in self.routes:
            if route.matches(method, host, path, headers):
                return route
        return None

    def __repr__(self) -> str:
        return f"<RouteTable {[r.name for r in self.routes]}>"
