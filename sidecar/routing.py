"""The compiled route table: request method/host/path/headers -> Route, first match wins."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import Config, RouteConfig
from .core.globs import Matcher, compile_host_glob, compile_path_glob


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: str
    config: RouteConfig
    methods: frozenset[str] | None
    path: Matcher
    host: Matcher | None
    headers: tuple[tuple[str, str], ...]

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


def compile_route(config: RouteConfig) -> Route:
    match = config.match
    methods = frozenset(match.methods) if match.methods is not None else None
    return Route(
        name=config.name,
        upstream=config.upstream,
        config=config,
        methods=methods,
        path=compile_path_glob(match.path),
        host=compile_host_glob(match.host) if match.host else None,
        headers=tuple(match.headers.items()),
    )


class RouteTable:
    def __init__(self, config: Config) -> None:
        self.routes = tuple(compile_route(route) for route in config.routes)

    def match(
        self, method: str, host: str, path: str, headers: Mapping[str, str]
    ) -> Route | None:
        for route in self.routes:
            if route.matches(method, host, path, headers):
                return route
        return None

    def __repr__(self) -> str:
        return f"<RouteTable {[r.name for r in self.routes]}>"
