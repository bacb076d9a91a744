"""What makes two requests the same cache entry: the key, and Vary's secondary key."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import unquote_plus

# Behind a trusted load balancer (server.trust_forwarded) these say which public URL an answer
# is for: keyed by the cache and by dedup, else two hosts would share one answer.
TRUSTED_FORWARDING = ("X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Forwarded-Port",
                      "X-Forwarded-Prefix")


def normalize_target(raw_target: str, query_mode: str) -> str:
    """`/p?b=2&a=1` -> `/p?a=1&b=2` (sorted), as sent (exact), or `/p` (ignore)."""
    path, sep, query = raw_target.partition("?")
    if not sep or query_mode == "ignore":
        return path
    # Some frameworks also split the query on `;`: moving `&` pairs could then reorder the
    # parameters inside them, so such a query stays as sent.
    if query_mode == "sorted" and ";" not in query:
        # stable on the name alone: `tag=b&tag=a` is an ordered list the app may read as such
        query = "&".join(sorted((p for p in query.split("&") if p), key=_name_order))
    return f"{path}?{query}" if query else path


_PUNCTUATION = re.compile(r"[\W_]+")


def _name_order(pair: str) -> str:
    """What `sorted` orders a pair by: its name read as loosely as any application might
    (percent-decoded, `+` as a space, case-folded, punctuation alike: PHP reads `a.b` as
    `a_b`), so that names an application may take for one keep their order, as repeats do:
    `?%61=1&a=2` and `?a=2&%61=1` are different lists of `a`."""
    return _PUNCTUATION.sub("_", unquote_plus(pair.partition("=")[0]).casefold())


def primary_key(host: str, target: str, headers: Mapping[str, str],
                key_headers: Sequence[str], key_cookies: Sequence[str]) -> str:
    """One string naming the entry; headers and cookies listed in the policy are part of it.

    Every line of a keyed header counts, and every value of a keyed cookie, in order: the
    upstream may read any of them, so a request differing in any must not share the entry.
    """
    parts = [host.lower(), target]
    getall = getattr(headers, "getall", None)
    for name in key_headers:
        if getall is not None:
            parts.append("\r".join(getall(name, ())))
        else:
            parts.append(headers.get(name, ""))
    if key_cookies:
        if getall is not None:
            cookie_header = "; ".join(getall("Cookie", ()))
        else:
            cookie_header = headers.get("Cookie", "")
        jar = request_cookies(cookie_header)
        for name in key_cookies:
            parts.append("\r".join(jar.get(name, ())))
    return "\n".join(parts)


def request_cookies(header: str) -> dict[str, list[str]]:
    """Every value of every cookie in a request's Cookie header, in the order sent.

    Written by hand because http.cookies parses Set-Cookie syntax: it drops the whole header
    when a cookie is named like an attribute (`path`, `expires`) or one pair is malformed,
    and keeps only the last of repeated names, which would let variants share an entry.
    """
    jar: dict[str, list[str]] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        jar.setdefault(name, []).append(value)
    return jar


def vary_names(vary: str | None) -> tuple[str, ...]:
    if not vary:
        return ()
    return tuple(sorted({v.strip().lower() for v in vary.split(",") if v.strip()}))


# Vary'd request fields that are comma-separated lists of case-insensitive items (RFC 9110
# §12.5): content codings, language ranges, charsets, and media ranges up to their parameters.
# Their items are compared as a set of lower-cased items, so the order a browser lists them in
# and its spelling do not make a variant of their own. Any other field is compared as sent.
_CASELESS_LISTS = frozenset({"accept-encoding", "accept-language", "accept-charset"})
_MEDIA_LISTS = frozenset({"accept"})


def vary_values(names: Sequence[str], headers: Mapping[str, str]) -> tuple[str | None, ...]:
    """The request's values for the Vary'd fields, normalised (RFC 9111 §4.1).

    Whitespace is collapsed in every field; list fields of case-insensitive items
    (`_CASELESS_LISTS`, `_MEDIA_LISTS`) also lose item order, case and empty items.
    Repeated field lines count combined, as the upstream sees them: `getall` of a multidict.
    """
    getall = getattr(headers, "getall", None)
    out: list[str | None] = []
    for name in names:
        if getall is not None:
            lines: list[str] = getall(name, [])
            value = ", ".join(lines) if lines else None
        else:
            value = headers.get(name)
        if value is None:
            out.append(None)
        elif name in _CASELESS_LISTS or name in _MEDIA_LISTS:
            out.append(normalize_list(value, media=name in _MEDIA_LISTS))
        else:
            out.append(" ".join(value.split()))
    return tuple(out)


def normalize_list(value: str, *, media: bool) -> str:
    """`fr, en-US;q=0.8` and `en-us ; q=0.8,fr` -> `en-us;q=0.8,fr`: items sorted, lower-cased,
    without the optional whitespace around commas and semicolons (RFC 9110 §5.6.1, §5.6.6).

    `media`: only the media range before the first `;` is lower-cased, since a media type's
    parameter values may be case-sensitive (RFC 9110 §8.3.1). A value with a quoted string is
    only whitespace-collapsed: a comma or semicolon inside the quotes is not a separator, and
    telling so is not worth a parser here.
    """
    if '"' in value:
        return " ".join(value.split())
    items = []
    for item in value.split(","):
        parts = [part.strip() for part in item.split(";")]
        if not parts[0]:
            continue  # an empty list element, which recipients ignore (RFC 9110 §5.6.1)
        if media:
            parts[0] = parts[0].lower()
            items.append(";".join(" ".join(part.split()) for part in parts))
        else:
            items.append(";".join(" ".join(part.split()) for part in parts).lower())
    return ",".join(sorted(items))
