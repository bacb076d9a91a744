"""`compress`: responses compressed for the clients that accept it, once per stored entry.

The policy is two halves around the cache (pipeline.CANONICAL_ORDER):

- `EncodePolicy`, inside the cache and dedup, next to the upstream: compresses a response the
  upstream did not encode, in the coding the client prefers among `encodings`, whole or as it
  streams, and marks it `Vary: Accept-Encoding`. What the cache stores is that encoded
  response, and the cache does not vary on Accept-Encoding for such a route (CachePolicy's
  `unvaried`): one entry, compressed once.
- `CompressPolicy`, outside the cache: a response in a coding this client does not accept (a
  stored entry encoded for another client, or an upstream's own gzip) is decoded for it; one it
  accepts goes as it is, its serialized headers untouched, so that a hit costs no more than
  without compression. It also counts what happened (`sidecar_compress_total`).

Never: a response already encoded by the upstream (it is only decoded, when needed), one with
`Cache-Control: no-transform`, a range (206), a status without a body, a media type not in
`types`, a body under `min_size`. A strong ETag becomes weak on an encoded response (RFC 9110
§8.8.3.2): If-None-Match still matches it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ..compression import DEFAULT_LEVELS, StreamCompressor, compress, decompress, stream_compressor
from ..core.encoding import choose, compressible, takes, weak
from ..pipeline import BodyStream, Handler, ProxyRequest, ProxyResponse
from .cache import get_header

if TYPE_CHECKING:
    from ..config import CompressConfig
    from ..http.headers import RawHeaders

_BODYLESS = frozenset({204, 304})
_COMPRESSED_STATUSES = frozenset({200, 203})
# The fields a coding changes: dropped (then set again) when one is applied or removed.
_CODING_FIELDS = frozenset({b"content-length", b"content-encoding", b"etag"})

_TAKES_KEPT = 256
CompressCounts = Counter[tuple[str, str, str]]  # (route, encoding, result) -> count


def _encoding(headers: RawHeaders) -> str | None:
    value = get_header(headers, b"content-encoding")
    if value is None:
        return None
    value = value.strip().lower()
    return None if value in ("", "identity") else value


def _with_coding(headers: RawHeaders, encoding: str | None, *, add_vary: bool) -> RawHeaders:
    """A copy of `headers` in another coding: Content-Encoding set (or gone), the ETag weak,
    no Content-Length (the edge frames the body), `Vary: Accept-Encoding` added when asked."""
    out: RawHeaders = []
    vary_seen = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"vary":
            vary_seen = vary_seen or b"accept-encoding" in value.lower() or value.strip() == b"*"
        if lname not in _CODING_FIELDS:
            out.append((name, value))
        elif lname == b"etag":
            out.append((name, weak(value.decode("latin-1")).encode("latin-1")))
    if encoding is not None:
        out.append((b"Content-Encoding", encoding.encode("ascii")))
    if add_vary and not vary_seen:
        out.append((b"Vary", b"Accept-Encoding"))
    return out


class EncodePolicy:
    """The inner half: compress what the upstream sends (see the module's docstring)."""

    def __init__(self, route: str, config: CompressConfig, counts: CompressCounts, *,
                 stored: bool = False) -> None:
        """`stored`: the route caches its responses, which are then compressed even for a
        client that takes none of `encodings` (CompressPolicy decodes it for that client), so
        that the entry every later client gets is a compressed one."""
        self.route = route
        self.config = config
        self.counts = counts
        self.stored = stored
        self.levels: dict[str, int] = dict(DEFAULT_LEVELS)
        for coding, level in config.levels.items():
            self.levels[coding] = level

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        response = await call_next(request)
        if (response.status not in _COMPRESSED_STATUSES or request.method == "HEAD"
                or response.tunnel is not None):
            return response
        headers = response.headers
        if (_encoding(headers) is not None
                or not compressible(get_header(headers, b"content-type"), self.config.types)
                or "no-transform" in (get_header(headers, b"cache-control") or "").lower()):
            return response
        accept = request.head.headers.getall("Accept-Encoding")
        encoding = choose(accept, self.config.encodings)
        if encoding is None:
            if not self.stored:
                return response  # identity for this client, nothing stored for others
            encoding = self.config.encodings[0]
        level = self.levels[encoding]
        body = response.body
        if body is not None:
            if len(body) < self.config.min_size:
                return response
            encoded = ProxyResponse(response.status, response.reason,
                                    _with_coding(headers, encoding, add_vary=True),
                                    body=compress(encoding, body, level))
        else:
            length = get_header(headers, b"content-length")
            if length is not None and length.isdigit() and int(length) < self.config.min_size:
                return response
            assert response.stream is not None
            encoded = ProxyResponse(response.status, response.reason,
                                    _with_coding(headers, encoding, add_vary=True),
                                    stream=_Compressing(response.stream,
                                                        stream_compressor(encoding, level)))
        encoded.upstream_seconds = response.upstream_seconds
        self.counts[(self.route, encoding, "compressed")] += 1
        return encoded


class CompressPolicy:
    """The outer half: each client gets a coding it accepts (see the module's docstring)."""

    def __init__(self, route: str, config: CompressConfig, counts: CompressCounts) -> None:
        self.route = route
        self.config = config
        self.counts = counts
        # (Accept-Encoding lines, coding) -> whether the client takes it. Clients send few
        # distinct values; parsing a browser's line cost 2.1 µs, a fifth of a hit's CPU.
        self._takes: dict[tuple[tuple[str, ...], str], bool] = {}

    def _client_takes(self, accept: list[str], encoding: str) -> bool:
        key = (tuple(accept), encoding)
        known = self._takes.get(key)
        if known is None:
            if len(self._takes) >= _TAKES_KEPT:
                self._takes.clear()  # a client sending new values on every request
            known = self._takes[key] = takes(accept, encoding)
        return known

    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        response = await call_next(request)
        encoding = _encoding(response.headers)
        if encoding is None or response.status == 206 or response.status in _BODYLESS:
            return response
        accept = request.head.headers.getall("Accept-Encoding")
        if self._client_takes(accept, encoding):
            self.counts[(self.route, encoding, "sent")] += 1
            return response
        body = await response.read_whole(self.config.max_decoded) if response.body is None \
            else response.body
        decoded = decompress(encoding, body, self.config.max_decoded) if body is not None \
            else None
        if decoded is None:  # too large, or not a coding the sidecar decodes: as it is
            return response
        self.counts[(self.route, encoding, "decompressed")] += 1
        result = ProxyResponse(response.status, response.reason,
                               _with_coding(response.headers, None, add_vary=True),
                               body=decoded)
        result.upstream_seconds = response.upstream_seconds
        result.cache = response.cache
        return result


class _Compressing:
    """A streamed body compressed as it comes, each chunk flushed (compression.py)."""

    def __init__(self, stream: BodyStream, compressor: StreamCompressor) -> None:
        self.stream = stream
        self.compressor: StreamCompressor | None = compressor

    async def read(self) -> bytes:
        while self.compressor is not None:
            chunk = await self.stream.read()
            if not chunk:
                last, self.compressor = self.compressor.finish(), None
                return last
            out = self.compressor.compress(chunk)
            if out:
                return out
        return b""

    def close(self) -> None:
        self.compressor = None
        self.stream.close()
