"""Targeted cache control (sidecar.core.targeted), RFC 9213: which field's directives the cache
goes by, and how a targeted field is read (a Structured Fields Dictionary)."""

from __future__ import annotations

import pytest

from sidecar.core.targeted import Controls, parse_targeted, select_controls

# -- parse_targeted ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("max-age=60", {"max-age": "60"}),
    ("no-store", {"no-store": None}),
    ("max-age=60, s-maxage=30, must-revalidate",
     {"max-age": "60", "s-maxage": "30", "must-revalidate": None}),
    ('no-cache="Set-Cookie, X-User"', {"no-cache": "Set-Cookie, X-User"}),
    (r'x="a \"b\" \\ c"', {"x": r'a "b" \ c'}),  # a String is unescaped
    ("  max-age=60 ,\tpublic  ", {"max-age": "60", "public": None}),
    ("max-age=10, max-age=60", {"max-age": "60"}),  # a Dictionary keeps the last value
    ("no-store=?1", {"no-store": None}),  # Boolean true: the directive alone
    ("no-store=?0, max-age=60", {"max-age": "60"}),  # Boolean false: no directive
    ("no-store, no-store=?0", {}),  # valid, but says nothing
    ("max-age=60;source=edge", {"max-age": "60"}),  # parameters are ignored
    ("stale-if-error=1.5", {"stale-if-error": "1.5"}),  # a Decimal keeps its text
    ("x=tok/en:1", {"x": "tok/en:1"}),
    ("*x=1", {"*x": "1"}),
])
def test_a_valid_dictionary_gives_its_directives(value: str, expected: dict[str, str | None]
                                                 ) -> None:
    assert parse_targeted(value) == expected


@pytest.mark.parametrize("value", [
    "",
    "   ",
    "Max-Age=60",  # keys are lower-case in a Dictionary (a Cache-Control parser takes it)
    "max-age=60,",  # a trailing comma
    "max-age=60,,public",  # an empty member
    "max-age=60 public",
    "max-age=60s",
    "max-age=",
    "max-age=1234567890123456",  # an Integer has at most 15 digits
    "x=1.2345",  # a Decimal at most 3 fractional digits
    "x=1.",
    "x=(a b)",  # an Inner List
    "x=:aGk=:",  # a Byte Sequence
    'x="unterminated',
    'x="tab\there"',
    "x=?2",
    "max-age=60;",
    "=60",
    "1x=1",
])
def test_anything_else_is_invalid(value: str) -> None:
    assert parse_targeted(value) is None


# -- select_controls ---------------------------------------------------------------------------

EXPIRES = "Sun, 06 Nov 1994 08:49:37 GMT"
CDN = "CDN-Cache-Control"
OWN = "Sidecar-Cache-Control"


def test_without_a_targeted_field_cache_control_and_expires_decide() -> None:
    assert select_controls("max-age=60", EXPIRES, [(CDN, None)]) == Controls(
        {"max-age": "60"}, EXPIRES, "Cache-Control")
    assert select_controls("max-age=60", EXPIRES, []) == Controls(
        {"max-age": "60"}, EXPIRES, "Cache-Control")
    assert select_controls(None, None, []) == Controls({}, None, "Cache-Control")


def test_a_targeted_field_replaces_cache_control_and_expires() -> None:
    assert select_controls("no-store", EXPIRES, [(CDN, "max-age=60")]) == Controls(
        {"max-age": "60"}, None, CDN)
    assert select_controls("max-age=60", None, [(CDN, "no-store")]) == Controls(
        {"no-store": None}, None, CDN)
    # Cache-Control's private, no-cache... do not apply either: the field replaces it whole
    assert select_controls("private, no-cache", None, [(CDN, "max-age=5")]).directives == {
        "max-age": "5"}


def test_the_first_present_and_valid_field_wins() -> None:
    fields = [(OWN, "no-store"), (CDN, "max-age=60")]
    assert select_controls(None, None, fields).field == OWN
    assert select_controls(None, None, [(OWN, None), (CDN, "max-age=60")]).field == CDN
    # an invalid one is as if absent: the next decides, then Cache-Control
    assert select_controls(None, None, [(OWN, "Max-Age=1"), (CDN, "max-age=60")]) == Controls(
        {"max-age": "60"}, None, CDN)
    assert select_controls("max-age=30", EXPIRES, [(OWN, "max-age=1,"), (CDN, "")]) == Controls(
        {"max-age": "30"}, EXPIRES, "Cache-Control")
