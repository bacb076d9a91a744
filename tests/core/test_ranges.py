"""Byte ranges and If-Range (sidecar.core.ranges), RFC 9110 §14 and §13.1.5, with time passed
in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.ranges import (
    ByteRange,
    Part,
    Unsatisfiable,
    if_range_holds,
    parse_range,
    range_answer,
    select,
)

# Sun, 06 Nov 1994 08:49:37 GMT, the example date of RFC 9110 §5.6.7.
T = 784111777.0
IMF_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"


# -- parse_range -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes=0-499", ByteRange(0, 499)),
    ("bytes=500-", ByteRange(500, None)),
    ("bytes=-500", ByteRange(None, 500)),
    ("bytes=0-0", ByteRange(0, 0)),
    ("bytes=0-", ByteRange(0, None)),
    ("Bytes=1-2", ByteRange(1, 2)),  # the unit is case-insensitive (§14.1)
    ("bytes= 1-2 ", ByteRange(1, 2)),
    ("bytes=1-2,", ByteRange(1, 2)),  # empty list elements are skipped (§5.6.1)
    ("bytes=007-009", ByteRange(7, 9)),
    ("bytes=-0", ByteRange(None, 0)),  # valid, though never satisfiable
])
def test_single_ranges_are_read(value: str, expected: ByteRange) -> None:
    assert parse_range(value) == expected


@pytest.mark.parametrize("value", [
    "bytes=0-1,5-6",  # several ranges: the whole representation instead (§14.2)
    "bytes=0-1, -5",
    "bytes=5-1",  # last before first: invalid (§14.1.1)
    "bytes=",
    "bytes",
    "bytes=-",
    "bytes=a-b",
    "bytes=1 - 2",
    "bytes=+1-2",
    "bytes=\u0661-\u0662",  # digits, but not ASCII ones (ARABIC-INDIC ONE, TWO)
    "items=0-1",  # another unit
    "0-1",
    "",
])
def test_anything_else_is_ignored(value: str) -> None:
    assert parse_range(value) is None


def test_huge_numbers_are_read_without_error() -> None:
    # Python refuses to turn more than 4300 digits into an int: the cache must not.
    assert parse_range("bytes=" + "9" * 5000 + "-") == ByteRange(10**18, None)
    assert parse_range("bytes=0-" + "9" * 5000) == ByteRange(0, 10**18)
    assert parse_range("bytes=-" + "9" * 5000) == ByteRange(None, 10**18)
    assert parse_range("bytes=" + "0" * 5000 + "1-2") == ByteRange(1, 2)


# -- select ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "length", "expected"), [
    (ByteRange(0, 499), 1000, Part(0, 499, 1000)),
    (ByteRange(500, None), 1000, Part(500, 999, 1000)),
    (ByteRange(0, 5000), 1000, Part(0, 999, 1000)),  # last past the end: up to the end
    (ByteRange(None, 100), 1000, Part(900, 999, 1000)),
    (ByteRange(None, 5000), 1000, Part(0, 999, 1000)),  # a suffix longer than it all
    (ByteRange(999, 999), 1000, Part(999, 999, 1000)),
    (ByteRange(1000, None), 1000, Unsatisfiable(1000)),  # starts past the end
    (ByteRange(1000, 2000), 1000, Unsatisfiable(1000)),
    (ByteRange(None, 0), 1000, Unsatisfiable(1000)),
    (ByteRange(0, None), 0, Unsatisfiable(0)),
    (ByteRange(None, 5), 0, None),  # empty: no Content-Range can say it, sent whole
])
def test_select(spec: ByteRange, length: int, expected: Part | Unsatisfiable | None) -> None:
    assert select(spec, length) == expected


def test_content_ranges() -> None:
    assert Part(0, 499, 1000).content_range == b"bytes 0-499/1000"
    assert Unsatisfiable(1000).content_range == b"bytes */1000"
    assert Part(2, 4, 10).of(b"0123456789") == b"234"


@given(body=st.binary(max_size=64), first=st.integers(0, 80), last=st.integers(0, 80) | st.none())
def test_an_int_range_is_the_python_slice(body: bytes, first: int, last: int | None) -> None:
    if last is not None and last < first:
        return
    value = f"bytes={first}-{'' if last is None else last}"
    spec = parse_range(value)
    assert spec is not None
    answer = select(spec, len(body))
    expected = body[first : None if last is None else last + 1]
    if first >= len(body):
        assert answer == Unsatisfiable(len(body))
    else:
        assert isinstance(answer, Part)
        assert answer.of(body) == expected
        assert answer.end - answer.start + 1 == len(expected)


@given(body=st.binary(min_size=1, max_size=64), suffix=st.integers(1, 80))
def test_a_suffix_range_is_the_last_bytes(body: bytes, suffix: int) -> None:
    answer = select(ByteRange(None, suffix), len(body))
    assert isinstance(answer, Part) and answer.of(body) == body[-suffix:]


# -- if_range_holds ----------------------------------------------------------------------------

LAST_MODIFIED = T - 3600  # an hour before the entry's Date: a strong validator


@pytest.mark.parametrize(("if_range", "etag", "holds"), [
    ('"v1"', '"v1"', True),
    ('"v1"', '"v2"', False),
    ('W/"v1"', '"v1"', False),  # strong comparison only (§13.1.5)
    ('"v1"', 'W/"v1"', False),
    ('"v1"', None, False),
])
def test_an_entity_tag_must_match_strongly(if_range: str, etag: str | None, holds: bool) -> None:
    assert if_range_holds(if_range, etag=etag, last_modified=LAST_MODIFIED, date=T,
                          now=T) is holds


def test_a_date_must_equal_a_strong_last_modified() -> None:
    def holds(if_range: str, *, last_modified: float | None = LAST_MODIFIED,
              date: float | None = T) -> bool:
        return if_range_holds(if_range, etag='"v1"', last_modified=last_modified, date=date,
                              now=T)

    assert holds("Sun, 06 Nov 1994 07:49:37 GMT")
    assert holds("Sunday, 06-Nov-94 07:49:37 GMT")  # the obsolete forms are dates too
    assert not holds("Sun, 06 Nov 1994 07:49:38 GMT")  # a second later: another version
    assert not holds("Sun, 06 Nov 1994 07:49:36 GMT")  # earlier is not "unchanged" either
    assert not holds("Sun, 06 Nov 1994 07:49:37 GMT", last_modified=None)
    # Last-Modified within 60 s of Date: weak (§8.8.2.2), so no part on its word
    assert not holds(IMF_DATE, last_modified=T, date=T + 59)
    assert holds(IMF_DATE, last_modified=T, date=T + 60)
    assert not holds(IMF_DATE, last_modified=T, date=None)
    assert not holds("yesterday")
    assert not holds("Sun, 06 Nov 1994 07:49:37 +0000")  # not an HTTP-date form


# -- range_answer ------------------------------------------------------------------------------


def answer(range_value: str, if_range: str | None = None,
           length: int = 1000) -> Part | Unsatisfiable | None:
    return range_answer(range_value, if_range, length=length, etag='"v1"',
                        last_modified=LAST_MODIFIED, date=T, now=T)


def test_range_answer() -> None:
    assert answer("bytes=0-9") == Part(0, 9, 1000)
    assert answer("bytes=0-9", '"v1"') == Part(0, 9, 1000)
    assert answer("bytes=0-9", '"v0"') is None  # outdated copy: all of the new one
    assert answer("bytes=5000-") == Unsatisfiable(1000)
    # If-Range first (§13.2.2): an outdated copy gets it whole, not a 416
    assert answer("bytes=5000-", '"v0"') is None
    assert answer("bytes=0-1,5-6") is None
    assert answer("bytes=0-1,5-6", '"v1"') is None
    assert answer("nonsense", '"v1"') is None
