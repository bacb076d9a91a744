"""Typed, frozen configuration: loaded from YAML once, validated once, with located errors.

Every problem is reported with its file, key path (route names spelled out) and line, e.g.
`config.yaml:14: routes[1] (products).timeout: expected a duration like '30s', got 'soon'`.
"""

from __future__ import annotations

import difflib
import glob
import ipaddress
import itertools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .core.encoding import DEFAULT_TYPES
from .core.schedule import Cron, Every, Ticks, zone
from .core.units import format_size, parse_duration, parse_percent, parse_size
from .crypto import parse_key

# --- value types -------------------------------------------------------------------------------


def _optional(parse: typing.Callable[[object], Any]) -> typing.Callable[[object], Any]:
    return lambda v: None if v is None else parse(v)


Duration = Annotated[float, BeforeValidator(parse_duration)]
OptionalDuration = Annotated[float | None, BeforeValidator(_optional(parse_duration))]
Size = Annotated[int, BeforeValidator(parse_size)]
Percent = Annotated[float, BeforeValidator(parse_percent)]


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", value)
        if match:
            host = match.group(1) or match.group(3)
            port = int(match.group(2) or match.group(4))
            if port <= 65535:
                return Address(host, port)
    raise ValueError(f"expected an address like '0.0.0.0:8080' or '[::1]:8080', got {value!r}")


Listen = Annotated[Address, BeforeValidator(parse_address)]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections ----------------------------------------------------------------------------------


class LimitsConfig(_Model):
    """What one client request may be, and how slowly it may arrive (docs/configuration.md,
    `server.limits`). Enforced by the edge while it parses (sidecar/edge/protocol.py)."""

    max_request_line: Size = Field(8190, ge=256, le=1024**2)  # else 414
    max_header_size: Size = Field(8190, ge=256, le=1024**2)  # one field, name and value; else 431
    max_headers: int = Field(100, ge=1, le=10000)  # else 431
    # Proxied request bodies; larger ones get 413 before anything reaches the upstream (by
    # Content-Length), or are cut when a chunked one grows past it. Larger than nginx's 1m:
    # sidecar apps take uploads, and the body streams, so the size costs no memory.
    max_body: Size = Field(64 * 1024**2, gt=0)
    header_timeout: Duration = Field(10.0, gt=0)  # the whole request head, from its first byte
    body_timeout: Duration = Field(30.0, gt=0)  # the longest pause while a body is arriving


class TlsConfig(_Model):
    """TLS on the public listener (docs/operations.md, TLS); paths relative to the config file."""

    cert: str  # PEM: the certificate, then its chain
    key: str  # PEM: its private key
    min_version: Literal["1.2", "1.3"] = "1.2"
    client_ca: str | None = None  # PEM: require client certificates signed by these CAs


class ServerConfig(_Model):
    listen: Listen = Address("0.0.0.0", 8080)
    admin_listen: Listen = Address("127.0.0.1", 9901)
    workers: int = Field(1, ge=1, le=256)
    shutdown_grace: Duration = 30.0
    keepalive_timeout: Duration = 75.0
    state_dir: str = ".sidecar"
    # Keep X-Forwarded-Proto/-Host sent by the client instead of overwriting them: only behind a
    # trusted load balancer that sets them itself.
    trust_forwarded: bool = False
    watch_config: bool = True
    watch_interval: Duration = 1.0
    via: str = "sidecar"
    limits: LimitsConfig = LimitsConfig()
    tls: TlsConfig | None = None


class RedisConfig(_Model):
    url: str = "embedded"
    binary: str = "redis-server"
    connect_timeout: Duration = 1.0
    health_interval: Duration = 1.0
    # The embedded Redis's maxmemory past what the L2 quota and the bounded queues need: room
    # for idempotency records, dedup hand-offs, finished jobs' results, jobs in backoff, breakers,
    # rate limits and Redis's own buffers (docs/caching.md, "The embedded Redis").
    headroom: Size = 256 * 1024**2
    # AES-256-GCM keys (base64 of 32 bytes, `sidecar keygen`): the first seals what the sidecar
    # stores in Redis from clients and upstreams, every one opens (crypto.py; docs/security.md).
    encryption_keys: list[str] = []

    @field_validator("encryption_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        parsed = [parse_key(key) for key in keys]
        if len(set(parsed)) != len(parsed):
            raise ValueError("the same key is listed twice")
        return keys

    def keys(self) -> list[bytes]:
        return [parse_key(key) for key in self.encryption_keys]

    @field_validator("headroom")
    @classmethod
    def _check_headroom(cls, value: int) -> int:
        if value < 8 * 1024**2:
            raise ValueError("Redis takes a few MiB of its own before it holds anything, and "
                             "a full one refuses jobs: give at least 8MiB, like '256MiB'")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if url == "embedded" or re.match(r"^(redis|rediss|unix)://", url):
            return url
        raise ValueError(
            f"expected 'embedded' or a URL like redis://host:6379/0, rediss://... or "
            f"unix:///path/redis.sock, got {url!r}"
        )


class BreakerConfig(_Model):
    failures: int = Field(5, ge=1)  # consecutive failures that open the breaker
    reset: Duration = Field(30.0, gt=0)  # open -> half-open after this
    failure_on: list[Literal["5xx", "timeout", "connect"]] = ["5xx", "timeout", "connect"]
    exclude_status: list[int] = [501]
    scope: Literal["local", "cluster"] = "local"
    fallback: Literal["stale", "error"] = "error"
    half_open_trials: int = Field(1, ge=1)  # requests let through while half-open


class RetryConfig(_Model):
    attempts: int = Field(2, ge=0)  # extra attempts, idempotent methods only
    backoff: Duration = 0.1  # base of the exponential backoff, with full jitter
    max_backoff: Duration = 2.0
    on: list[str] = ["connect", "502", "503", "504"]
    budget: Annotated[float, BeforeValidator(parse_percent)] = 0.2

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `on:` key as the boolean true.
        if isinstance(data, dict) and True in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("on", mode="before")
    @classmethod
    def _check_on(cls, outcomes: Any) -> Any:
        if not isinstance(outcomes, list):
            return outcomes
        outcomes = [str(o) if isinstance(o, int) and not isinstance(o, bool) else o
                    for o in outcomes]
        for outcome in outcomes:
            if not isinstance(outcome, str):
                raise ValueError(f"retry.on takes 'connect', 'timeout' or 5xx statuses, "
                                 f"got {outcome!r}")
            if outcome not in ("connect", "timeout") and not (
                    outcome.isdigit() and 500 <= int(outcome) <= 599):
                raise ValueError(
                    f"retry.on takes 'connect', 'timeout' or 5xx statuses like '503', "
                    f"got {outcome!r}")
        return outcomes


def _rate(value: object) -> float:
    """`100/s`, `6000/m`, `10/h` -> tokens per second."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*", value)
        if match:
            per = {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]
            rate = float(match.group(1)) / per
            if 0 < rate < float("inf"):
                return rate
    raise ValueError(f"expected a rate like '100/s', '6000/m' or '10/h', got {value!r}")


class WindowRate(NamedTuple):
    """`5/s`: at most `starts` in any `period` seconds (a sliding window, not a bucket)."""

    starts: int
    period: float

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period)
        return f"{self.starts}/{unit}" if unit else f"{self.starts}/{self.period:g}s"


def _window_rate(value: object) -> object:
    if isinstance(value, WindowRate) or value is None:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(s|m|h)\s*", value)
        if match and int(match.group(1)) >= 1:
            return WindowRate(int(match.group(1)),
                              {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)])
    raise ValueError(f"expected a whole number per second, minute or hour like '5/s', '10/m' "
                     f"or '100/h', got {value!r}")


class RateLimitConfig(_Model):
    rate: Annotated[float, BeforeValidator(_rate)]
    burst: int = Field(ge=1)
    key: str = "client_ip"  # client_ip | header:<Name> | route
    scope: Literal["local", "cluster"] = "local"

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        if key in ("client_ip", "route") or (key.startswith("header:") and len(key) > 7):
            return key
        raise ValueError(f"expected client_ip, route or header:<Name>, got {key!r}")


class HealthCheckConfig(_Model):
    """Active health checks of each server of an upstream (`servers:`)."""

    path: str = Field("/healthz", pattern=r"^/[^\s]*$")
    interval: Duration = Field(5.0, gt=0)
    timeout: Duration = Field(1.0, gt=0)
    healthy: int = Field(2, ge=1)  # passes in a row that bring a server (back) in
    unhealthy: int = Field(3, ge=1)  # failures in a row that take it out


class EjectConfig(_Model):
    """Passive ejection: a server failing `failures` requests in a row (no answer, or 502, 503,
    504) is left out for `backoff` (or, with health checks, until they pass again)."""

    failures: int = Field(5, ge=1)
    backoff: Duration = Field(30.0, gt=0)


class UpstreamConfig(_Model):
    url: str
    # Several servers behind one name (the first is `url`): balanced, ejected, health-checked.
    servers: list[str] = []
    balance: Literal["round_robin", "least_requests"] = "round_robin"
    eject: EjectConfig = EjectConfig()
    health: HealthCheckConfig | None = None
    timeout: Duration = 30.0
    connect_timeout: Duration = 5.0
    max_connections: int = Field(256, ge=1)
    max_idle: int = Field(64, ge=0)
    idle_timeout: Duration = 60.0
    preserve_host: bool = True
    breaker: BreakerConfig | None = None  # a route's own `breaker` wins
    retry: RetryConfig | None = None  # a route's own `retry` wins

    @model_validator(mode="before")
    @classmethod
    def _url_or_servers(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("servers") is not None:
            if "url" in data:
                raise ValueError("give url (one server) or servers (several), not both")
            servers = data["servers"]
            if not isinstance(servers, list) or not servers:
                raise ValueError("servers: a list of URLs like [http://10.0.0.1:8000, "
                                 "http://10.0.0.2:8000]")
            return {**data, "url": servers[0]}
        return data

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, servers: list[str]) -> list[str]:
        checked = [cls._check_url(server) for server in servers]
        if len(set(checked)) != len(checked):
            raise ValueError("a server is listed twice")
        return checked

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if url.startswith("unix:"):
            if not re.fullmatch(r"unix://(/[^\s]*[^\s/])", url):
                raise ValueError(f"expected a unix socket URL like unix:///run/app.sock (an "
                                 f"absolute path after unix://), got {url!r}")
            return url
        match = re.fullmatch(r"(https?)://([^/\s:]+|\[[0-9a-fA-F:.]+\])(?::(\d{1,5}))?/?", url)
        if not match:
            raise ValueError(
                f"expected an upstream URL like http://127.0.0.1:8000 (scheme, host and port, "
                f"no path) or unix:///run/app.sock, got {url!r}"
            )
        return url.rstrip("/")

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def socket_path(self) -> str | None:
        """The unix socket of a `unix://` upstream (HTTP over it, as to a local app)."""
        return self.url[len("unix://"):] if self.scheme == "unix" else None

    @property
    def host(self) -> str:
        if self.scheme == "unix":
            return "localhost"  # the Host an app behind a socket gets (unless preserve_host)
        netloc = self.url.split("://", 1)[1]
        if netloc.startswith("["):
            return netloc[1 : netloc.index("]")]
        return netloc.rsplit(":", 1)[0] if ":" in netloc else netloc

    @property
    def port(self) -> int:
        if self.scheme == "unix":
            return 0
        netloc = self.url.split("://", 1)[1]
        tail = netloc.rsplit("]", 1)[-1]
        if ":" in tail:
            return int(tail.rsplit(":", 1)[1])
        return 443 if self.scheme == "https" else 80

    @property
    def netloc(self) -> str:
        return "localhost" if self.scheme == "unix" else self.url.split("://", 1)[1]


class MatchConfig(_Model):
    path: str = "/**"
    methods: list[str] | None = None
    host: str | None = None
    headers: dict[str, str] = {}

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        from .core.globs import compile_path_glob

        compile_path_glob(path)
        return path

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, methods: list[str] | None) -> list[str] | None:
        if methods is None:
            return None
        if not methods:
            raise ValueError("an empty method list matches nothing: remove the key to match all")
        for method in methods:
            if not _TOKEN.match(method):
                raise ValueError(f"not an HTTP method: {method!r}")
        return [m.upper() for m in methods]


class CacheKeyConfig(_Model):
    query: Literal["sorted", "exact", "ignore"] = "sorted"
    headers: list[str] = []
    cookies: list[str] = []


class MemoryLayerConfig(_Model):
    max_bytes: Size = 64 * 1024**2
    max_entry: Size = 1024**2
    # How long a worker keeps an entry in memory before it reads Redis again; None: for as long
    # as the entry is fresh.
    max_ttl: OptionalDuration = None

    @field_validator("max_ttl")
    @classmethod
    def _check_max_ttl(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("an L1 that keeps entries for 0s keeps none: give a duration "
                             "like '5s', or leave memory out of layers")
        return value


class RedisLayerConfig(_Model):
    max_entry: Size = 8 * 1024**2

    @model_validator(mode="before")
    @classmethod
    def _no_total_here(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_bytes" in data:
            raise ValueError("max_bytes is the L2 quota of the whole cluster, which every route "
                             "shares: set it once at the top level (cache: {redis: {max_bytes: "
                             "256MiB}}); a route's cache.redis takes max_entry")
        return data


class L2QuotaConfig(_Model):
    # Everything L2 holds, across the cluster: cached responses as Redis counts their memory,
    # with their index entries. Past it the least recently used entries go (docs/caching.md,
    # "How much L2 holds").
    max_bytes: Size = 256 * 1024**2

    @field_validator("max_bytes")
    @classmethod
    def _check_max_bytes(cls, value: int) -> int:
        if value < 1024**2:
            raise ValueError("an L2 smaller than 1MiB holds too few responses to be worth a "
                             "round trip: give a size like '256MiB', or leave redis out of "
                             "the routes' cache.layers")
        return value


class SharedCacheConfig(_Model):
    """The top-level `cache:` section: what the routes' caches share. A route's own `cache:`
    says what it stores and for how long; a total for the cluster is not split among routes,
    so it is written once, here."""

    redis: L2QuotaConfig = L2QuotaConfig()
    # What a worker does with its L1 once it cannot hear purges from Redis (docs/caching.md,
    # "One cache across workers"): stop serving it (no purged entry is served, the upstream
    # takes the load) or serve it on (invalidations made elsewhere meanwhile are missed).
    l1_without_redis: Literal["stop", "serve"] = "serve"


def _targeted_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"expected a header field name like 'CDN-Cache-Control', got {name!r}")
    if name.lower() == "cache-control":
        raise ValueError("Cache-Control is the field a targeted one overrides: list others, "
                         "like 'CDN-Cache-Control', or write [] to go by Cache-Control alone")
    return name


# A response field carrying Cache-Control directives for this cache (RFC 9213).
TargetedField = Annotated[str, AfterValidator(_targeted_name)]


class CacheConfig(_Model):
    ttl: Duration = 60.0
    override: bool = False
    layers: list[Literal["memory", "redis"]] = Field(["memory", "redis"], min_length=1)
    memory: MemoryLayerConfig = MemoryLayerConfig()
    redis: RedisLayerConfig = RedisLayerConfig()
    stale_while_revalidate: Duration = 0.0
    stale_if_error: Duration = 0.0
    # RFC 9111 §4.2.2: for a response without freshness of its own but with a Last-Modified,
    # this fraction of the time since, at most heuristic_max, instead of ttl. 0: ttl only.
    heuristic: Percent = 0.0
    heuristic_max: Duration = 86400.0
    key: CacheKeyConfig = CacheKeyConfig()
    # false: ignore clients' Cache-Control: no-cache / max-age=0 (reload buttons) and serve hits.
    honor_client_no_cache: bool = True
    store_set_cookie: bool = False
    tag_header: str = "Surrogate-Key"
    # Targeted fields whose directives replace Cache-Control and Expires for this cache's own
    # decisions (RFC 9213); the first present and valid wins; [] goes by Cache-Control alone.
    targeted: list[TargetedField] = ["CDN-Cache-Control"]
    # Concurrent misses for one key make one upstream call, in this worker and, with the redis
    # layer, across workers and instances; false: each miss goes to the upstream.
    coalesce: bool = True
    # How long a miss waits for the request fetching its key, then it fetches itself.
    lock_timeout: Duration = 5.0
    # Request headers that some frameworks obey but that are not in the key: dropped before the
    # request reaches the upstream, so they cannot change what is stored for everyone.
    strip_unkeyed: list[str] = [
        "X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override", "X-HTTP-Method",
        "X-Method-Override", "X-Forwarded-Scheme", "X-Forwarded-Server", "X-Host",
    ]

    @field_validator("heuristic_max")
    @classmethod
    def _check_heuristic_max(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("a heuristic capped at 0s gives no freshness: give a duration "
                             "like '1d', or set heuristic: 0% to use ttl alone")
        return value

    @field_validator("lock_timeout")
    @classmethod
    def _check_lock_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("a miss that waits 0s for the one fetching its key never waits: "
                             "give a duration like '5s', or set coalesce: false")
        return value

    @field_validator("targeted")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in names:
            if name.lower() in seen:
                raise ValueError(f"{name!r} is listed twice (field names are case-insensitive); "
                                 "the first one always wins, remove the other")
            seen.add(name.lower())
        return names


class DedupKeyConfig(_Model):
    query: Literal["sorted", "exact", "ignore"] = "sorted"
    # The credentials by default: responses are shared only among callers with the same ones.
    headers: list[str] = ["Authorization", "Cookie"]


class DedupConfig(_Model):
    key: DedupKeyConfig = DedupKeyConfig()
    scope: Literal["local", "cluster"] = "local"
    wait: Duration = Field(30.0, gt=0)
    methods: list[Literal["GET", "HEAD", "OPTIONS"]] = ["GET", "HEAD"]
    # Cluster scope: a leader holds its lock this long without renewing it before another
    # instance may take over (it renews every third of it while alive).
    lease: Duration = Field(5.0, gt=0)
    # Largest response shared across instances through Redis (one copy per instance); larger
    # responses are still shared inside each worker, streamed.
    max_body: Size = 64 * 1024**2


class IdempotencyConfig(_Model):
    header: str = "Idempotency-Key"
    ttl: Duration = Field(86400.0, gt=0)
    methods: list[str] = ["POST", "PATCH"]
    # Request bodies are read whole to fingerprint them; larger ones are refused (413).
    max_body: Size = 10 * 1024**2
    # Responses up to this size are stored for replay.
    max_response: Size = 10 * 1024**2

    @field_validator("methods")
    @classmethod
    def _upper(cls, methods: list[str]) -> list[str]:
        return [m.upper() for m in methods]


_CALLBACK_URL = re.compile(r"https?://(?:[^@/\s?#]*@)?([^/\s:?#@]+|\[[0-9a-fA-F:.]+\])"
                           r"(?::(\d{1,5}))?(?:[/?][^\s#]*)?")
MIN_SECRET = 16


class CallbackConfig(_Model):
    """POST a job's final status to `url`, signed with `secret` (docs/jobs.md, "Callbacks")."""

    url: str
    secret: str = Field(repr=False)  # HMAC-SHA256 key; never logged or shown
    attempts: int = Field(5, ge=1, le=100)  # deliveries tried at most
    backoff: Duration = Field(2.0, ge=0)  # before the second; doubled after, with full jitter
    max_backoff: Duration = Field(600.0, gt=0)  # the doubling stops here
    timeout: Duration = Field(10.0, gt=0)  # per delivery, connecting to the last byte of the head

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        match = _CALLBACK_URL.fullmatch(url)
        if match is None or (match.group(2) is not None and int(match.group(2)) > 65535):
            raise ValueError(
                "expected an http:// or https:// URL like https://app.example/hooks/jobs, "
                f"got {url!r}")
        return url

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, secret: str) -> str:
        if len(secret) < MIN_SECRET:
            raise ValueError(
                f"a signing secret needs at least {MIN_SECRET} characters (got {len(secret)}); "
                "make one with `openssl rand -hex 32` and pass it as ${VAR}")
        return secret


class OffloadConfig(_Model):
    """Answer at once with 202 and replay the request from the job queue (docs/jobs.md)."""

    mode: Literal["always", "prefer"] = "always"  # prefer: only with `Prefer: respond-async`
    queue: str = "default"
    priority: int = Field(5, ge=0, le=1000)  # lower runs first
    attempts: int = Field(3, ge=1, le=100)  # upstream calls at most, 5xx and failures retried
    backoff: Duration = Field(2.0, ge=0)  # before the second attempt; doubled after, jittered
    timeout: Duration = Field(600.0, gt=0)  # per attempt
    result_ttl: Duration = Field(86400.0, gt=0)
    max_body: Size = 16 * 1024**2
    # The latest start a client may ask for (`Prefer: run-at=...` or `delay=...`), from now.
    max_delay: Duration = Field(86400.0, ge=0)
    callback: CallbackConfig | None = None  # tell the job's creator when it is over


class CompressConfig(_Model):
    """Compress responses for clients that accept it (docs/compression.md)."""

    encodings: list[Literal["br", "zstd", "gzip"]] = Field(["br", "zstd", "gzip"],
                                                           min_length=1)  # preferred first
    min_size: Size = 1024  # smaller bodies go as they are
    types: list[str] = list(DEFAULT_TYPES)  # media types, `text/*` and `*+json` patterns
    levels: dict[Literal["br", "zstd", "gzip"], int] = {}  # default br 4, zstd 3, gzip 6
    # Largest body decoded for a client that accepts none of a stored entry's coding.
    max_decoded: Size = 64 * 1024**2

    @field_validator("levels")
    @classmethod
    def _levels(cls, levels: dict[str, int]) -> dict[str, int]:
        bounds = {"br": (0, 11), "zstd": (1, 22), "gzip": (1, 9)}
        for coding, level in levels.items():
            low, high = bounds[coding]
            if not low <= level <= high:
                raise ValueError(f"{coding} level {level}: from {low} to {high}")
        return levels


class PolicyKeys(_Model):
    """The keys a route or a policy bundle may set; each later policy adds its own key here."""

    timeout: OptionalDuration = None
    cache: CacheConfig | None = None
    etag: bool = False
    dedup: DedupConfig | None = None
    idempotency: IdempotencyConfig | None = None
    breaker: BreakerConfig | None = None
    retry: RetryConfig | None = None
    rate_limit: RateLimitConfig | None = None
    offload: OffloadConfig | None = None
    compress: CompressConfig | None = None


class RouteConfig(PolicyKeys):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    match: MatchConfig = MatchConfig()
    upstream: str
    use: list[str] = []


class RedactConfig(_Model):
    """Query parameters and headers whose values logs and spans show as `<redacted>`, added to
    the defaults of core/redact.py (Authorization and Cookie are always redacted)."""

    query: list[str] = []
    headers: list[str] = []


class LogConfig(_Model):
    format: Literal["json", "logfmt"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = True
    # Admin actions (audit.py) go to this file, one JSON line each, instead of stderr.
    audit_file: str | None = None
    redact: RedactConfig = RedactConfig()


class AdminTokenConfig(_Model):
    token: str = Field(min_length=16)  # a secret: `${ENV_VAR}`, 16 characters at least
    scope: Literal["read", "admin"] = "admin"


class AdminConfig(_Model):
    """Bearer tokens of the admin listener (docs/security.md). `token`: one `admin` token,
    named `admin` in the audit log; `tokens`: named ones, each `read` or `admin`."""

    token: str | None = None
    tokens: dict[str, AdminTokenConfig] = {}

    @model_validator(mode="after")
    def _distinct(self) -> AdminConfig:
        if self.token is not None and "admin" in self.tokens:
            raise ValueError("admin.token is the token named 'admin': "
                             "name the one under admin.tokens otherwise")
        seen: dict[str, str] = {}
        for name, entry in self.named().items():
            if entry[0] in seen:
                raise ValueError(f"tokens {seen[entry[0]]!r} and {name!r} are the same secret: "
                                 "the audit log could not tell them apart")
            seen[entry[0]] = name
        return self

    def named(self) -> dict[str, tuple[str, Literal["read", "admin"]]]:
        """name -> (token, scope), `admin.token` included as `admin`."""
        out = {name: (entry.token, entry.scope) for name, entry in self.tokens.items()}
        if self.token:
            out["admin"] = (self.token, "admin")
        return out

    @property
    def protected(self) -> bool:
        return bool(self.token) or bool(self.tokens)


class RouteSlaConfig(_Model):
    latency_p95: OptionalDuration = None
    error_ratio: float | None = Field(None, ge=0, le=1)


class SlaConfig(_Model):
    """Targets exported as metrics (sidecar_sla_*), so alert rules compare against them."""

    latency_p95: Duration = 0.5
    error_ratio: float = Field(0.01, ge=0, le=1)  # share of 5xx answers
    routes: dict[str, RouteSlaConfig] = {}

    def for_route(self, name: str) -> tuple[float, float]:
        own = self.routes.get(name)
        if own is None:
            return self.latency_p95, self.error_ratio
        return (self.latency_p95 if own.latency_p95 is None else own.latency_p95,
                self.error_ratio if own.error_ratio is None else own.error_ratio)


DEFAULT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class MetricsConfig(_Model):
    enabled: bool = True
    status_label: Literal["class", "code"] = "class"  # 2xx..., or 200...
    buckets: list[Duration] = Field(DEFAULT_BUCKETS, min_length=1, max_length=40)
    server_timing: bool = True
    sla: SlaConfig = SlaConfig()

    @field_validator("buckets")
    @classmethod
    def _increasing(cls, buckets: list[float]) -> list[float]:
        if any(b <= 0 for b in buckets) or any(a >= b for a, b in itertools.pairwise(buckets)):
            raise ValueError("buckets must be positive durations in increasing order, "
                             "e.g. [10ms, 50ms, 100ms, 500ms, 1s]")
        return buckets


class QueueConfig(_Model):
    concurrency: int = Field(10, ge=1, le=10000)  # upstream calls in flight, whole cluster
    # Jobs waiting for a worker, whole cluster; past it a submission gets 503 job_queue_full.
    max_queued: int | None = Field(None, ge=1)
    # Jobs of this queue that start in any one period, whole cluster: `10/m`.
    rate: Annotated[WindowRate | None, BeforeValidator(_window_rate)] = None


class JobsConfig(_Model):
    """The job queue's own settings; `queues` names the queues and their limits."""

    path: str = Field("/_sidecar/jobs", pattern=r"^(/[A-Za-z0-9._~\-]+)+$")
    workers: bool = True  # `sidecar run` also runs jobs (besides `sidecar worker`)
    # A running job whose worker stops answering is picked up again this long after its last
    # heartbeat (and then after the sweep that notices it).
    visibility_timeout: Duration = Field(30.0, ge=1.0)
    sweep_interval: Duration = Field(10.0, ge=1.0)
    max_wait: Duration = Field(60.0, ge=0)  # the longest `Prefer: wait=N` honoured
    max_age: Duration = Field(7 * 86400.0, gt=0)  # a job not finished by then is dropped
    # Where upstreams POST progress; by default the admin listener of the worker running the
    # job (a wildcard host becomes 127.0.0.1).
    progress_url: str | None = None


class ScheduleRequestConfig(_Model):
    """One request a schedule sends through its route, as a client would."""

    method: str = "GET"
    path: str  # with its query: /api/reports?range=day
    # Host defaults to server.listen's address (localhost for 0.0.0.0): the cache keys by it.
    headers: dict[str, str] = {}
    body: str = ""

    @field_validator("method")
    @classmethod
    def _method(cls, method: str) -> str:
        if not re.fullmatch(r"[A-Za-z]{1,20}", method):
            raise ValueError(f"{method!r} is not an HTTP method")
        return method.upper()

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a header name")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"header {name}: a value cannot hold a line break")
        return headers

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if not path.startswith("/") or any(c in path for c in " \r\n\t#"):
            raise ValueError(f"{path!r}: a path starts with '/' and has no spaces or '#', "
                             "e.g. /api/products?page=1")
        return path


class ScheduleConfig(_Model):
    """A request (or several) sent through a route on a timetable (docs/jobs.md, Schedules):
    each tick once across the whole cluster."""

    cron: str | None = None  # five fields: "0 2 * * *"
    every: OptionalDuration = Field(None, ge=1.0)  # or a period: 10m
    timezone: str = "UTC"  # what cron's hours mean
    route: str
    request: ScheduleRequestConfig | None = None
    requests: list[ScheduleRequestConfig] = []
    missed: Literal["once", "skip"] = "once"  # ticks missed while the cluster was down
    on_start: bool = False  # also run at start-up, unless a run began less than a period ago
    timeout: Duration = Field(60.0, gt=0)  # a run's longest, before another worker may redo it

    @field_validator("timezone")
    @classmethod
    def _zone(cls, timezone: str) -> str:
        zone(timezone)
        return timezone

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str | None) -> str | None:
        if cron is not None:
            Cron(cron)
        return cron

    @model_validator(mode="after")
    def _one_timetable_some_requests(self) -> ScheduleConfig:
        if (self.cron is None) == (self.every is None):
            raise ValueError('give either cron: "0 2 * * *" or every: 10m (one of them)')
        if self.request is None and not self.requests:
            raise ValueError("give request: {method: GET, path: /...} or requests: [...]")
        if self.request is not None and self.requests:
            raise ValueError("give request or requests, not both")
        return self

    def all_requests(self) -> list[ScheduleRequestConfig]:
        return [self.request] if self.request is not None else list(self.requests)

    def ticks(self) -> Ticks:
        if self.cron is not None:
            return Cron(self.cron, self.timezone)
        assert self.every is not None
        return Every(self.every)


class TracingConfig(_Model):
    """OpenTelemetry spans exported over OTLP/HTTP (docs/metrics.md, Tracing)."""

    exporter: Literal["otlp"] = "otlp"
    endpoint: str = "http://127.0.0.1:4318"  # the collector; spans go to <endpoint>/v1/traces
    # Share of requests traced when the client sends no traceparent; one that does is followed.
    sample: float = Field(0.1, ge=0, le=1)
    service_name: str = "sidecar"
    batch_delay: Duration = 1.0  # spans wait at most this long before an export
    timeout: Duration = 5.0  # one export's time limit

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("an http:// or https:// URL of an OTLP/HTTP collector "
                             "(e.g. http://127.0.0.1:4318)")
        return value


class Config(_Model):
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = RedisConfig()
    cache: SharedCacheConfig = SharedCacheConfig()
    upstreams: dict[str, UpstreamConfig]
    include: list[str] = []
    routes: list[RouteConfig] = Field(min_length=1)
    log: LogConfig = LogConfig()
    admin: AdminConfig = AdminConfig()
    queues: dict[str, QueueConfig] = {"default": QueueConfig()}
    jobs: JobsConfig = JobsConfig()
    metrics: MetricsConfig = MetricsConfig()
    schedules: dict[str, ScheduleConfig] = {}
    tracing: TracingConfig | None = None  # off unless set

    @field_validator("schedules")
    @classmethod
    def _schedule_names(cls, schedules: dict[str, ScheduleConfig]) -> dict[str, ScheduleConfig]:
        for name in schedules:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
                raise ValueError(f"schedule name {name!r}: use letters, digits, '.', '_' and "
                                 "'-' only")
        return schedules

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, queues: dict[str, QueueConfig]) -> dict[str, QueueConfig]:
        for name in queues:
            if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", name):
                raise ValueError(f"queue name {name!r}: use letters, digits, '_' and '-' only")
        return queues

    @field_validator("include", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


# --- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    file: str
    where: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        location = f"{self.file}:{self.line}" if self.line else self.file
        return f"{location}: {self.where}: {self.message}" if self.where else (
            f"{location}: {self.message}"
        )


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every problem found, located."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- YAML with line numbers --------------------------------------------------------------------

Loc = tuple[str | int, ...]
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class _Document:
    file: str
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None


# Values a document may stand for once its aliases (`*name`) are expanded: a hand-written
# config comes nowhere near it, an alias bomb ("billion laughs") goes far past it in a few lines.
_MAX_EXPANDED = 100_000


def _read_yaml(path: Path, problems: list[Problem]) -> _Document | None:
    """Parse YAML keeping each key's line, refusing duplicate keys, expanding ${VAR:-default}."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(Problem(name, "", f"cannot read the file: {exc.strerror or exc}"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(name, "", f"not UTF-8 text ({exc.reason} at byte {exc.start}): "
                                "save the file as UTF-8", data.count(b"\n", 0, exc.start) + 1))
        return None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            doc = _Document(name, None)
            if node is not None:
                if _walk(node, (), doc, problems, {}) > _MAX_EXPANDED:
                    problems.append(Problem(
                        name, "", f"the document stands for more than {_MAX_EXPANDED} values "
                        "once its aliases (*name) are expanded: an alias used within itself, "
                        "or an alias bomb", None))
                    return None
                doc.data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        problems.append(Problem(name, "", f"invalid YAML: {reason}", line))
        return None
    # PyYAML's own limits, which it does not translate: its composer recurses once per level of
    # nesting, and Python refuses integers of more than 4300 digits.
    except RecursionError:
        problems.append(Problem(name, "", "invalid YAML: nested too deeply"))
        return None
    except ValueError as exc:
        problems.append(Problem(name, "", f"invalid YAML: a value cannot be read: {exc}"))
        return None
    routes = doc.data.get("routes") if isinstance(doc.data, dict) else None
    doc.data = _expand_env(doc.data, (), doc, problems,
                           routes if isinstance(routes, list) else None)
    return doc


def _walk(node: yaml.Node, loc: Loc, doc: _Document, problems: list[Problem],
          sizes: dict[int, int]) -> int:
    """Record lines and duplicate keys; return how many values the node stands for with its
    aliases expanded (capped just past _MAX_EXPANDED). An aliased node is walked once: `sizes`
    remembers it, and counts one being walked as too many (an alias used within itself)."""
    doc.lines[loc] = node.start_mark.line + 1
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = _MAX_EXPANDED + 1
    size = 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: the constructor refuses it
            key = key_node.value
            if key in seen:
                problems.append(Problem(
                    doc.file, _format_loc((*loc, key), None),
                    "duplicate key: the first value would be silently ignored",
                    key_node.start_mark.line + 1,
                ))
            seen.add(key)
            size += _walk(value_node, (*loc, key), doc, problems, sizes)
            doc.lines[(*loc, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            size += _walk(item, (*loc, index), doc, problems, sizes)
    sizes[id(node)] = size = min(size, _MAX_EXPANDED + 1)
    return size


def _expand_env(value: Any, loc: Loc, doc: _Document, problems: list[Problem],
                routes: list[Any] | None = None) -> Any:
    """`routes`: the document's route list, so that a problem inside one names it."""
    if isinstance(value, dict):
        return {k: _expand_env(v, (*loc, k), doc, problems, routes) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*loc, i), doc, problems, routes) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            problems.append(Problem(
                doc.file, _format_loc(loc, routes),
                f"environment variable {name} is not set (write ${{{name}:-default}} to give a "
                "default)", doc.line_of(loc),
            ))
            return ""
        return _ENV.sub(substitute, value)
    return value


# --- locating and wording pydantic errors ------------------------------------------------------


def _format_loc(loc: Loc, routes: list[Any] | None, key: str = "routes") -> str:
    """`routes[2] (products).cache.ttl`: entries of the named list `key` show their name."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if routes is not None and i == 1 and loc[0] == key and part < len(routes):
                name = routes[part].get("name") if isinstance(routes[part], dict) else None
                if name:
                    out += f" ({name})"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(model: Any, loc: Loc) -> Any:
    """The pydantic model class that owns the keys at `loc`, or None."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(part, str) or part not in annotation.model_fields:
                return None
            annotation = annotation.model_fields[part].annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        elif typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        else:
            return None
    annotation = _unwrap(annotation)
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _word(error: Any, owner: Any) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = sorted(owner.model_fields) if owner is not None else []
        hint = difflib.get_close_matches(key, allowed, n=1)
        text = f"unknown key {key!r}"
        if hint:
            text += f" (did you mean {hint[0]!r}?)"
        if allowed:
            text += f"; allowed here: {', '.join(allowed)}"
        return text
    if kind == "missing":
        return f"missing required key {loc[-1]!r}"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if kind in ("int_parsing", "int_type", "bool_parsing", "bool_type", "string_type",
                "list_type", "dict_type", "model_type", "literal_error", "float_parsing"):
        message += f", got {error.get('input')!r}"
    if kind == "model_type":
        message = "expected a mapping of keys, got " + repr(error.get("input"))
    return message


def _pydantic_problems(
    exc: ValidationError, doc: _Document, model: Any, prefix: Loc, routes: list[Any] | None,
    key: str = "routes",
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = (*prefix, *error["loc"])
        owner = _model_at(model, tuple(error["loc"][:-1]))
        problems.append(Problem(doc.file, _format_loc(loc, routes, key), _word(error, owner),
                                doc.line_of(loc)))
    return problems


# --- loading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedConfig:
    """A valid config plus what it was read from (for the reload watcher)."""

    config: Config
    path: Path
    files: tuple[Path, ...]
    bundles: dict[str, PolicyKeys]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read, merge bundles into routes, validate; raise ConfigError listing every problem."""
    path = Path(path)
    problems: list[Problem] = []
    doc = _read_yaml(path, problems)
    if doc is None:
        raise ConfigError(problems)
    raw = doc.data
    if not isinstance(raw, dict):
        problems.append(Problem(doc.file, "", "the file must be a mapping of sections "
                                "(server, redis, upstreams, routes, ...)", 1))
        raise ConfigError(problems)

    files = [path]
    bundles_raw, bundles = _load_bundles(path, raw, doc, files, problems)
    raw = dict(raw)
    routes_raw = raw.get("routes")
    if isinstance(routes_raw, list):
        raw["routes"] = [
            _apply_bundles(i, route, doc, bundles_raw, routes_raw, problems)
            for i, route in enumerate(routes_raw)
        ]
    problems += _check_routes_raw(raw, doc, routes_raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, doc, Config, (), routes_raw
                                       if isinstance(routes_raw, list) else None)
        raise ConfigError(problems) from None
    problems += _cross_check(config, doc)
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(config, path, tuple(files), bundles)


ModelT = typing.TypeVar("ModelT", bound=BaseModel)


def load_document(path: str | os.PathLike[str], model: type[ModelT], *,
                  named_list: str | None = None) -> ModelT:
    """Another YAML file the sidecar reads (the load-test SLA file) into `model`, with the
    config's located problems; entries of `named_list` are shown with their `name`."""
    problems: list[Problem] = []
    doc = _read_yaml(Path(path), problems)
    if doc is None:
        raise ConfigError(problems)
    raw = doc.data if doc.data is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(doc.file, "", "the file must be a mapping of keys", 1)])
    items = raw.get(named_list) if named_list else None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(
            exc, doc, model, (), items if isinstance(items, list) else None,
            named_list or "routes")) from None


def _load_bundles(
    path: Path, raw: dict[str, Any], doc: _Document, files: list[Path], problems: list[Problem]
) -> tuple[dict[str, dict[str, Any]], dict[str, PolicyKeys]]:
    include = raw.get("include", [])
    patterns = [include] if isinstance(include, str) else include
    bundles_raw: dict[str, dict[str, Any]] = {}
    bundles: dict[str, PolicyKeys] = {}
    origin: dict[str, str] = {}
    if not isinstance(patterns, list):
        return bundles_raw, bundles  # reported by the model
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            continue
        full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
        matched = sorted(glob.glob(full))
        if not matched:
            problems.append(Problem(doc.file, f"include[{i}]" if isinstance(include, list)
                                    else "include", f"no file matches {pattern!r}",
                                    doc.line_of(("include",))))
        for file in matched:
            bundle_doc = _read_yaml(Path(file), problems)
            files.append(Path(file))
            if bundle_doc is None or bundle_doc.data is None:
                continue
            if not isinstance(bundle_doc.data, dict):
                problems.append(Problem(file, "", "a policy file maps bundle names to policy "
                                        "keys, e.g. 'cache-short: {timeout: 5s}'", 1))
                continue
            for name, body in bundle_doc.data.items():
                if name in origin:
                    problems.append(Problem(file, str(name), f"bundle name already defined in "
                                            f"{origin[name]}", bundle_doc.line_of((name,))))
                    continue
                origin[name] = file
                try:
                    bundles[name] = PolicyKeys.model_validate(body or {})
                except ValidationError as exc:
                    problems += _pydantic_problems(exc, bundle_doc, PolicyKeys, (name,), None)
                    # Reported just above: known, if invalid, so not "unknown" where it is used.
                    bundles_raw[name] = {}
                    continue
                bundles_raw[name] = body or {}
    return bundles_raw, bundles


def _apply_bundles(
    index: int, route: Any, doc: _Document, bundles_raw: dict[str, dict[str, Any]],
    routes_raw: list[Any], problems: list[Problem],
) -> Any:
    if not isinstance(route, dict) or not isinstance(route.get("use"), list):
        return route
    merged: dict[str, Any] = {}
    for j, name in enumerate(route["use"]):
        if not isinstance(name, str):
            continue  # reported by the model
        if name not in bundles_raw:
            known = sorted(bundles_raw)
            hint = difflib.get_close_matches(str(name), known, n=1)
            problems.append(Problem(
                doc.file, _format_loc(("routes", index, "use", j), routes_raw),
                f"unknown policy bundle {name!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + (f"; defined bundles: {', '.join(known)}" if known
                   else "; no bundles are defined (see 'include')"),
                doc.line_of(("routes", index, "use", j)),
            ))
            continue
        merged = _deep_merge(merged, bundles_raw[name])
    return _deep_merge(merged, route)


def _check_routes_raw(raw: dict[str, Any], doc: _Document, routes_raw: Any) -> list[Problem]:
    """Cross-references between routes and upstreams, checked even when other keys are bad."""
    problems: list[Problem] = []
    if not isinstance(routes_raw, list):
        return problems
    found = raw.get("upstreams")
    upstreams: dict[str, Any] = found if isinstance(found, dict) else {}
    seen: dict[str, int] = {}
    for i, route in enumerate(routes_raw):
        if not isinstance(route, dict):
            continue
        loc: Loc = ("routes", i)
        upstream = route.get("upstream")
        if isinstance(upstream, str) and upstream not in upstreams:
            known = ", ".join(sorted(upstreams)) or "none"
            hint = difflib.get_close_matches(upstream, list(upstreams), n=1)
            problems.append(Problem(doc.file, _format_loc((*loc, "upstream"), routes_raw),
                                    f"unknown upstream {upstream!r}"
                                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                    + f"; defined upstreams: {known}",
                                    doc.line_of((*loc, "upstream"))))
        name = route.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(Problem(doc.file, _format_loc((*loc, "name"), routes_raw),
                                        f"route name {name!r} is already used by "
                                        f"routes[{seen[name]}]", doc.line_of((*loc, "name"))))
            seen.setdefault(name, i)
    return problems


def _cross_check(config: Config, doc: _Document) -> list[Problem]:
    problems = []
    if not config.server.admin_listen.is_loopback and not config.admin.protected:
        problems.append(Problem(doc.file, "server.admin_listen",
                                f"the admin listener {config.server.admin_listen} is not on "
                                "loopback: set admin.token (or admin.tokens) so its endpoints "
                                "require a bearer token",
                                doc.line_of(("server", "admin_listen"))))
    for i, route in enumerate(config.routes):
        if route.offload is not None and route.offload.queue not in config.queues:
            known = ", ".join(sorted(config.queues)) or "none"
            problems.append(Problem(doc.file, f"routes[{i}] ({route.name}).offload.queue",
                                    f"unknown queue {route.offload.queue!r}; defined queues: "
                                    f"{known} (declare it under the top-level 'queues:')",
                                    doc.line_of(("routes", i, "offload", "queue"))))
    for i, route in enumerate(config.routes):
        offload = route.offload
        if offload is not None and offload.max_delay >= config.jobs.max_age:
            problems.append(Problem(
                doc.file, f"routes[{i}] ({route.name}).offload.max_delay",
                f"{offload.max_delay:g}s is not less than jobs.max_age "
                f"({config.jobs.max_age:g}s): a delayed job's stored request would expire "
                "before it runs; lower max_delay or raise jobs.max_age",
                doc.line_of(("routes", i, "offload", "max_delay"))))
    quota = config.cache.redis.max_bytes
    for i, route in enumerate(config.routes):
        cache = route.cache
        if cache is not None and "redis" in cache.layers and cache.redis.max_entry > quota:
            problems.append(Problem(
                doc.file, f"routes[{i}] ({route.name}).cache.redis.max_entry",
                f"{format_size(cache.redis.max_entry)} is more than all of L2 holds "
                f"(cache.redis.max_bytes: {format_size(quota)}): storing one would push every "
                "other entry out; lower max_entry or raise the top-level cache.redis.max_bytes",
                doc.line_of(("routes", i, "cache", "redis", "max_entry"))))
    names = {route.name for route in config.routes}
    for name in config.metrics.sla.routes:
        if name not in names:
            problems.append(Problem(doc.file, f"metrics.sla.routes.{name}",
                                    f"no route is named {name!r}; routes: "
                                    f"{', '.join(sorted(names))}",
                                    doc.line_of(("metrics", "sla", "routes", name))))
    for name, schedule in config.schedules.items():
        if schedule.route not in names:
            problems.append(Problem(doc.file, f"schedules.{name}.route",
                                    f"no route is named {schedule.route!r}; routes: "
                                    f"{', '.join(sorted(names))}",
                                    doc.line_of(("schedules", name, "route"))))
    if config.server.tls is not None:
        from .edge.tls import server_context

        try:
            server_context(config.server.tls, Path(doc.file).parent)
        except ValueError as exc:
            problems.append(Problem(doc.file, "server.tls", str(exc),
                                    doc.line_of(("server", "tls"))))
    if config.log.audit_file is not None:
        audit = Path(doc.file).parent / config.log.audit_file
        if not audit.parent.is_dir():
            problems.append(Problem(doc.file, "log.audit_file",
                                    f"no directory {audit.parent} for the audit log",
                                    doc.line_of(("log", "audit_file"))))
    if config.server.listen == config.server.admin_listen:
        problems.append(Problem(doc.file, "server.admin_listen",
                                "the admin listener must not share the public address",
                                doc.line_of(("server", "admin_listen"))))
    return problems
