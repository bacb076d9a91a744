"""Content codings (RFC 9110 §8.4, §12.5.3): which one a client accepts, which the sidecar
picks, and what a coding does to an ETag. Pure: the `compress` policy's decisions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DEFAULT_TYPES = (
    "text/*", "application/json", "application/*+json", "application/javascript",
    "application/xml", "application/*+xml", "application/wasm", "image/svg+xml",
    "application/x-ndjson", "application/graphql-response+json",
)


def accepted(values: Iterable[str]) -> dict[str, float]:
    """`Accept-Encoding` lines -> {coding: q}; `*` for any other; `identity` as given."""
    weights: dict[str, float] = {}
    for value in values:
        for item in value.split(","):
            coding, *params = item.strip().split(";")
            coding = coding.strip().lower()
            if not coding:
                continue
            q = 1.0
            for param in params:
                name, _, text = param.strip().partition("=")
                if name.strip().lower() == "q":
                    try:
                        q = max(0.0, min(1.0, float(text.strip())))
                    except ValueError:
                        q = 0.0  # an unreadable weight accepts nothing
            weights[coding] = max(q, weights.get(coding, 0.0)) if coding in weights else q
    return weights


def weight(weights: dict[str, float], coding: str) -> float:
    """How much the client wants `coding` (0: not at all). `x-gzip` counts as gzip (§8.4.1.3)."""
    if coding in weights:
        return weights[coding]
    if coding == "gzip" and "x-gzip" in weights:
        return weights["x-gzip"]
    return weights.get("*", 0.0)


def choose(values: Sequence[str], offered: Sequence[str]) -> str | None:
    """The coding to send among `offered` (in the sidecar's order of preference), or None
    for none: the highest q wins, ties go to the earlier in `offered`. No Accept-Encoding at
    all means identity is wanted (a client that says nothing may not decode)."""
    if not values:
        return None
    weights = accepted(values)
    best, best_q = None, 0.0
    for coding in offered:
        q = weight(weights, coding)
        if q > best_q:
            best, best_q = coding, q
    return best


def takes(values: Sequence[str], coding: str) -> bool:
    """Whether a client sending these Accept-Encoding lines may get `coding`."""
    return bool(values) and weight(accepted(values), coding) > 0


def weak(etag: str) -> str:
    """An encoded representation is not byte-identical to the upstream's: a strong validator
    becomes weak (`"x"` -> `W/"x"`), which still answers If-None-Match (§8.8.3.2)."""
    return etag if etag.startswith("W/") else "W/" + etag


def compressible(content_type: str | None, types: Iterable[str]) -> bool:
    """Whether a media type is one of `types` (`text/*` and `application/*+json` patterns)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    for pattern in types:
        p_kind, _, p_sub = pattern.lower().partition("/")
        if p_kind not in (kind, "*"):
            continue
        if p_sub in (sub, "*") or (p_sub.startswith("*+") and sub.endswith(p_sub[1:])):
            return True
    return False
