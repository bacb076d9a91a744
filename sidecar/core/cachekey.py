"""What makes two requests the same cache entry: the key, and Vary's secondary key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http.cookies import SimpleCookie


def normalize_target(raw_target: str, query_mode: str) -> str:
    """`/p?b=2&a=1` -> `/p?a=1&b=2` (sorted), as sent (exact), or `/p` (ignore)."""
    path, sep, query = raw_target.partition("?")
    if not sep or query_mode == "ignore":
        return path
    if query_mode == "sorted":
        query = "&".join(sorted(p for p in query.split("&") if p))
    return f"{path}?{query}" if query else path


def primary_key(host: str, target: str, headers: Mapping[str, str],
                key_headers: Sequence[str], key_cookies: Sequence[str]) -> str:
    """One string naming the entry; headers and cookies listed in the policy are part of it."""
    parts = [host.lower(), target]
    for name in key_headers:
        parts.append(headers.get(name, ""))
    if key_cookies:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers.get("Cookie", ""))
        except Exception:  # a malformed Cookie header keys as "no cookies"
            jar = SimpleCookie()
        for name in key_cookies:
            morsel = jar.get(name)
            parts.append(morsel.value if morsel is not None else "")
    return "\n".join(parts)


def vary_names(vary: str | None) -> tuple[str, ...]:
    if not vary:
        return ()
    return tuple(sorted({v.strip().lower() for v in vary.split(",") if v.strip()}))


def vary_values(names: Sequence[str], headers: Mapping[str, str]) -> tuple[str | None, ...]:
    """The request's values for the Vary'd fields, whitespace-normalised (RFC 9111 §4.1)."""
    out: list[str | None] = []
    for name in names:
        value = headers.get(name)
        out.append(None if value is None else " ".join(value.split()))
    return tuple(out)
