"""Entity tags and conditional requests (RFC 9110 §8.8.3, §13.1.1-13.1.3)."""

from __future__ import annotations

import hashlib


def generate_strong_etag(body: bytes) -> str:
    """A strong validator from the bytes themselves: equal bodies, equal tags."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _opaque(tag: str) -> tuple[bool, str]:
    tag = tag.strip()
    if tag.startswith("W/"):
        return True, tag[2:]
    return False, tag


def weak_match(a: str, b: str) -> bool:
    """Weak comparison: opaque tags equal, weakness ignored (used by If-None-Match)."""
    return _opaque(a)[1] == _opaque(b)[1]


def strong_match(a: str, b: str) -> bool:
    """Strong comparison: both strong and equal (used by If-Match)."""
    weak_a, tag_a = _opaque(a)
    weak_b, tag_b = _opaque(b)
    return not weak_a and not weak_b and tag_a == tag_b


def split_etags(header: str) -> list[str]:
    """`"a", W/"b"` -> ['"a"', 'W/"b"']; commas inside quotes are kept."""
    tags: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            tags.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    tags.append("".join(current).strip())
    return [t for t in tags if t]


def none_match(if_none_match: str, etag: str | None) -> bool:
    """True when If-None-Match matches the current representation (the answer is a 304).

    `*` matches any current representation, with or without an ETag (RFC 9110 §13.1.2).
    """
    if if_none_match.strip() == "*":
        return True
    if etag is None:
        return False
    return any(weak_match(tag, etag) for tag in split_etags(if_none_match))


def not_modified(*, method: str, if_none_match: str | None, if_modified_since: float | None,
                 etag: str | None, last_modified: float | None) -> bool:
    """Should a GET/HEAD be answered 304? If-None-Match, when present, decides alone."""
    if method not in ("GET", "HEAD"):
        return False
    if if_none_match is not None:
        return none_match(if_none_match, etag)
    if if_modified_since is not None and last_modified is not None:
        return last_modified <= if_modified_since
    return False
