"""`etag: true`: strong ETags for whole responses that lack one, and 304s for conditional
requests that match, whether the response came from the cache or fresh from the upstream.

Streamed responses (larger than 256 KiB, or of unknown length) are not buffered just to hash
them: they pass without a generated ETag, and the upstream's own validators still work.
"""

from __future__ import annotations

from ..core.etag import generate_strong_etag, not_modified
from ..core.freshness import http_date
from ..pipeline import Handler, ProxyRequest, ProxyResponse
from .cache import _304_HEADERS, get_header


class EtagPolicy:
    async def handle(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        response = await call_next(request)
        if response.status != 200 or request.method not in ("GET", "HEAD"):
            return response
        etag = response.etag or get_header(response.headers, b"etag")
        if etag is None and response.body is not None and request.method == "GET":
            etag = generate_strong_etag(response.body)
            response.headers.append((b"ETag", etag.encode("latin-1")))
            response.wire = None
        headers = request.head.headers
        inm = headers.get("If-None-Match")
        ims = headers.get("If-Modified-Since")
        if (inm is None and ims is None) or not not_modified(
                method=request.method, if_none_match=inm, if_modified_since=http_date(ims),
                etag=etag, last_modified=http_date(get_header(response.headers,
                                                              b"last-modified"))):
            return response
        if response.stream is not None:
            response.stream.close()
        return ProxyResponse(304, "Not Modified",
                             [(n, v) for n, v in response.headers if n.lower() in _304_HEADERS],
                             body=b"")
