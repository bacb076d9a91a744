"""`cache:` a shared HTTP cache (RFC 9111) in front of the route's upstream: L1 in this worker,
L2 in Redis, revalidation with stored validators, stale-while-revalidate and stale-if-error,
invalidation by unsafe methods, byte ranges from stored responses. Every response it touches
carries `Cache-Status` (RFC 9211).

Concurrent misses for one key make one upstream call (`coalesce`, the cache's lock): the first
leads, the others wait at most `lock_timeout` and are answered from its entry, or go to the
upstream themselves when its response could not be stored. With the redis layer the leaders of
every worker and instance compete for a Redis lock through the dedup service's coordination;
whoever wins fetches, and the others read its entry from L2.

The rules themselves live in sidecar/core/freshness.py, etag.py, ranges.py, cachekey.py and
coalesce.py; this module only acts on their answers.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from time import monotonic

from ..config import CacheConfig
from ..core.cachekey import (
    TRUSTED_FORWARDING,
    normalize_target,
    primary_key,
    vary_names,
    vary_values,
)
from ..core.coalesce import Outcome, Step, after_wait, outcome_of, remembered, takes_part
from ..core.etag import generate_strong_etag, not_modified
from ..core.freshness import (
    Directives,
    Freshness,
    Verdict,
    default_lifetime,
    delta_seconds,
    freshness_lifetime,
    has_explicit_freshness,
    http_date,
    initial_age,
    not_storable_reason,
    parse_cache_control,
    strict_http_date,
    verdict,
)
from ..core.ranges import Part, parse_range, range_answer
from ..core.targeted import Controls, select_controls
from ..errors import UpstreamError
from ..http.dates import http_date_now
from ..http.headers import RawHeaders, connection_tokens
from ..pipeline import Handler, ProxyRequest, ProxyResponse
from ..stores.dedup import CACHED, Coordination, DedupService
from ..stores.entry import CachedResponse
from ..stores.memory import MemoryStore
from ..stores.misses import FAILED, Fetched, Miss
from ..stores.tiered import CacheService
from .breaker import BreakerOpenError

log = logging.getLogger("sidecar.cache")

# RFC 9110 §9.2.1's safe methods. Any other one invalidates what the cache holds for its target
# once it succeeds, including methods of unknown safety (RFC 9111 §4.4): PROPPATCH, PURGE...
SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Not stored with an entry: connection-level, recomputed per response, or per request.
_NOT_STORED = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection", b"age",
    b"x-request-id", b"content-length", b"cache-status",
})
# RFC 9110 §15.4.5: what a 304 carries.
_304_HEADERS = frozenset({b"cache-control", b"content-location", b"date", b"etag", b"expires",
                          b"vary", b"last-modified", b"age", b"cache-status", b"via"})
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since", b"if-match",
                           b"if-unmodified-since", b"if-range"})
# Forwarding fields. Unless server.trust_forwarded, a client may forge them, and they are not in
# the key: the upstream of a cached route gets none of these but the sidecar's own
# X-Forwarded-For (X-Forwarded-Host and -Proto are the sidecar's already: http/forwarding.py).
_FORGEABLE = frozenset({b"forwarded", b"x-forwarded-port", b"x-forwarded-prefix",
                        b"x-forwarded-for"})
_SET_COOKIE = frozenset({b"set-cookie"})
# What a 416 carries of the entry's fields, besides Content-Range: when, and which version.
_416_HEADERS = frozenset({b"date", b"etag", b"last-modified", b"vary", b"via"})
# Request fields that change what the cache does with a stored response.
_REQUEST_CONTROLS = frozenset({b"range", b"cache-control", b"pragma", b"if-none-match",
                               b"if-modified-since"})
# A miss fetched: the answer, the entry stored or None, what storing said (`stored`, or why
# not), the entry's write to L2 in progress.
Fetch = tuple[ProxyResponse, CachedResponse | None, str, "asyncio.Task[bool] | None"]


def get_header(headers: Sequence[tuple[bytes, bytes]], lname: bytes) -> str | None:
    values = [v for n, v in headers if n.lower() == lname]
    if not values:
        return None
    return ", ".join(v.decode("latin-1") for v in values)


def connection_named(raw: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fields the upstream's Connection header names (RFC 9110 §7.6.1): this hop's, so
    neither stored nor handed to a client."""
    connection = get_header(raw, b"connection")
    return connection_tokens(connection) if connection else frozenset()


def _last_modified(stored: RawHeaders) -> float | None:
    """What a client's If-Modified-Since is compared with (RFC 9111 §4.3.2): the stored
    Last-Modified, else the stored Date (the upstream's, or when the response arrived)."""
    return http_date(get_header(stored, b"last-modified") or get_header(stored, b"date"))


def withheld_fields(response_cc: Directives) -> frozenset[bytes]:
    """Response fields never stored: Set-Cookie (one client's session, which hits would hand
    to everybody) and those a qualified `private="..."` names (RFC 9111 §5.2.2.7). The client
    whose request fetched the response still gets them."""
    named = response_cc.get("private")
    if not named:
        return _SET_COOKIE
    return _SET_COOKIE | {n.strip().lower().encode("latin-1") for n in named.split(",")
                          if n.strip()}


def rewrite_head(head: bytes, drop: frozenset[bytes], add: list[bytes]) -> bytes:
    """The upstream request head without the `drop` fields and with `add` lines."""
    lines = head.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        if line.split(b":", 1)[0].strip().lower() in drop:
            continue
        kept.append(line)
    return b"\r\n".join(kept + add) + b"\r\n\r\n"


class CachePolicy:
    def __init__(self, route: str, config: CacheConfig, service: CacheService, *,
                 generate_etag: bool, coalesce: bool = False,
                 cluster: DedupService | None = None,
                 unvaried: frozenset[str] = frozenset()) -> None:
        """`coalesce`: the route's misses are coalesced (config `coalesce`, and no dedup policy
        on the route, which would coalesce them a second time); `cluster`: the service that
        coordinates flights across workers and instances; `unvaried`: request fields named in
        Vary that do not make variants here (Accept-Encoding on a route whose `compress`
        policy gives each client a coding it takes from the one entry)."""
        self.unvaried = unvaried
        self.route = route
        self.config = config
        self.service = service
        self.l1: MemoryStore | None = (
            service.memory_for(route, config) if "memory" in config.layers else None)
        self.use_l2 = "redis" in config.layers
        # An L1 hit counts as a use of the L2 copy too: else the entries hottest in every
        # worker's L1 would look the coldest to L2's LRU and go first.
        self._touch = service.touched.add if self.use_l2 else None
        self.max_entry = max(
            config.memory.max_entry if "memory" in config.layers else 0,
            config.redis.max_entry if self.use_l2 else 0)
        self.generate_etag = generate_etag
        self.locks = service.misses if coalesce else None
        # Across workers and instances only when they share the entries: through L2.
        self.cluster = cluster if coalesce and self.use_l2 else None
        self.lock_timeout = config.lock_timeout
        keyed = {h.lower() for h in config.key.headers}
        self.strip = frozenset(
            h.lower().encode() for h in config.strip_unkeyed if h.lower() not in keyed
        ) | _CONDITIONALS | {b"range"}  # what is stored is the whole response
        self.strip_untrusted = self.strip | {h for h in _FORGEABLE if h.decode() not in keyed}
        self.own_forwarded_for = "x-forwarded-for" not in keyed
        self.trusted_key_headers = (
            *config.key.headers, *(h for h in TRUSTED_FORWARDING if h.lower() not in keyed))
        self.tag_header = config.tag_header.lower().encode("latin-1")
        self.targeted = tuple((name, name.lower().encode("latin-1")) for name in config.targeted)
        self.counts = service.counts
        self._hit_keys = {layer: (route, layer, "hit") for layer in ("memory", "redis")}
        self._memory_hit = self._hit_keys["memory"]
        # Without key headers or cookies the key depends on host and target only: memoise it,
        # it is computed on every hit.
        self._plain_key = (
            functools.lru_cache(maxsize=4096)(self._keys)
            if not config.key.headers and not config.key.cookies else None)

    # -- entry point ------------------------------------------------------------------------

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        method = request.method
        if method != "GET" and method != "HEAD":
            response = await call_next(request)
            if method not in SAFE and 200 <= response.status < 400:
                await self._invalidate(request, response)
            return response
        head = request.head
        headers = head.headers
        plain = not headers.has_any(_REQUEST_CONTROLS)  # the usual request: none of them
        request_cc: Directives = {}
        if not plain:
            cache_control = headers.get("Cache-Control")
            if cache_control is not None:
                request_cc = parse_cache_control(cache_control)
            if not request_cc and headers.get("Pragma", "").lower() == "no-cache":
                request_cc = {"no-cache": None}
        trusted = request.route.trust_forwarded
        if self._plain_key is not None and not trusted:
            target, primary = self._plain_key(head.host, head.target)
        else:
            target = normalize_target(head.target, self.config.key.query)
            primary = primary_key(head.host, target, headers,
                                  self.trusted_key_headers if trusted else self.config.key.headers,
                                  self.config.key.cookies)
        now = self.service.clock()
        l1 = self.l1
        if l1 is not None and monotonic() >= self.service.l1_until:
            l1 = None  # this worker may have missed a purge: L1 is not to be trusted
        variants = l1.get(primary, now) if l1 is not None else None
        if variants and not variants[0].vary_names:  # one variant: the usual entry
            entry: CachedResponse | None = variants[0]
            known = True
        else:
            entry, known = self._l1_variant(variants, headers)
        if entry is not None and plain and not entry.freshness.no_cache:
            age = entry.freshness.age(now)
            if age < entry.freshness.lifetime:  # fresh: what verdict() says of it, sooner
                self.counts[self._memory_hit] += 1
                if self._touch is not None:
                    self._touch(primary)
                return self._hit(request, entry, age)
        layer = "memory"
        if entry is None and self.use_l2:
            layer = "redis"
            entry, known_l2 = await self._l2_lookup(primary, headers, now)
            known = known or known_l2
        if entry is not None:
            decision = verdict(entry.freshness, request_cc, now,
                               honor_client=self.config.honor_client_no_cache)
            if decision is Verdict.FRESH:
                self.counts[self._hit_keys[layer]] += 1
                if layer == "memory" and self._touch is not None:
                    self._touch(primary)
                ttl = int(entry.freshness.ttl(now))
                return self._answer(request, entry, now, b"hit; ttl=%d" % ttl, _HIT)
            if decision is Verdict.STALE_REVALIDATE:
                self.counts[(self.route, layer, "stale")] += 1
                if await self.service.try_refresh(primary, 10.0):
                    self.service.spawn(self._refresh(request, call_next, entry, primary, target))
                ttl = int(entry.freshness.ttl(now))
                return self._answer(request, entry, now,
                                    b"hit; ttl=%d; detail=stale-while-revalidate" % ttl, _STALE)
            return await self._revalidate(request, call_next, entry, primary, target, request_cc)
        fwd = "vary-miss" if known else "uri-miss"
        if not plain and method == "GET" and _asks_for_part(headers.get("Range")):
            return await self._pass_range(request, call_next, fwd)
        if self.locks is not None and takes_part(
                method, request_cc, honor_client=self.config.honor_client_no_cache):
            return await self._coalesced(request, call_next, primary, target, fwd, request_cc)
        return (await self._fetched(request, call_next, primary, target, fwd, request_cc))[0]

    # -- lookup -------------------------------------------------------------------------------

    def _keys(self, host: str, raw_path: str) -> tuple[str, str]:
        """(target, primary key) when only host and target make the key: memoised per policy."""
        target = normalize_target(raw_path, self.config.key.query)
        return target, primary_key(host, target, {}, (), ())

    @staticmethod
    def _l1_variant(variants: list[CachedResponse] | None, headers: Mapping[str, str]
                    ) -> tuple[CachedResponse | None, bool]:
        """The variant of an L1 key that matches the request's Vary fields, and whether the
        key is known at all."""
        if not variants:
            return None, False
        values = vary_values(variants[0].vary_names, headers)
        for entry in variants:
            if entry.vary_values == values:
                return entry, True
        return None, True

    async def _l2_lookup(self, primary: str, headers: Mapping[str, str], now: float
                         ) -> tuple[CachedResponse | None, bool]:
        generation = self.service.generation
        variants = await self.service.l2_get(primary)
        if not variants:
            return None, False
        values = vary_values(variants[0].vary_names, headers)
        for entry in variants:
            if entry.vary_values == values:
                # Not when a purge came while Redis answered: it may be what the purge deleted.
                if self.l1 is not None and self.service.generation == generation:
                    self.l1.put(entry, now)
                return entry, True
        return None, True

    # -- answering from an entry -------------------------------------------------------------

    @staticmethod
    def _hit(request: ProxyRequest, entry: CachedResponse, age: float) -> ProxyResponse:
        """`_answer` for the most common case, a fresh hit without conditionals: its fields
        and wire change only with the whole seconds of Age and TTL, so they are built once per
        second per entry (a third of a hit's time otherwise)."""
        age_s = int(age)
        ttl = int(entry.freshness.lifetime - age)
        memo = entry.hit
        if memo is None or memo[0] != age_s or memo[1] != ttl:
            age_b = b"%d" % age_s
            cache_status = b"sidecar; hit; ttl=%d" % ttl
            memo = entry.hit = (age_s, ttl, [
                *entry.headers, (b"Age", age_b), (b"Cache-Status", cache_status)],
                b"".join((entry.wire, b"Age: ", age_b, b"\r\nCache-Status: ", cache_status,
                          b"\r\n")))
        response = ProxyResponse(entry.status, entry.reason, list(memo[2]),
                                 body=b"" if request.method == "HEAD" else entry.body,
                                 wire=memo[3], etag=entry.etag)
        response.cache = _HIT
        return response

    def _answer(self, request: ProxyRequest, entry: CachedResponse, now: float,
                status: bytes | str, desc: bytes,
                own: Sequence[tuple[bytes, bytes]] = ()) -> ProxyResponse:
        """The response from an entry; `own`: fields of the upstream's response that are for
        this client only (withheld_fields)."""
        age = b"%d" % entry.freshness.age(now)
        cache_status = b"sidecar; " + (status if isinstance(status, bytes) else status.encode())
        headers = [*entry.headers, *own, (b"Age", age), (b"Cache-Status", cache_status)]
        inm = request.head.headers.get("If-None-Match")
        ims = request.head.headers.get("If-Modified-Since")
        if (inm is not None or ims is not None) and not_modified(
                method=request.method, if_none_match=inm, if_modified_since=http_date(ims),
                etag=entry.etag, last_modified=entry.last_modified) and entry.status == 200:
            response = ProxyResponse(304, "Not Modified",
                                     [(n, v) for n, v in headers if n.lower() in _304_HEADERS],
                                     body=b"")
            response.cache = desc
            return response
        if request.method == "GET" and entry.status == 200:
            range_value = request.head.headers.get("Range")
            if range_value is not None:
                part = self._part(request, entry, headers, range_value, desc, now)
                if part is not None:
                    return part
        body = b"" if request.method == "HEAD" else entry.body
        stored = entry.wire
        if own:
            stored += b"".join(b"%s: %s\r\n" % (n, v) for n, v in own)
        wire = b"".join((stored, b"Age: ", age, b"\r\nCache-Status: ", cache_status, b"\r\n"))
        response = ProxyResponse(entry.status, entry.reason, headers, body=body, wire=wire,
                                 etag=entry.etag)
        response.cache = desc
        return response

    def _part(self, request: ProxyRequest, entry: CachedResponse, headers: RawHeaders,
              range_value: str, desc: bytes, now: float) -> ProxyResponse | None:
        """A 206 or 416 from a stored 200 for a GET with `Range`, or None: the whole 200 is
        the answer (a Range the cache ignores, an If-Range that does not hold)."""
        stored = entry.headers
        answer = range_answer(
            range_value, request.head.headers.get("If-Range"), length=len(entry.body),
            etag=entry.etag, last_modified=http_date(get_header(stored, b"last-modified")),
            date=http_date(get_header(stored, b"date")), now=now)
        if answer is None:
            return None
        if isinstance(answer, Part):
            fields = [(n, v) for n, v in headers if n.lower() != b"content-length"]
            body = answer.of(entry.body)
            fields += ((b"Content-Range", answer.content_range),
                       (b"Content-Length", b"%d" % len(body)))
            response = ProxyResponse(206, "Partial Content", fields, body=body, etag=entry.etag)
        else:
            # The validators, for a client to see its copy is outdated; no Cache-Control or
            # Expires, which could let a cache downstream keep the 416 as the URI's answer.
            # `headers` is the entry's, then this client's own fields, Age and Cache-Status.
            fields = [(n, v) for n, v in stored if n.lower() in _416_HEADERS]
            fields += headers[len(stored):]
            fields.append((b"Content-Range", answer.content_range))
            response = ProxyResponse(416, "Range Not Satisfiable", fields, body=b"")
        response.cache = desc
        return response

    # -- going to the upstream ---------------------------------------------------------------

    async def _pass_range(self, request: ProxyRequest, call_next: Handler,
                          fwd: str) -> ProxyResponse:
        """A part of something not stored: the request goes as it came, Range and If-Range
        included, and the answer (a 206, or a 200 from an upstream without ranges) is not
        stored. Fetching it whole instead could mean gigabytes for one seek in a video; the
        next plain GET stores it, and ranges are answered from the cache from then on."""
        response = await call_next(request)
        response.headers.append(
            (b"Cache-Status", b"sidecar; fwd=%s; fwd-status=%d; detail=range"
             % (fwd.encode(), response.status)))
        response.cache = _BYPASS
        self.counts[(self.route, "-", "bypass")] += 1
        return response

    def _forwarded(self, request: ProxyRequest, add: list[bytes] | None = None) -> ProxyRequest:
        add = list(add or ())
        if request.route.trust_forwarded:
            return request.with_upstream_head(rewrite_head(request.upstream_head, self.strip, add))
        if self.own_forwarded_for:
            add.append(b"X-Forwarded-For: " + (request.head.client or "").encode("latin-1"))
        return request.with_upstream_head(rewrite_head(request.upstream_head, self.strip_untrusted,
                                                           add))

    def _controls(self, raw: RawHeaders) -> Controls:
        """The directives this cache goes by for a response: its first targeted field present
        and valid (config `targeted`, RFC 9213), else Cache-Control and Expires. The fields
        themselves are stored and relayed as they came."""
        return select_controls(get_header(raw, b"cache-control"), get_header(raw, b"expires"),
                               [(name, get_header(raw, lname)) for name, lname in self.targeted])

    def _own_fields(self, response: ProxyResponse) -> RawHeaders:
        raw = response.headers
        withheld = withheld_fields(self._controls(raw).directives)
        named = connection_named(raw)
        return [(n, v) for n, v in raw if n.lower() in withheld and n.lower() not in named]

    async def _fetched(self, request: ProxyRequest, call_next: Handler, primary: str,
                       target: str, fwd: str, request_cc: Directives) -> Fetch:
        """A miss sent upstream: the answer, the entry stored (None: `detail` says why not)
        and the write of that entry to L2 in progress."""
        self.counts[(self.route, "-", "miss")] += 1
        request_time = self.service.clock()
        response = await call_next(self._forwarded(request))
        entry, detail, l2 = await self._store(request, response, primary, target, request_cc,
                                              request_time)
        status = f"fwd={fwd}; fwd-status={response.status}; " + (
            "stored" if entry is not None else f"detail={detail}")
        if entry is not None:
            return (_timed(self._answer(request, entry, self.service.clock(), status, _MISS,
                                        self._own_fields(response)), response),
                    entry, detail, l2)
        response.headers.append((b"Cache-Status", b"sidecar; " + status.encode()))
        response.cache = _MISS
        return response, None, detail, None

    # -- coalescing misses ---------------------------------------------------------------------

    async def _coalesced(self, request: ProxyRequest, call_next: Handler, primary: str,
                         target: str, fwd: str, request_cc: Directives) -> ProxyResponse:
        """A miss that takes part in coalescing: it leads (fetches and stores), or waits for
        the request that does and is answered from its entry; core/coalesce.py decides each
        step. The wait, all rounds together, lasts `lock_timeout` at most."""
        locks = self.locks
        assert locks is not None
        key = f"{self.route}\n{primary}"
        if locks.passing.passing(key, self.service.clock()):
            # Its last response could not be stored: waiting for a leader would only delay it.
            return await self._alone(key, request, call_next, primary, target, fwd, request_cc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        while True:
            miss = locks.holder(key)
            if miss is None:
                return await self._lead(locks.hold(key), request, call_next, primary, target,
                                        fwd, request_cc, deadline - loop.time())
            self.counts[(self.route, "-", "lock_wait")] += 1
            fetched = await locks.wait(miss, deadline - loop.time())
            entry = fetched.entry if fetched is not None else None
            same = entry is not None and entry.vary_values == vary_values(
                entry.vary_names, request.head.headers)
            match after_wait(fetched.outcome if fetched is not None else None,
                             same_variant=same):
                case Step.ANSWER:
                    assert entry is not None
                    self.counts[(self.route, "-", "collapsed")] += 1
                    return self._collapsed(request, entry, fwd)
                case Step.FETCH:
                    event = "lock_timeout" if fetched is None else "lock_pass"
                    self.counts[(self.route, "-", event)] += 1
                    return await self._alone(key, request, call_next, primary, target, fwd,
                                             request_cc)
                case Step.RETRY:
                    if entry is not None:
                        fwd = "vary-miss"  # another variant is stored now

    async def _alone(self, key: str, request: ProxyRequest, call_next: Handler, primary: str,
                     target: str, fwd: str, request_cc: Directives) -> ProxyResponse:
        """A miss fetched without the lock; what it brings still updates the key's memory."""
        response, entry, detail, _ = await self._fetched(request, call_next, primary, target,
                                                         fwd, request_cc)
        self._settled(key, response, entry, detail)
        return response

    async def _lead(self, miss: Miss, request: ProxyRequest, call_next: Handler, primary: str,
                    target: str, fwd: str, request_cc: Directives, wait: float
                    ) -> ProxyResponse:
        """Fetch for every request waiting on `miss`, and release it whatever happens: a leader
        that fails or is cancelled lets a waiter lead instead (FAILED). `wait`: what is left of
        this request's `lock_timeout`, for waiting on another worker's fetch."""
        fetched = FAILED
        try:
            cluster = self.cluster
            if cluster is not None and cluster.cluster_ready:
                response, fetched = await self._lead_cluster(cluster, miss.key, request,
                                                             call_next, primary, target, fwd,
                                                             request_cc, wait)
            else:
                response, entry, detail, _ = await self._fetched(request, call_next, primary,
                                                                 target, fwd, request_cc)
                fetched = self._settled(miss.key, response, entry, detail)
            return response
        finally:
            assert self.locks is not None
            self.locks.release(miss, fetched)

    async def _lead_cluster(self, cluster: DedupService, key: str, request: ProxyRequest,
                            call_next: Handler, primary: str, target: str, fwd: str,
                            request_cc: Directives, wait: float
                            ) -> tuple[ProxyResponse, Fetched]:
        """This worker's leader of a miss, across workers and instances: the one holding the
        Redis lock fetches, stores and then publishes CACHED once its entry is in L2 (or
        "ask for yourselves"); the others read the entry from L2. Without an answer within
        `wait`, or with Redis failing, it fetches itself."""
        lock = "cache:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        token = os.urandom(12).hex()
        lease = self.lock_timeout
        outcome = await cluster.coordinate(lock, token, wait=wait, lease=lease,
                                           note=self._note, on_wait=self._waiting)
        if outcome is Coordination.LEAD:
            keeping = cluster.spawn(cluster.keep(lock, token, lease, self._note))
            try:
                response, entry, detail, l2 = await self._fetched(request, call_next, primary,
                                                                  target, fwd, request_cc)
            except BaseException:
                keeping.cancel()
                cluster.spawn(cluster.give_up(lock, token))
                raise
            cluster.spawn(_publish(cluster, lock, token, l2, keeping))
            return response, self._settled(key, response, entry, detail)
        if outcome == CACHED:
            entry, _ = await self._l2_lookup(primary, request.head.headers, self.service.clock())
            if entry is not None:
                self.counts[(self.route, "-", "collapsed")] += 1
                return self._collapsed(request, entry, fwd), Fetched(Outcome.STORED, entry)
        # ALONE, or not stored in L2 (not storable, too large, Redis failed): this worker's own
        # fetch is what its waiters get.
        response, entry, detail, _ = await self._fetched(request, call_next, primary, target,
                                                         fwd, request_cc)
        return response, self._settled(key, response, entry, detail)

    def _settled(self, key: str, response: ProxyResponse, entry: CachedResponse | None,
                 detail: str) -> Fetched:
        """What a fetch tells the key's waiters, and whether the key skips the lock next."""
        passing = self.service.misses.passing
        if remembered(detail, response.status):
            passing.remember(key, self.service.clock())
        elif entry is not None:
            passing.forget(key)
        return Fetched(outcome_of(detail), entry)

    def _collapsed(self, request: ProxyRequest, entry: CachedResponse, fwd: str
                   ) -> ProxyResponse:
        """A waiter's answer, from the entry its leader stored: a hit's fields (Age...), and
        RFC 9211's `collapsed`, since the entry came from a request it did not send."""
        now = self.service.clock()
        status = (f"fwd={fwd}; fwd-status={entry.status}; ttl={int(entry.freshness.ttl(now))}; "
                  "collapsed")
        return self._answer(request, entry, now, status, _COLLAPSED)

    def _note(self, event: str) -> None:
        self.counts[(self.route, "-", event)] += 1

    def _waiting(self) -> None:
        self.counts[(self.route, "-", "lock_wait")] += 1

    async def _revalidate(self, request: ProxyRequest, call_next: Handler,
                          entry: CachedResponse, primary: str, target: str,
                          request_cc: Directives) -> ProxyResponse:
        request_time = self.service.clock()
        try:
            response = await call_next(self._forwarded(request, self._validators(entry)))
        except BreakerOpenError as exc:
            f = entry.freshness
            if exc.serve_stale and not (f.must_revalidate or f.no_cache):
                self.counts[(self.route, "-", "stale")] += 1
                return self._answer(request, entry, self.service.clock(),
                                    "fwd=stale; detail=breaker-open", _STALE)
            if f.usable_for_error(self.service.clock()):
                self.counts[(self.route, "-", "stale")] += 1
                return self._answer(request, entry, self.service.clock(),
                                    "fwd=stale; detail=stale-if-error", _STALE)
            raise
        except UpstreamError:
            if entry.freshness.usable_for_error(self.service.clock()):
                self.counts[(self.route, "-", "stale")] += 1
                return self._answer(request, entry, self.service.clock(),
                                    "fwd=stale; detail=stale-if-error", _STALE)
            raise
        if response.status >= 500 and entry.freshness.usable_for_error(self.service.clock()):
            if response.stream is not None:
                response.stream.close()
            self.counts[(self.route, "-", "stale")] += 1
            return self._answer(request, entry, self.service.clock(),
                                f"fwd=stale; fwd-status={response.status}; "
                                "detail=stale-if-error", _STALE)
        self.counts[(self.route, "-", "revalidate")] += 1
        if response.status == 304:
            refreshed = self._refreshed(entry, response, request_time)
            await self.service.written(self._put(refreshed))
            return _timed(self._answer(request, refreshed, self.service.clock(),
                                       "fwd=stale; fwd-status=304", _REVALIDATED,
                                       self._own_fields(response)), response)
        new, detail, _ = await self._store(request, response, primary, target, request_cc,
                                           request_time)
        status = f"fwd=stale; fwd-status={response.status}; " + (
            "stored" if new is not None else f"detail={detail}")
        if new is not None:
            return _timed(self._answer(request, new, self.service.clock(), status, _REVALIDATED,
                                       self._own_fields(response)), response)
        response.headers.append((b"Cache-Status", b"sidecar; " + status.encode()))
        response.cache = _REVALIDATED
        return response

    async def _refresh(self, request: ProxyRequest, call_next: Handler, entry: CachedResponse,
                       primary: str, target: str) -> None:
        """stale-while-revalidate: bring the entry up to date behind the client's back."""
        try:
            request_time = self.service.clock()
            response = await call_next(self._forwarded(request, self._validators(entry)))
            if response.status == 304:
                self._put(self._refreshed(entry, response, request_time))
            elif response.status < 500:
                await self._store(request, response, primary, target, {}, request_time)
            elif response.stream is not None:
                response.stream.close()
        except UpstreamError as exc:
            log.info("background refresh failed", extra={"route": self.route,
                                                         "error": exc.code})
        finally:
            self.service.refresh_done(primary)

    @staticmethod
    def _validators(entry: CachedResponse) -> list[bytes]:
        add = []
        if entry.etag is not None:
            add.append(b"If-None-Match: " + entry.etag.encode("latin-1"))
        last_modified = get_header(entry.headers, b"last-modified")
        if last_modified is not None:
            add.append(b"If-Modified-Since: " + last_modified.encode("latin-1"))
        return add

    # -- storing ------------------------------------------------------------------------------

    async def _store(self, request: ProxyRequest, response: ProxyResponse, primary: str,
                     target: str, request_cc: Directives, request_time: float
                     ) -> tuple[CachedResponse | None, str, asyncio.Task[bool] | None]:
        """The entry stored (or None and why not), and its write to L2 in progress."""
        raw = response.headers
        if get_header(raw, b"x-sidecar-dedup") is not None:
            return None, "coalesced", None  # a copy of a flight's response: its leader stores it
        response_cc, expires_raw, _ = self._controls(raw)
        vary = get_header(raw, b"vary")
        config = self.config
        default = self._default_lifetime(raw, self.service.clock())
        reason = not_storable_reason(
            method=request.method, status=response.status, request_cc=request_cc,
            response_cc=response_cc,
            has_authorization="Authorization" in request.head.headers,
            has_cookie=("Cookie" in request.head.headers and not config.key.cookies
                        and "cookie" not in vary_names(vary)),
            has_set_cookie=get_header(raw, b"set-cookie") is not None,
            store_set_cookie=config.store_set_cookie, vary=vary,
            explicit_freshness=config.override or has_explicit_freshness(response_cc,
                                                                         expires_raw),
            default_ttl=default,
        )
        if reason is not None:
            return None, reason, None
        body = await response.read_whole(self.max_entry)
        if body is None:
            return None, "too-large", None
        response_time = self.service.clock()
        entry = self._entry(request, response.status, response.reason, raw, body, primary,
                            target, response_cc, expires_raw, vary, default, request_time,
                            response_time)
        l2 = self._put(entry)
        await self.service.written(l2)
        return entry, "stored", l2

    def _default_lifetime(self, headers: RawHeaders, now: float) -> float:
        """The freshness this route gives a response without its own: `ttl`, or with
        `heuristic` and a Last-Modified the heuristic lifetime; `ttl` whatever the response
        says with `override`."""
        config = self.config
        if config.override or config.heuristic <= 0:
            return config.ttl
        return default_lifetime(
            ttl=config.ttl, heuristic=config.heuristic, heuristic_max=config.heuristic_max,
            last_modified=http_date(get_header(headers, b"last-modified")),
            date=http_date(get_header(headers, b"date")), now=now)

    def _entry(self, request: ProxyRequest, status: int, reason: str, raw: RawHeaders,
               body: bytes, primary: str, target: str, response_cc: Directives,
               expires_raw: str | None, vary: str | None, default: float,
               request_time: float, response_time: float) -> CachedResponse:
        config = self.config
        dropped = _NOT_STORED | withheld_fields(response_cc) | connection_named(raw)
        headers = [(n, v) for n, v in raw if n.lower() not in dropped]
        etag = get_header(raw, b"etag")
        if etag is None and self.generate_etag and status == 200:
            etag = generate_strong_etag(body)
            headers.append((b"ETag", etag.encode("latin-1")))
        headers.append((b"Content-Length", str(len(body)).encode()))
        if get_header(raw, b"date") is None:
            headers.append((b"Date", http_date_now()))
        date = http_date(get_header(raw, b"date"))
        if date is None:  # the Date just added is "now": Expires counts from it
            date = response_time
        lifetime = freshness_lifetime(
            response_cc=response_cc, expires=strict_http_date(expires_raw, now=response_time),
            date=date,
            expires_present=expires_raw is not None, status=status, default_ttl=default,
            override=config.override)
        swr_directive = delta_seconds(response_cc, "stale-while-revalidate")
        sie_directive = delta_seconds(response_cc, "stale-if-error")
        freshness = Freshness(
            lifetime=lifetime,
            initial_age=initial_age(age_header=get_header(raw, b"age"), date=date,
                                    request_time=request_time, response_time=response_time),
            stored_at=response_time,
            # A qualified no-cache="X" is taken as a plain one (RFC 9111 §5.2.2.4 notes that
            # caches commonly do): the fields it names are never reused unrevalidated.
            no_cache="no-cache" in response_cc,
            must_revalidate=any(d in response_cc for d in
                                ("must-revalidate", "proxy-revalidate", "s-maxage")),
            swr=float(swr_directive) if swr_directive is not None
            else config.stale_while_revalidate,
            sie=float(sie_directive) if sie_directive is not None
            else config.stale_if_error,
        )
        names = vary_names(vary)
        if self.unvaried:
            names = tuple(name for name in names if name not in self.unvaried)
        tags_raw = get_header(raw, self.tag_header)
        return CachedResponse(
            key=primary, uri=target, status=status, reason=reason, headers=headers, body=body,
            freshness=freshness, vary_names=names,
            vary_values=vary_values(names, request.head.headers), etag=etag,
            last_modified=_last_modified(headers),
            tags=tuple(tags_raw.split()) if tags_raw else (),
        )

    def _refreshed(self, entry: CachedResponse, response: ProxyResponse,
                   request_time: float) -> CachedResponse:
        """A 304 updates the stored headers (RFC 9111 §4.3.4) and restarts freshness."""
        named = connection_named(response.headers)
        updates = {n.lower(): (n, v) for n, v in response.headers
                   if n.lower() not in _NOT_STORED and n.lower() != b"content-type"
                   and n.lower() not in named}
        merged = [updates.pop(n.lower(), (n, v)) for n, v in entry.headers
                  if n.lower() != b"content-length"]
        merged += updates.values()
        response_cc, expires_raw, _ = self._controls(merged)
        withheld = withheld_fields(response_cc)
        merged = [(n, v) for n, v in merged if n.lower() not in withheld]
        return self._entry_from(entry, merged, response_cc, expires_raw, request_time)

    def _entry_from(self, entry: CachedResponse, headers: RawHeaders, response_cc: Directives,
                    expires_raw: str | None, request_time: float) -> CachedResponse:
        response_time = self.service.clock()
        config = self.config
        date = http_date(get_header(headers, b"date"))
        lifetime = freshness_lifetime(
            response_cc=response_cc, expires=strict_http_date(expires_raw, now=response_time),
            date=date,
            expires_present=expires_raw is not None, status=entry.status,
            default_ttl=self._default_lifetime(headers, response_time),
            override=config.override)
        f = entry.freshness
        freshness = Freshness(
            lifetime=lifetime,
            initial_age=initial_age(age_header=get_header(headers, b"age"), date=date,
                                    request_time=request_time, response_time=response_time),
            stored_at=response_time, no_cache=f.no_cache, must_revalidate=f.must_revalidate,
            swr=f.swr, sie=f.sie)
        headers = [(n, v) for n, v in headers if n.lower() != b"age"]
        headers.append((b"Content-Length", str(len(entry.body)).encode()))
        return CachedResponse(
            key=entry.key, uri=entry.uri, status=entry.status, reason=entry.reason,
            headers=headers, body=entry.body, freshness=freshness,
            vary_names=entry.vary_names, vary_values=entry.vary_values,
            etag=get_header(headers, b"etag") or entry.etag,
            last_modified=_last_modified(headers),
            tags=entry.tags)

    def _put(self, entry: CachedResponse) -> asyncio.Task[bool] | None:
        """Store in L1 now and start the L2 write: its task, or None (the caller waits for
        it before answering: CacheService.written)."""
        if self.l1 is not None and entry.size <= self.config.memory.max_entry:
            self.l1.put(entry, self.service.clock())
            self.counts[(self.route, "memory", "store")] += 1
        if self.use_l2 and len(entry.body) <= self.config.redis.max_entry:
            self.counts[(self.route, "redis", "store")] += 1
            f = entry.freshness
            keep = max(0.0, f.lifetime - f.initial_age) + max(f.swr, f.sie, 60.0)
            return self.service.l2_put(entry, keep)
        return None

    # -- invalidation -------------------------------------------------------------------------

    async def _invalidate(self, request: ProxyRequest, response: ProxyResponse) -> None:
        """RFC 9111 §4.4: a successful unsafe request invalidates the target URI and the
        same-origin Location / Content-Location, in Redis and in every worker's L1 before the
        response goes back (CacheService.purge), so that no next read finds the old entry."""
        query = self.config.key.query
        uris = {normalize_target(request.head.target, query)}
        host = request.head.host
        for name in (b"location", b"content-location"):
            value = get_header(response.headers, name)
            if not value:
                continue
            if value.startswith("/"):
                uris.add(normalize_target(value, query))
            elif "://" in value:
                rest = value.split("://", 1)[1]
                value_host, _, path = rest.partition("/")
                if value_host.lower() == host.lower():
                    uris.add(normalize_target("/" + path, query))
        await asyncio.gather(*(self.service.purge("key", uri) for uri in uris))
        self.counts[(self.route, "-", "invalidated")] += len(uris)


def _asks_for_part(range_value: str | None) -> bool:
    """Whether a GET's Range asks for less than the whole: `bytes=0-` and the Ranges the cache
    ignores are answered by a full response, which a miss can fetch and store."""
    if range_value is None:
        return False
    spec = parse_range(range_value)
    return spec is not None and not spec.whole


async def _publish(cluster: DedupService, lock: str, token: str, l2: asyncio.Task[bool] | None,
                   keeping: asyncio.Task[None]) -> None:
    """Tell the other workers and instances where a coalesced miss's response is: CACHED once
    its entry is written to L2 (not before: they read it there), else "ask for yourselves".
    The lock is kept until then, so that no one starts a second fetch meanwhile."""
    try:
        written = l2 is not None and await l2
    finally:
        keeping.cancel()
    await cluster.finish(lock, token, CACHED if written else None)


def _timed(answer: ProxyResponse, upstream: ProxyResponse) -> ProxyResponse:
    """An answer built from a stored entry keeps the upstream's time (Server-Timing)."""
    answer.upstream_seconds = upstream.upstream_seconds
    return answer


# What the cache did, as the start of a Server-Timing header (edge/handler.py adds the times).
_HIT = b"cache;desc=hit, "
_STALE = b"cache;desc=stale, "
_REVALIDATED = b"cache;desc=revalidated, "
_MISS = b"cache;desc=miss, "
_BYPASS = b"cache;desc=bypass, "
_COLLAPSED = b"cache;desc=collapsed, "
