"""Entity tags and conditional GET/HEAD (sidecar.core.etag), RFC 9110 §8.8.3 and §13.1."""

from __future__ import annotations

import re

import pytest

from sidecar.core.etag import (
    generate_strong_etag,
    none_match,
    not_modified,
    split_etags,
    strong_match,
    weak_match,
)

# entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE (RFC 9110 §8.8.3)
STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e\x80-\xff]*"')


# -- generate_strong_etag ------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"hello", b"\x00\xff" * 1000])
def test_generated_etag_is_a_valid_strong_tag(body: bytes) -> None:
    assert STRONG_ETAG.fullmatch(generate_strong_etag(body))


def test_generated_etag_depends_only_on_the_bytes() -> None:
    assert generate_strong_etag(b"hello") == generate_strong_etag(b"".join([b"hel", b"lo"]))
    assert generate_strong_etag(b"hello") != generate_strong_etag(b"hellO")
    assert generate_strong_etag(b"") != generate_strong_etag(b"\x00")
    tags = {generate_strong_etag(str(i).encode()) for i in range(1000)}
    assert len(tags) == 1000


def test_generated_etag_is_stable_across_releases() -> None:
    # Instances and workers of different versions must agree, or every client revalidation
    # after a deploy is a full 200: changing the algorithm is a deliberate decision.
    assert generate_strong_etag(b"") == '"b8e1dda3ac0aa3820ad2990b"'
    assert generate_strong_etag(b"hello") == '"8ed7252f4b03f9e8376db5b2"'


# -- comparison ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "weak", "strong"),
    [
        # the table of RFC 9110 §8.8.3.2
        ('W/"1"', 'W/"1"', True, False),
        ('W/"1"', 'W/"2"', False, False),
        ('W/"1"', '"1"', True, False),
        ('"1"', '"1"', True, True),
        # opaque tags are compared octet by octet: case matters
        ('"abc"', '"ABC"', False, False),
        ('"1"', '"2"', False, False),
        # the W/ prefix is case-sensitive (%s"W/"): w/"1" is not a weak "1"
        ('w/"1"', '"1"', False, False),
    ],
)
def test_weak_and_strong_comparison(a: str, b: str, weak: bool, strong: bool) -> None:
    assert weak_match(a, b) is weak
    assert weak_match(b, a) is weak
    assert strong_match(a, b) is strong
    assert strong_match(b, a) is strong


@pytest.mark.parametrize(
    ("header", "tags"),
    [
        ('"a"', ['"a"']),
        ('"a","b"', ['"a"', '"b"']),
        ('  "a" ,   W/"b"  ,"c"', ['"a"', 'W/"b"', '"c"']),
        ('"a,b", "c"', ['"a,b"', '"c"']),  # a comma is a legal etagc
        (',, "a" ,', ['"a"']),
        ("", []),
    ],
)
def test_split_etags(header: str, tags: list[str]) -> None:
    assert split_etags(header) == tags


# -- If-None-Match ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("if_none_match", "etag", "expected"),
    [
        ('"v1"', '"v1"', True),
        ('"v2"', '"v1"', False),
        # weak comparison (RFC 9110 §13.1.2): weakness on either side does not matter
        ('W/"v1"', '"v1"', True),
        ('"v1"', 'W/"v1"', True),
        ('W/"v1"', 'W/"v1"', True),
        ('W/"v2"', 'W/"v1"', False),
        # lists, with or without spaces, match if any member does
        ('"a", "b", "v1"', '"v1"', True),
        ('"a","v1"', '"v1"', True),
        ('"a" ,  W/"v1" ', '"v1"', True),
        ('"a", "b"', '"v1"', False),
        ('"a,v1"', '"v1"', False),
        ('"a,v1"', '"a,v1"', True),
        ('"V1"', '"v1"', False),
        ("v1", '"v1"', False),  # not an entity-tag
        ("", '"v1"', False),
        # `*`: any current representation (§13.1.2), with or without an ETag
        ("*", '"v1"', True),
        (" * ", 'W/"v1"', True),
        ("*", None, True),
        ('"v1"', None, False),
    ],
)
def test_none_match(if_none_match: str, etag: str | None, expected: bool) -> None:
    assert none_match(if_none_match, etag) is expected
    assert not_modified(method="GET", if_none_match=if_none_match, if_modified_since=None,
                        etag=etag, last_modified=None) is expected


# -- If-Modified-Since -----------------------------------------------------------------------

LAST_MODIFIED = 784111777.0


@pytest.mark.parametrize(
    ("if_modified_since", "last_modified", "expected"),
    [
        (LAST_MODIFIED, LAST_MODIFIED, True),        # not modified since: equal is enough
        (LAST_MODIFIED + 60, LAST_MODIFIED, True),
        (LAST_MODIFIED - 1, LAST_MODIFIED, False),   # modified after the client's copy
        (None, LAST_MODIFIED, False),                # invalid date: the field is ignored
        (LAST_MODIFIED, None, False),                # nothing to compare with
    ],
)
def test_if_modified_since(if_modified_since: float | None, last_modified: float | None,
                           expected: bool) -> None:
    # RFC 9110 §13.1.3
    assert not_modified(method="GET", if_none_match=None, if_modified_since=if_modified_since,
                        etag='"v1"', last_modified=last_modified) is expected


@pytest.mark.parametrize(
    ("if_none_match", "if_modified_since", "expected"),
    [
        ('"other"', LAST_MODIFIED + 60, False),  # If-Modified-Since alone would say 304
        ('"v1"', LAST_MODIFIED - 60, True),      # If-Modified-Since alone would say 200
        ("*", LAST_MODIFIED - 60, True),
        ("", LAST_MODIFIED + 60, False),
    ],
)
def test_if_modified_since_is_ignored_when_if_none_match_is_present(
        if_none_match: str, if_modified_since: float, expected: bool) -> None:
    # RFC 9110 §13.1.3: a recipient MUST ignore If-Modified-Since if the request contains an
    # If-None-Match header field
    assert not_modified(method="GET", if_none_match=if_none_match,
                        if_modified_since=if_modified_since, etag='"v1"',
                        last_modified=LAST_MODIFIED) is expected


def test_no_conditionals_no_304() -> None:
    assert not not_modified(method="GET", if_none_match=None, if_modified_since=None,
                            etag='"v1"', last_modified=LAST_MODIFIED)


# -- methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "expected"),
                         [("GET", True), ("HEAD", True), ("POST", False), ("PUT", False),
                          ("DELETE", False), ("PATCH", False), ("OPTIONS", False),
                          ("get", False)])  # methods are case-sensitive (RFC 9110 §9.1)
def test_304_only_for_get_and_head(method: str, expected: bool) -> None:
    # RFC 9110 §13.1.2: other methods answer a matching If-None-Match with 412, not 304;
    # If-Modified-Since is ignored outside GET and HEAD (§13.1.3)
    assert not_modified(method=method, if_none_match='"v1"', if_modified_since=None,
                        etag='"v1"', last_modified=None) is expected
    assert not_modified(method=method, if_none_match=None,
                        if_modified_since=LAST_MODIFIED, etag=None,
                        last_modified=LAST_MODIFIED) is expected
