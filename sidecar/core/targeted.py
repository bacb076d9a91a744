"""Targeted cache control (RFC 9213): response fields such as `CDN-Cache-Control` that carry
Cache-Control directives for one class of caches. The cache that honours one takes its
directives instead of `Cache-Control` and `Expires`, for its own decisions only: what the
client receives is left as the upstream sent it.

A targeted field is a Dictionary Structured Field (RFC 8941 §3.2), not a Cache-Control list:
`Max-Age=60` (an upper-case key) or a trailing comma make it invalid, and an invalid field is
ignored as if absent, so the next one listed, or Cache-Control, decides. It is read here as a
subset of a Dictionary: members whose value is an Inner List or a Byte Sequence (meaningless
for a cache directive) make the field invalid too; parameters are allowed and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from .freshness import Directives, parse_cache_control

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_NUMBER = re.compile(r"-?([0-9]+)(?:\.([0-9]+))?")
_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_BOOLEAN = re.compile(r"\?([01])")
_OWS = " \t"


class Controls(NamedTuple):
    """The directives the cache goes by for one response, the Expires it may use (None when a
    targeted field decides: RFC 9213 §2.2 says to ignore it then), and the field they are from."""

    directives: Directives
    expires: str | None
    field: str


class _Invalid(Exception):
    pass


def _bare_item(text: str, pos: int) -> tuple[str | bool, int]:
    """A bare item at `pos` as a directive argument (True/False for Booleans), and the
    position after it. An Integer or Decimal keeps its digits as written, which is what
    delta_seconds reads; a String is unescaped."""
    if match := _NUMBER.match(text, pos):
        whole, fraction = match.groups()
        if (len(whole) > 15 if fraction is None
                else len(whole) > 12 or len(fraction) > 3):
            raise _Invalid
        return match.group(), match.end()
    if match := _STRING.match(text, pos):
        return re.sub(r"\\(.)", r"\1", match.group(1)), match.end()
    if match := _TOKEN.match(text, pos):
        return match.group(), match.end()
    if match := _BOOLEAN.match(text, pos):
        return match.group(1) == "1", match.end()
    raise _Invalid  # an Inner List, a Byte Sequence, or nothing valid


def _skip_parameters(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] == ";":
        pos += 1
        while pos < len(text) and text[pos] == " ":
            pos += 1
        key = _KEY.match(text, pos)
        if key is None:
            raise _Invalid
        pos = key.end()
        if pos < len(text) and text[pos] == "=":
            _, pos = _bare_item(text, pos + 1)
    return pos


def parse_targeted(value: str) -> Directives | None:
    """`max-age=60, no-cache="Set-Cookie"` -> {"max-age": "60", "no-cache": "Set-Cookie"};
    None when the field is empty or not a valid Dictionary (RFC 8941 §4.2.2). A key repeated
    keeps its last value, as Dictionaries do; `key=?0` (false) means the directive is absent."""
    text = value.strip(_OWS)
    if not text:
        return None
    members: dict[str, str | bool] = {}
    pos = 0
    try:
        while True:
            key = _KEY.match(text, pos)
            if key is None:
                return None
            pos = key.end()
            item: str | bool = True
            if pos < len(text) and text[pos] == "=":
                item, pos = _bare_item(text, pos + 1)
            pos = _skip_parameters(text, pos)
            members[key.group()] = item
            while pos < len(text) and text[pos] in _OWS:
                pos += 1
            if pos == len(text):
                break
            if text[pos] != ",":
                return None
            pos += 1
            while pos < len(text) and text[pos] in _OWS:
                pos += 1
            if pos == len(text):
                return None  # a trailing comma
    except _Invalid:
        return None
    return {k: None if v is True else v for k, v in members.items() if v is not False}


def select_controls(cache_control: str | None, expires: str | None,
                    targeted: Sequence[tuple[str, str | None]]) -> Controls:
    """RFC 9213 §2.2: the first of the `targeted` fields (name, value; None when absent), in
    the operator's order, that is present and valid decides; otherwise Cache-Control and
    Expires do, as if no targeted field had been sent."""
    for name, value in targeted:
        if value is None:
            continue
        directives = parse_targeted(value)
        if directives is not None:
            return Controls(directives, None, name)
    return Controls(parse_cache_control(cache_control), expires, "Cache-Control")
