"""Byte ranges (RFC 9110 §14): which part of a stored representation a `Range` asks for, and
whether `If-Range` still allows a part (§13.1.5), as pure functions of the field values.

Only a single range is answered with a part. A request for several (`bytes=0-1,5-6`) would
need a `multipart/byteranges` body, and a Range the sidecar cannot read (another unit, bad
syntax) means nothing it could act on: both get the whole representation, which a server may
always send instead of parts (§14.2). That keeps one answer shape, 206 with one Content-Range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .etag import strong_match
from .freshness import strict_http_date

# int-range = first-pos "-" [ last-pos ]; suffix-range = "-" suffix-length (§14.1.1)
_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")
# Digits past this many stand for "more than any stored body": Python refuses to read integers
# of more than 4300 digits, and a header may hold 8 KiB of them.
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS
# RFC 9110 §8.8.2.2: a cache may take a Last-Modified as a strong validator only when it is at
# least this long before the entry's Date (a second could have seen two versions otherwise).
STRONG_DATE_MARGIN = 60.0


@dataclass(frozen=True, slots=True)
class ByteRange:
    """One range as sent: `first-last`, `first-` (`last` None) or `-suffix` (`first` None,
    `last` holding the suffix length)."""

    first: int | None
    last: int | None

    @property
    def whole(self) -> bool:
        """`bytes=0-`: everything, which is what a full response carries too."""
        return self.first == 0 and self.last is None


@dataclass(frozen=True, slots=True)
class Part:
    """The bytes `start` to `end` (inclusive) of a representation of `length` bytes."""

    start: int
    end: int
    length: int

    @property
    def content_range(self) -> bytes:
        return b"bytes %d-%d/%d" % (self.start, self.end, self.length)

    def of(self, body: bytes) -> bytes:
        return body[self.start : self.end + 1]


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """No byte of the range exists: a 416 whose Content-Range gives the length (§15.5.17)."""

    length: int

    @property
    def content_range(self) -> bytes:
        return b"bytes */%d" % self.length


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else _HUGE


def parse_range(value: str) -> ByteRange | None:
    """`bytes=0-499` -> ByteRange(0, 499); None for anything the cache does not answer with a
    part: another unit, several ranges, a malformed one, `last` before `first` (all invalid or
    unsupported per §14.1.1 and §14.2, so the Range is ignored). The unit is case-insensitive;
    empty list elements are skipped (RFC 9110 §5.6.1)."""
    unit, sep, ranges = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in ranges.split(",") if s.strip()]
    if len(specs) != 1:
        return None
    match = _SPEC.fullmatch(specs[0])
    if match is None:
        return None
    first, last, suffix = match.groups()
    if suffix is not None:
        return ByteRange(None, _number(suffix))
    start = _number(first)
    end = _number(last) if last else None
    if end is not None and end < start:
        return None
    return ByteRange(start, end)


def select(spec: ByteRange, length: int) -> Part | Unsatisfiable | None:
    """The part of a `length`-byte representation `spec` asks for (§14.1.2); Unsatisfiable
    when it starts past the end or is an empty suffix; None (send it whole) for a suffix of an
    empty representation, which no Content-Range can express."""
    if spec.first is None:
        suffix = spec.last or 0
        if suffix == 0:
            return Unsatisfiable(length)
        if length == 0:
            return None
        return Part(max(0, length - suffix), length - 1, length)
    if spec.first >= length:
        return Unsatisfiable(length)
    end = length - 1 if spec.last is None else min(spec.last, length - 1)
    return Part(spec.first, end, length)


def if_range_holds(if_range: str, *, etag: str | None, last_modified: float | None,
                   date: float | None, now: float) -> bool:
    """May the part be sent (§13.1.5)? An entity-tag must be a strong match of the stored
    ETag; a date must equal the stored Last-Modified, which must itself be strong: at least
    60 s before the stored Date (§8.8.2.2). Anything else, an invalid date included, means the
    client's copy may be of another version: it gets the whole representation. `now` reads an
    RFC 850 date's two-digit year."""
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return etag is not None and strong_match(value, etag)
    when = strict_http_date(value, now=now)
    return (when is not None and last_modified is not None and when == last_modified
            and date is not None and date - last_modified >= STRONG_DATE_MARGIN)


def range_answer(range_value: str, if_range: str | None, *, length: int, etag: str | None,
                 last_modified: float | None, date: float | None, now: float
                 ) -> Part | Unsatisfiable | None:
    """What a GET with `Range` gets from a stored full response: a Part (206), Unsatisfiable
    (416), or None: the whole response (200). If-Range is evaluated first (§13.2.2), so a
    client whose copy is outdated gets the new version whole even for a range past its end."""
    spec = parse_range(range_value)
    if spec is None:
        return None
    if if_range is not None and not if_range_holds(
            if_range, etag=etag, last_modified=last_modified, date=date, now=now):
        return None
    return select(spec, length)
