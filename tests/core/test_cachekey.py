"""Cache keys and Vary's secondary keys (sidecar.core.cachekey), RFC 9111 §2 and §4.1."""

from __future__ import annotations

import typing

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import CacheKeyConfig
from sidecar.core.cachekey import (
    normalize_list,
    normalize_target,
    primary_key,
    vary_names,
    vary_values,
)


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Request headers as the edge hands them over: case-insensitive, repeated lines kept."""
    return CIMultiDictProxy(CIMultiDict(pairs))


# -- normalize_target ------------------------------------------------------------------------

QUERY_MODES = typing.get_args(CacheKeyConfig.model_fields["query"].annotation)

TARGETS = [
    # (raw target, {mode: key})
    ("/p", {"sorted": "/p", "exact": "/p", "ignore": "/p"}),
    ("/p?b=2&a=1", {"sorted": "/p?a=1&b=2", "exact": "/p?b=2&a=1", "ignore": "/p"}),
    ("/p?a=1&b=2", {"sorted": "/p?a=1&b=2", "exact": "/p?a=1&b=2", "ignore": "/p"}),
    ("/p?b&a", {"sorted": "/p?a&b", "exact": "/p?b&a", "ignore": "/p"}),
    ("/p?", {"sorted": "/p", "exact": "/p", "ignore": "/p"}),
    ("/p?&b=2&&a=1&", {"sorted": "/p?a=1&b=2", "exact": "/p?&b=2&&a=1&", "ignore": "/p"}),
    # the path is kept byte for byte: case and percent-encoding are significant
    ("/A/b%2Fc?x=%41", {"sorted": "/A/b%2Fc?x=%41", "exact": "/A/b%2Fc?x=%41",
                        "ignore": "/A/b%2Fc"}),
    # only the first `?` starts the query
    ("/p?a=1?b=2", {"sorted": "/p?a=1?b=2", "exact": "/p?a=1?b=2", "ignore": "/p"}),
    ("/p?q=a%26b&a=1", {"sorted": "/p?a=1&q=a%26b", "exact": "/p?q=a%26b&a=1",
                        "ignore": "/p"}),
]


def test_every_query_mode_of_the_config_is_covered() -> None:
    assert QUERY_MODES  # the config names its modes in a Literal
    for _target, expected in TARGETS:
        assert set(expected) == set(QUERY_MODES)


@pytest.mark.parametrize(("target", "mode", "key"),
                         [(t, m, k) for t, by_mode in TARGETS for m, k in by_mode.items()])
def test_normalize_target(target: str, mode: str, key: str) -> None:
    assert normalize_target(target, mode) == key


@pytest.mark.parametrize(
    ("a", "b", "same_for"),
    [
        ("/p?b=2&a=1", "/p?a=1&b=2", {"sorted", "ignore"}),
        ("/p?a=1", "/p?a=2", {"ignore"}),
        ("/p?a=1", "/p", {"ignore"}),
        ("/p", "/q", set()),
        ("/p?a=1", "/p?A=1", {"ignore"}),
        ("/p?a=1&b=2", "/p?a=1&b=3", {"ignore"}),
    ],
)
def test_which_targets_share_an_entry(a: str, b: str, same_for: set[str]) -> None:
    for mode in QUERY_MODES:
        assert (normalize_target(a, mode) == normalize_target(b, mode)) is (mode in same_for)


def test_sorted_mode_keeps_the_order_of_a_repeated_parameter() -> None:
    assert normalize_target("/p?tag=b&tag=a", "sorted") != normalize_target("/p?tag=a&tag=b",
                                                                            "sorted")


# -- primary_key -------------------------------------------------------------------------------


def key(host: str = "example.com", target: str = "/p", request: CIMultiDictProxy[str] | None = None,
        key_headers: tuple[str, ...] = (), key_cookies: tuple[str, ...] = ()) -> str:
    return primary_key(host, target, request if request is not None else headers(),
                       key_headers, key_cookies)


def test_host_is_part_of_the_key_case_insensitively() -> None:
    assert key(host="Example.COM") == key(host="example.com")
    assert key(host="a.example.com") != key(host="b.example.com")
    assert key(host="example.com:8080") != key(host="example.com:8081")


def test_target_is_part_of_the_key() -> None:
    assert key(target="/p?a=1") != key(target="/p?a=2")
    assert key(target="/p") != key(target="/P")


def test_unkeyed_headers_and_cookies_are_not_part_of_the_key() -> None:
    plain = key()
    assert key(request=headers(("Accept-Language", "fr"), ("User-Agent", "x"),
                               ("Cookie", "lang=fr; session=abc"),
                               ("Authorization", "Bearer t"))) == plain
    assert key(request=headers(("Accept-Language", "fr"), ("Cookie", "session=abc")),
               key_headers=("X-Tenant",), key_cookies=("lang",)) == key(
        request=headers(("Accept-Language", "de"), ("Cookie", "session=xyz")),
        key_headers=("X-Tenant",), key_cookies=("lang",))


@pytest.mark.parametrize("configured", ["Accept-Language", "accept-language", "ACCEPT-LANGUAGE"])
def test_keyed_headers_are_part_of_the_key(configured: str) -> None:
    en = key(request=headers(("accept-language", "en")), key_headers=(configured,))
    fr = key(request=headers(("Accept-Language", "fr")), key_headers=(configured,))
    absent = key(key_headers=(configured,))
    assert len({en, fr, absent}) == 3
    assert en == key(request=headers(("Accept-Language", "en"), ("User-Agent", "y")),
                     key_headers=(configured,))


def test_keyed_header_values_cannot_shift_into_each_other() -> None:
    names = ("X-A", "X-B")
    assert key(request=headers(("X-A", "1")), key_headers=names) != key(
        request=headers(("X-B", "1")), key_headers=names)


def test_a_keyed_header_sent_twice_is_keyed_by_all_its_lines() -> None:
    once = key(request=headers(("X-Tenant", "a")), key_headers=("X-Tenant",))
    twice = key(request=headers(("X-Tenant", "a"), ("X-Tenant", "b")), key_headers=("X-Tenant",))
    assert once != twice


def test_keyed_cookies_are_part_of_the_key() -> None:
    def k(cookie: str | None) -> str:
        request = headers(("Cookie", cookie)) if cookie is not None else headers()
        return key(request=request, key_cookies=("lang",))

    assert k("lang=en") != k("lang=fr")
    assert k("lang=en") != k(None)
    assert k("lang=en; session=1") == k("session=2; lang=en")  # other cookies, any order
    assert k("lang=en") == k("lang=en; theme=dark")
    assert k("language=en") == k(None)  # a cookie name is matched whole


@pytest.mark.parametrize("cookie", ['x="unterminated; lang=fr', "=;;=", "\x00", ";"])
def test_a_malformed_cookie_header_does_not_raise(cookie: str) -> None:
    assert key(request=headers(("Cookie", cookie)), key_cookies=("lang",)).startswith(
        "example.com\n/p\n")


@pytest.mark.parametrize("cookie", ["expires=1; lang=fr", "path=/; lang=fr", "a b; lang=fr"])
def test_a_keyed_cookie_is_read_whatever_precedes_it(cookie: str) -> None:
    keyed = key(request=headers(("Cookie", cookie)), key_cookies=("lang",))
    assert keyed == key(request=headers(("Cookie", "lang=fr")), key_cookies=("lang",))


def test_a_keyed_cookie_sent_twice_does_not_share_a_single_value_entry() -> None:
    def k(cookie: str) -> str:
        return key(request=headers(("Cookie", cookie)), key_cookies=("lang",))

    assert k("lang=en; lang=fr") not in {k("lang=en"), k("lang=fr")}


# -- Vary ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vary", "names"),
    [
        (None, ()),
        ("", ()),
        (" , ,", ()),
        ("Accept-Encoding", ("accept-encoding",)),
        # field names are case-insensitive; order and repetition do not matter
        ("Accept-Encoding, Accept", ("accept", "accept-encoding")),
        ("accept,ACCEPT-ENCODING , Accept", ("accept", "accept-encoding")),
        # `*` is kept so that it can be seen (such a response is never stored)
        ("*", ("*",)),
        ("Accept, *", ("*", "accept")),
    ],
)
def test_vary_names(vary: str | None, names: tuple[str, ...]) -> None:
    assert vary_names(vary) == names


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        # RFC 9111 §4.1: values compared after removing whitespace where the syntax allows it
        ((("Accept-Encoding", "gzip, br"),), (("accept-encoding", "gzip, br"),), True),
        ((("Accept-Encoding", "gzip,  br"),), (("Accept-Encoding", " gzip, br "),), True),
        ((("Accept-Encoding", "gzip"),), (("Accept-Encoding", "br"),), False),
        ((("Accept-Encoding", "gzip"),), (("Accept-Encoding", "GZIP-x"),), False),
        # an absent field matches only an absent field, not an empty one
        ((), (("Accept-Encoding", ""),), False),
        ((), (), True),
        # headers not named by Vary do not matter
        ((("Accept-Encoding", "gzip"), ("User-Agent", "a")),
         (("Accept-Encoding", "gzip"), ("User-Agent", "b")), True),
        # repeated field lines are combined before comparing (RFC 9111 §4.1, RFC 9110 §5.3)
        ((("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")),
         (("Accept-Encoding", "gzip, br"),), True),
        ((("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")),
         (("Accept-Encoding", "gzip"),), False),
    ],
)
def test_vary_values(a: tuple[tuple[str, str], ...], b: tuple[tuple[str, str], ...],
                     match: bool) -> None:
    names = vary_names("Accept-Encoding")
    assert (vary_values(names, headers(*a)) == vary_values(names, headers(*b))) is match


def test_vary_values_follow_the_order_of_the_names() -> None:
    request = headers(("Accept", "text/html"), ("Accept-Encoding", "gzip"))
    names = vary_names("Accept-Encoding, Accept")
    assert vary_values(names, request) == ("text/html", "gzip")
    assert vary_values(vary_names("Accept-Language, Accept"), request) == ("text/html", None)
    assert vary_values((), request) == ()


def test_vary_values_on_a_plain_mapping() -> None:
    # a mapping without repeated lines works too (lookups are then as the mapping does them)
    assert vary_values(("x-flavour",), {"x-flavour": " b,\ta "}) == ("b, a",)
    assert vary_values(("accept-encoding",), {"accept-encoding": " gzip,\tbr "}) == ("br,gzip",)
    assert vary_values(("accept-encoding",), {}) == (None,)


@pytest.mark.parametrize(
    ("name", "a", "b", "match"),
    [
        # item order, case and the whitespace around items do not make a variant
        ("Accept-Language", "en-US, fr", "fr,en-us", True),
        ("Accept-Language", "en-US;q=0.8 , fr", "FR, en-us ; q=0.8", True),
        ("Accept-Encoding", "gzip, br", "BR,\tGZIP", True),
        ("Accept-Charset", "utf-8, iso-8859-1;q=0.5", "ISO-8859-1;q=0.5,UTF-8", True),
        # empty list elements are ignored (RFC 9110 §5.6.1)
        ("Accept-Encoding", "gzip,, br,", "br, gzip", True),
        # ...but different items, or a different weight, still do
        ("Accept-Language", "en-US, fr", "en-GB, fr", False),
        ("Accept-Language", "en;q=0.8, fr", "en;q=0.9, fr", False),
        ("Accept-Encoding", "gzip", "gzip, br", False),
        # a repeated item is kept: no more is assumed of the list than its order not mattering
        ("Accept-Encoding", "gzip, gzip", "gzip", False),
        # Accept: the media range is case-insensitive, a parameter's value may not be
        ("Accept", "text/html, application/json", "Application/JSON,TEXT/HTML", True),
        ("Accept", "text/html; level=1", "text/html;level=1", True),
        ("Accept", "text/html;level=A", "text/html;level=a", False),
        # a quoted string may hold a comma: such a value is only whitespace-collapsed
        ("Accept", 'text/plain;x="a,b", text/html', 'text/plain;x="a,b",  text/html', True),
        ("Accept", 'text/plain;x="a,b", text/html', 'text/html, text/plain;x="a,b"', False),
        # other fields are compared as sent, whitespace collapsed: their case may matter
        ("User-Agent", "Agent/1 (X11)", "agent/1 (x11)", False),
        ("X-Flavour", "b, a", "a, b", False),
        ("X-Flavour", "a,  b", "a, b", True),
    ],
)
def test_vary_values_of_list_fields_ignore_order_and_case(name: str, a: str, b: str,
                                                          match: bool) -> None:
    names = vary_names(name)
    assert (vary_values(names, headers((name, a))) == vary_values(names, headers((name, b)))
            ) is match


def test_list_fields_combine_repeated_lines_before_sorting() -> None:
    names = vary_names("Accept-Language")
    split = headers(("Accept-Language", "fr"), ("Accept-Language", "en-US"))
    assert vary_values(names, split) == vary_values(names, headers(("Accept-Language",
                                                                    "en-us, fr")))


def test_normalize_list_is_idempotent_and_order_free() -> None:
    value = normalize_list(" fr-CH ,en;q=0.5 , de ", media=False)
    assert value == "de,en;q=0.5,fr-ch"
    assert normalize_list(value, media=False) == value
    assert normalize_list("", media=False) == ""
    assert normalize_list("Text/HTML;Level=1", media=True) == "text/html;Level=1"
