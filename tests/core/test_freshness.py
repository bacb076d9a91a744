"""RFC 9111 freshness rules of a shared cache (sidecar.core.freshness), with time passed in."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from sidecar.core.freshness import (
    Freshness,
    Verdict,
    default_lifetime,
    freshness_lifetime,
    has_explicit_freshness,
    http_date,
    initial_age,
    not_storable_reason,
    parse_cache_control,
    strict_http_date,
    verdict,
)

# Sun, 06 Nov 1994 08:49:37 GMT, the example date of RFC 9110 §5.6.7.
T = 784111777.0
IMF_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"


# -- parse_cache_control ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {}),
        ("", {}),
        ("max-age=60", {"max-age": "60"}),
        ("no-store", {"no-store": None}),
        # directive names are case-insensitive (RFC 9111 §5.2); arguments keep their case
        ("Max-Age=60, NO-STORE", {"max-age": "60", "no-store": None}),
        ('no-cache="Set-Cookie"', {"no-cache": "Set-Cookie"}),
        # token and quoted-string forms are both accepted (§5.2)
        ('max-age="60"', {"max-age": "60"}),
        # a comma inside a quoted argument does not split the list
        ('private="Set-Cookie, X-User", public',
         {"private": "Set-Cookie, X-User", "public": None}),
        # optional whitespace and empty list members (RFC 9110 §5.6.1)
        ("  max-age=5 ,, public ,", {"max-age": "5", "public": None}),
        # a repeated directive: the first occurrence is used (§4.2.1)
        ("max-age=10, max-age=1000", {"max-age": "10"}),
        ("s-maxage=5, max-age=60, must-revalidate",
         {"s-maxage": "5", "max-age": "60", "must-revalidate": None}),
        ("stale-while-revalidate=30, stale-if-error=600",
         {"stale-while-revalidate": "30", "stale-if-error": "600"}),
        ("community=\"UCI\"", {"community": "UCI"}),  # extensions are kept, not rejected
    ],
)
def test_parse_cache_control(value: str | None, expected: dict[str, str | None]) -> None:
    assert parse_cache_control(value) == expected


# -- http_date ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        IMF_DATE,                           # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",   # obsolete RFC 850 format
        "Sun Nov  6 08:49:37 1994",         # obsolete asctime format
    ],
)
def test_http_date_accepts_the_three_formats(value: str) -> None:
    # RFC 9110 §5.6.7: a recipient MUST accept all three formats.
    assert http_date(value) == T


# Expires is read strictly (RFC 9111 §5.3: an invalid date means already expired).
NOW_2026 = 1796515200.0  # 2026-12-06


@pytest.mark.parametrize("value", [IMF_DATE, "Sunday, 06-Nov-94 08:49:37 GMT",
                                   "Sun Nov  6 08:49:37 1994"])
def test_strict_http_date_accepts_the_three_formats(value: str) -> None:
    assert strict_http_date(value, now=NOW_2026) == T


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 AEST",    # a zone other than GMT
        "Sun, 06 Nov 1994 08:49:37 +0000",
        "Sun, 06 Nov 1994 08:49:37 gmt",     # HTTP-date is case-sensitive
        "Sun 06 Nov 1994 08:49:37 GMT",      # missing comma
        "Sun, 06-Nov-1994 08:49:37 GMT",     # dashes in an IMF-fixdate
        "Sunday, 06 Nov 94 08:49:37 GMT",    # spaces in an RFC 850 date
        "Sun, 06.Nov.1994 08:49:37 GMT",     # dots
        "Sunday, 06-Nov-1994 08:49:37 GMT",  # four digits where RFC 850 has two
        "Sun, 06 Nov 94 08:49:37 GMT",       # two digits where IMF-fixdate has four
        "Sun, 06 Nov 1994 8:49:37 GMT",      # a one-digit hour
        "Sun,  06 Nov 1994 08:49:37 GMT",    # doubled space
        "Sun Nov 6 08:49:37 1994",           # asctime's day is padded with a space
        "Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT",  # two Expires lines
        "Sun, 31 Feb 1994 08:49:37 GMT",     # no such day
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "0",
        "",
        None,
    ],
)
def test_strict_http_date_refuses_everything_else(value: str | None) -> None:
    assert strict_http_date(value, now=NOW_2026) is None


def test_an_rfc850_year_over_50_years_ahead_is_in_the_past() -> None:
    assert time.gmtime(strict_http_date("Sunday, 06-Nov-76 08:49:37 GMT",
                                        now=NOW_2026)).tm_year == 2076
    assert time.gmtime(strict_http_date("Sunday, 06-Nov-77 08:49:37 GMT",
                                        now=NOW_2026)).tm_year == 1977


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "EST+05")  # POSIX rule: needs no tz database
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
@pytest.mark.parametrize("value", [IMF_DATE, "Sun Nov  6 08:49:37 1994"])
def test_http_date_is_gmt_whatever_the_local_zone(value: str) -> None:
    # asctime-date carries no zone but is GMT like every HTTP-date (RFC 9110 §5.6.7)
    assert http_date(value) == T


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "0",  # `Expires: 0`, common in the wild: invalid, so already expired
        "-1",
        "never",
        "Sun, 32 Nov 1994 08:49:37 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 25:49:37 GMT",
        "Sun, 06 Nov 99999 08:49:37 GMT",
    ],
)
def test_http_date_refuses_bad_dates(value: str | None) -> None:
    assert http_date(value) is None


# -- not_storable_reason ---------------------------------------------------------------------


def reason(*, method: str = "GET", status: int = 200, request: str = "", response: str = "",
           authorization: bool = False, set_cookie: bool = False,
           store_set_cookie: bool = False, vary: str | None = None,
           expires: str | None = None, default_ttl: float = 60.0) -> str | None:
    response_cc = parse_cache_control(response)
    return not_storable_reason(
        method=method, status=status, request_cc=parse_cache_control(request),
        response_cc=response_cc, has_authorization=authorization, has_set_cookie=set_cookie,
        store_set_cookie=store_set_cookie, vary=vary,
        explicit_freshness=has_explicit_freshness(response_cc, expires),
        default_ttl=default_ttl,
    )


def test_a_plain_200_to_a_get_is_storable() -> None:
    assert reason() is None


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get"])
def test_only_get_responses_are_stored(method: str) -> None:
    assert reason(method=method, response="max-age=60") == "method"


@pytest.mark.parametrize("status", [100, 103, 206, 304])
def test_interim_partial_and_304_responses_are_not_stored(status: int) -> None:
    # 206 (partial) and 304 need special handling a cache must understand (RFC 9111 §3); an
    # interim response is not final.
    assert reason(status=status, response="max-age=60, public") == "status"


@pytest.mark.parametrize("status", [201, 202, 401, 418, 429, 299, 599])
def test_statuses_not_understood_are_stored_on_the_upstreams_word(status: int) -> None:
    # RFC 9111 §3: any final status, with explicit freshness or `public`; never on the route's
    # own ttl.
    assert reason(status=status) == "status"
    assert reason(status=status, response="max-age=60") is None
    assert reason(status=status, response="public") is None
    assert reason(status=status, expires=IMF_DATE) is None


def test_must_understand_stores_only_statuses_the_cache_knows() -> None:
    # RFC 9111 §5.2.2.3: the no-store sent along is for caches that do not understand.
    both = "max-age=60, must-understand, no-store"
    assert reason(status=200, response=both) is None
    assert reason(status=404, response=both) is None
    assert reason(status=418, response=both) == "status"
    assert reason(status=418, response="max-age=60, must-understand") == "status"
    assert reason(status=200, response="max-age=60, no-store") == "no-store"
    assert reason(status=200, response=both, request="no-store") == "no-store"


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
def test_heuristically_cacheable_statuses_need_no_explicit_freshness(status: int) -> None:
    assert reason(status=status) is None


@pytest.mark.parametrize("status", [302, 303, 307, 400, 403, 500, 502, 503, 504])
def test_other_statuses_need_explicit_freshness_or_public(status: int) -> None:
    # RFC 9111 §3: stored only with Expires, max-age, s-maxage, public or a
    # heuristically cacheable status
    assert reason(status=status) == "no-freshness"
    assert reason(status=status, response="max-age=60") is None
    assert reason(status=status, response="s-maxage=60") is None
    assert reason(status=status, expires=IMF_DATE) is None
    assert reason(status=status, response="public") is None


def test_an_invalid_expires_still_permits_storing() -> None:
    # An Expires field, even invalid (then: already stale), meets RFC 9111 §3.
    assert reason(status=302, expires="0") is None


def test_no_cache_alone_does_not_make_a_response_storable() -> None:
    # RFC 9111 §3 does not list no-cache among what allows storing.
    assert reason(status=302, response="no-cache") == "no-freshness"
    assert reason(status=500, response="no-cache") == "no-freshness"


def test_no_cache_needs_no_lifetime_when_the_status_allows_storing() -> None:
    # a no-cache entry is revalidated on every use, so a zero policy ttl does not matter
    assert reason(response="no-cache", default_ttl=0) is None
    assert reason(status=500, response="no-cache, public", default_ttl=0) is None
    assert reason(default_ttl=0) == "no-freshness"
    assert reason(status=500, response="public", default_ttl=0) == "no-freshness"


@pytest.mark.parametrize(
    ("request_cc", "response_cc"),
    [("no-store", "max-age=60"), ("", "no-store"), ("", "max-age=60, No-Store"),
     ("no-store", "public")],
)
def test_no_store_in_request_or_response_is_obeyed(request_cc: str, response_cc: str) -> None:
    # RFC 9111 §5.2.1.5 and §5.2.2.5
    assert reason(request=request_cc, response=response_cc) == "no-store"


def test_client_no_cache_does_not_prevent_storing() -> None:
    assert reason(request="no-cache, max-age=0", response="max-age=60") is None


def test_private_is_not_stored_by_a_shared_cache() -> None:
    assert reason(response="private") == "private"
    assert reason(response="private, max-age=60, public") == "private"


def test_qualified_private_leaves_the_rest_of_the_response_storable() -> None:
    # RFC 9111 §5.2.2.7: only the listed fields are private
    assert reason(response='private="Set-Cookie", max-age=60') is None


@pytest.mark.parametrize(
    ("response_cc", "expected"),
    [
        ("", "authorization"),
        ("max-age=60", "authorization"),
        ("public", None),
        ("s-maxage=60", None),
        ("must-revalidate, max-age=60", None),
    ],
)
def test_authorization_needs_public_s_maxage_or_must_revalidate(response_cc: str,
                                                                 expected: str | None) -> None:
    # RFC 9111 §3.5
    assert reason(authorization=True, response=response_cc) == expected


def test_set_cookie_is_stored_only_when_configured() -> None:
    assert reason(set_cookie=True, response="max-age=60") == "set-cookie"
    assert reason(set_cookie=True, store_set_cookie=True, response="max-age=60") is None


@pytest.mark.parametrize(("vary", "expected"),
                         [("*", "vary-star"), ("Accept, *", "vary-star"),
                          ("Accept-Encoding", None), ("", None)])
def test_vary_star_is_never_stored(vary: str, expected: str | None) -> None:
    # RFC 9111 §4.1: a stored `Vary: *` response never matches, so it is not worth storing
    assert reason(vary=vary, response="max-age=60") == expected


def test_has_explicit_freshness() -> None:
    assert has_explicit_freshness({"max-age": "1"}, None)
    assert has_explicit_freshness({"s-maxage": "1"}, None)
    assert has_explicit_freshness({}, "0")
    assert not has_explicit_freshness({"public": None, "no-cache": None}, None)


# -- freshness_lifetime --------------------------------------------------------------------


def lifetime(cache_control: str = "", *, expires: str | None = None,
             date: str | None = IMF_DATE, status: int = 200, default_ttl: float = 30.0,
             override: bool = False) -> float:
    return freshness_lifetime(
        response_cc=parse_cache_control(cache_control), expires=http_date(expires),
        date=http_date(date), expires_present=expires is not None, status=status,
        default_ttl=default_ttl, override=override,
    )


EXPIRES_IN_1000 = "Sun, 06 Nov 1994 09:06:17 GMT"  # IMF_DATE + 1000 s


@pytest.mark.parametrize(
    ("cache_control", "expires", "expected"),
    [
        # RFC 9111 §4.2.1: s-maxage (shared cache), then max-age, then Expires - Date
        ("s-maxage=10, max-age=100", EXPIRES_IN_1000, 10.0),
        ("max-age=100, s-maxage=10", None, 10.0),
        ("s-maxage=0, max-age=3600", None, 0.0),
        ("max-age=100", EXPIRES_IN_1000, 100.0),
        ("max-age=0", EXPIRES_IN_1000, 0.0),
        ("", EXPIRES_IN_1000, 1000.0),
        ("public", EXPIRES_IN_1000, 1000.0),
        ("must-revalidate", EXPIRES_IN_1000, 1000.0),
    ],
)
def test_lifetime_precedence(cache_control: str, expires: str | None, expected: float) -> None:
    assert lifetime(cache_control, expires=expires) == expected


@pytest.mark.parametrize("cache_control",
                         ["max-age", "max-age=", "max-age=abc", "max-age=-1", "max-age=1.5",
                          "max-age=²", "s-maxage=soon, max-age=60"])
def test_invalid_max_age_is_stale(cache_control: str) -> None:
    # RFC 9111 §4.2.1: invalid freshness information is treated as stale, not as absent
    assert lifetime(cache_control, expires=EXPIRES_IN_1000) == 0.0


def test_huge_max_age_is_capped_at_2_to_the_31() -> None:
    # RFC 9111 §1.2.2
    assert lifetime("max-age=99999999999999999999") == 2.0**31


@pytest.mark.parametrize(
    ("expires", "date", "expected"),
    [
        ("Sun, 06 Nov 1994 08:49:27 GMT", IMF_DATE, 0.0),  # Expires before Date
        (IMF_DATE, IMF_DATE, 0.0),
        ("0", IMF_DATE, 0.0),  # invalid Expires: already expired (RFC 9111 §5.3)
        ("Thu, 01 Jan 1970 00:00:00 GMT", IMF_DATE, 0.0),
        # Expires is relative to Date, not to the clock of the cache
        ("Mon, 07 Nov 1994 08:49:37 GMT", IMF_DATE, 86400.0),
        ("Sunday, 06-Nov-94 08:59:37 GMT", IMF_DATE, 600.0),
    ],
)
def test_lifetime_from_expires(expires: str, date: str, expected: float) -> None:
    assert lifetime(expires=expires, date=date) == expected


def test_expires_without_a_known_date_is_never_fresh() -> None:
    # RFC 9110 §6.6.1 wants the time of receipt here; this pure function does not know it, so
    # it stays conservative. The caller is expected to pass the time of receipt as `date`.
    assert lifetime(expires=EXPIRES_IN_1000, date=None) == 0.0
    assert lifetime(expires=EXPIRES_IN_1000, date="garbage") == 0.0


@pytest.mark.parametrize(
    ("status", "cache_control", "expected"),
    [
        (200, "", 30.0),
        (204, "", 30.0),
        (301, "", 30.0),
        (404, "", 30.0),
        (501, "", 30.0),
        # not heuristically cacheable: no heuristic lifetime (RFC 9111 §4.2.2) ...
        (302, "", 0.0),
        (307, "", 0.0),
        (500, "", 0.0),
        (503, "", 0.0),
        # ... unless the response says public
        (500, "public", 30.0),
        (302, "public", 30.0),
        (200, "no-cache", 30.0),  # no-cache is decided by verdict(), not by the lifetime
    ],
)
def test_heuristic_lifetime(status: int, cache_control: str, expected: float) -> None:
    assert lifetime(cache_control, status=status) == expected


def test_no_heuristic_when_an_explicit_lifetime_is_present() -> None:
    # RFC 9111 §4.2.2: a cache MUST NOT use heuristics when an explicit expiration is present
    assert lifetime("max-age=0", default_ttl=300) == 0.0
    assert lifetime(expires="0", default_ttl=300) == 0.0


@pytest.mark.parametrize("cache_control", ["max-age=0", "s-maxage=5, max-age=100", "no-cache"])
def test_override_uses_the_policy_ttl(cache_control: str) -> None:
    assert lifetime(cache_control, expires=EXPIRES_IN_1000, status=500, override=True,
                    default_ttl=42.0) == 42.0


# -- default_lifetime ----------------------------------------------------------------------

DAY = 86400.0
DATE = 784111777.0  # IMF_DATE


def fallback(*, last_modified: float | None, date: float | None = DATE, now: float = 0.0,
             heuristic: float = 0.1, heuristic_max: float = DAY, ttl: float = 60.0) -> float:
    return default_lifetime(ttl=ttl, heuristic=heuristic, heuristic_max=heuristic_max,
                            last_modified=last_modified, date=date, now=now)


@pytest.mark.parametrize(
    ("unchanged_for", "expected"),
    [
        (1000.0, 100.0),  # 10% of the time since Last-Modified (RFC 9111 §4.2.2)
        (1.0, 0.1),
        (0.0, 0.0),  # just modified: nothing is known of how long it stays so
        (-30.0, 0.0),  # a Last-Modified after the Date
        (9 * DAY, 0.9 * DAY),
        (10 * DAY, DAY),
        (365 * DAY, DAY),  # at most heuristic_max
    ],
)
def test_heuristic_is_a_fraction_of_the_time_since_last_modified(unchanged_for: float,
                                                                 expected: float) -> None:
    assert fallback(last_modified=DATE - unchanged_for) == pytest.approx(expected)


def test_heuristic_counts_from_the_date_else_from_now() -> None:
    assert fallback(last_modified=DATE - 500, date=DATE, now=DATE + 10_000) == 50.0
    assert fallback(last_modified=DATE - 500, date=None, now=DATE + 500) == 100.0


def test_heuristic_off_or_without_last_modified_is_the_ttl() -> None:
    assert fallback(last_modified=DATE - 1000, heuristic=0.0) == 60.0
    assert fallback(last_modified=None) == 60.0
    assert fallback(last_modified=None, ttl=0.0) == 0.0
    # the ttl is no bound on the heuristic, nor the heuristic on the ttl
    assert fallback(last_modified=DATE - 10_000, ttl=60.0) == 1000.0
    assert fallback(last_modified=DATE - 100, ttl=60.0) == 10.0


def test_heuristic_lifetime_makes_a_response_storable_without_a_ttl() -> None:
    lifetime_ = fallback(last_modified=DATE - 1000, ttl=0.0)
    assert lifetime_ == 100.0
    assert reason(default_ttl=lifetime_) is None
    assert reason(default_ttl=fallback(last_modified=DATE, ttl=0.0)) == "no-freshness"
    assert lifetime(default_ttl=lifetime_) == 100.0
    assert lifetime("max-age=5", default_ttl=lifetime_) == 5.0  # explicit freshness wins
    assert lifetime(status=302, default_ttl=lifetime_) == 0.0  # not heuristically cacheable


# -- initial_age -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age_header", "date", "request_time", "response_time", "expected"),
    [
        # RFC 9111 §4.2.3: max(apparent_age, age_value + response_delay)
        (None, T - 10, T - 1, T, 10.0),           # apparent age from Date
        (None, T, T - 1, T, 1.0),                 # response delay
        ("100", T, T - 2, T, 102.0),              # upstream Age plus the response delay
        ("100", T - 300, T - 2, T, 300.0),        # apparent age larger than corrected Age
        (None, T + 60, T - 1, T, 1.0),            # Date in the future: apparent age is 0
        ("5", None, T, T, 5.0),                   # no Date
        (None, None, T, T, 0.0),
        (" 7 ", T, T, T, 7.0),
        ("5, 10", T, T, T, 5.0),                  # list-based: the first member (§5.1)
        ("abc", T, T, T, 0.0),                    # invalid: ignored (§5.1)
        ("-5", T, T, T, 0.0),
        ("1.5", T, T, T, 0.0),
        ("²", T, T, T, 0.0),
        ("", T, T, T, 0.0),
    ],
)
def test_initial_age(age_header: str | None, date: float | None, request_time: float,
                     response_time: float, expected: float) -> None:
    assert initial_age(age_header=age_header, date=date, request_time=request_time,
                       response_time=response_time) == expected


# -- Freshness ---------------------------------------------------------------------------------


def entry(*, lifetime: float = 60.0, initial_age: float = 0.0, no_cache: bool = False,
          must_revalidate: bool = False, swr: float = 0.0, sie: float = 0.0) -> Freshness:
    return Freshness(lifetime=lifetime, initial_age=initial_age, stored_at=T,
                     no_cache=no_cache, must_revalidate=must_revalidate, swr=swr, sie=sie)


def test_age_is_initial_age_plus_resident_time() -> None:
    e = entry(initial_age=5.0)
    assert e.age(T) == 5.0
    assert e.age(T + 10) == 15.0
    assert e.age(T - 100) == 5.0  # a clock stepping back never makes an entry younger


def test_ttl_is_lifetime_minus_age() -> None:
    e = entry(lifetime=60.0, initial_age=5.0)
    assert e.ttl(T) == 55.0
    assert e.ttl(T + 55) == 0.0
    assert e.ttl(T + 58) == -3.0


@pytest.mark.parametrize(
    ("sie", "must_revalidate", "no_cache", "elapsed", "expected"),
    [
        (600.0, False, False, 30.0, True),    # still fresh
        (600.0, False, False, 500.0, True),   # stale, inside the window
        (600.0, False, False, 700.0, False),  # past lifetime + window
        (0.0, False, False, 61.0, False),     # no window
        (600.0, True, False, 61.0, False),    # RFC 9111 §4.2.4, §5.2.2.2
        (600.0, True, False, 30.0, False),
        (600.0, False, True, 30.0, False),    # §5.2.2.4: only after a successful validation
        (600.0, False, True, 61.0, False),
    ],
)
def test_usable_for_error(sie: float, must_revalidate: bool, no_cache: bool, elapsed: float,
                          expected: bool) -> None:
    e = entry(lifetime=60.0, sie=sie, must_revalidate=must_revalidate, no_cache=no_cache)
    assert e.usable_for_error(T + elapsed) is expected


# -- verdict -------------------------------------------------------------------------------


def judge(e: Freshness, elapsed: float, request_cc: str = "", *,
          honor_client: bool = True) -> Verdict:
    return verdict(e, parse_cache_control(request_cc), T + elapsed, honor_client=honor_client)


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0.0, Verdict.FRESH), (59.9, Verdict.FRESH), (60.0, Verdict.REVALIDATE),
     (3600.0, Verdict.REVALIDATE)],
)
def test_fresh_while_age_is_below_lifetime(elapsed: float, expected: Verdict) -> None:
    # RFC 9111 §4.2: fresh when freshness_lifetime > current_age
    assert judge(entry(lifetime=60.0), elapsed) is expected


def test_upstream_age_counts_against_freshness() -> None:
    e = entry(lifetime=60.0, initial_age=50.0)
    assert judge(e, 9.0) is Verdict.FRESH
    assert judge(e, 11.0) is Verdict.REVALIDATE


def test_response_no_cache_revalidates_even_when_fresh() -> None:
    # RFC 9111 §5.2.2.4, whatever the client asks and whatever the policy
    e = entry(lifetime=3600.0, no_cache=True, swr=60.0)
    assert judge(e, 0.0) is Verdict.REVALIDATE
    assert judge(e, 0.0, honor_client=False) is Verdict.REVALIDATE
    assert judge(e, 0.0, "max-stale") is Verdict.REVALIDATE


@pytest.mark.parametrize("request_cc", ["no-cache", "max-age=0", "max-age=5", "No-Cache",
                                        "min-fresh=60"])
def test_client_directives_honoured(request_cc: str) -> None:
    # RFC 9111 §5.2.1: a fresh entry 10 s old does not satisfy these requests
    assert judge(entry(lifetime=60.0), 10.0, request_cc) is Verdict.REVALIDATE


@pytest.mark.parametrize("request_cc", ["no-cache", "max-age=0", "max-age=5", "min-fresh=60"])
def test_client_directives_ignored_when_not_honoured(request_cc: str) -> None:
    assert judge(entry(lifetime=60.0), 10.0, request_cc, honor_client=False) is Verdict.FRESH


@pytest.mark.parametrize(
    ("request_cc", "expected"),
    [
        ("max-age=10", Verdict.FRESH),        # age <= max-age is acceptable (§5.2.1.1)
        ("max-age=11", Verdict.FRESH),
        ("max-age=9", Verdict.REVALIDATE),
        ("max-age=abc", Verdict.FRESH),       # invalid: ignored
        ("min-fresh=50", Verdict.FRESH),      # 50 s of freshness left (§5.2.1.3)
        ("min-fresh=51", Verdict.REVALIDATE),
        ("only-if-cached", Verdict.FRESH),
    ],
)
def test_client_max_age_and_min_fresh_bounds(request_cc: str, expected: Verdict) -> None:
    assert judge(entry(lifetime=60.0), 10.0, request_cc) is expected


def test_client_no_cache_wins_over_stale_while_revalidate() -> None:
    e = entry(lifetime=60.0, swr=120.0)
    assert judge(e, 90.0, "no-cache") is Verdict.REVALIDATE
    assert judge(e, 90.0, "no-cache", honor_client=False) is Verdict.STALE_REVALIDATE


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(59.0, Verdict.FRESH), (60.0, Verdict.STALE_REVALIDATE), (89.0, Verdict.STALE_REVALIDATE),
     (90.0, Verdict.REVALIDATE), (500.0, Verdict.REVALIDATE)],
)
def test_stale_while_revalidate_window(elapsed: float, expected: Verdict) -> None:
    # RFC 5861 §3: served stale for up to swr seconds past expiry, refreshed meanwhile
    assert judge(entry(lifetime=60.0, swr=30.0), elapsed) is expected


def test_must_revalidate_forbids_serving_stale() -> None:
    # RFC 9111 §5.2.2.2 (and proxy-revalidate, s-maxage): neither swr nor max-stale
    e = entry(lifetime=60.0, must_revalidate=True, swr=300.0)
    assert judge(e, 30.0) is Verdict.FRESH
    assert judge(e, 61.0) is Verdict.REVALIDATE
    assert judge(e, 61.0, "max-stale") is Verdict.REVALIDATE
    assert judge(e, 61.0, "max-stale=3600") is Verdict.REVALIDATE


@pytest.mark.parametrize(
    ("request_cc", "honor_client", "expected"),
    [
        ("max-stale", True, Verdict.FRESH),          # any staleness (§5.2.1.2)
        ("max-stale=30", True, Verdict.FRESH),       # 20 s stale
        ("max-stale=20", True, Verdict.FRESH),
        ("max-stale=19", True, Verdict.REVALIDATE),
        ("max-stale=abc", True, Verdict.REVALIDATE),
        ("max-stale=²", True, Verdict.REVALIDATE),
        ("max-stale", False, Verdict.REVALIDATE),
    ],
)
def test_client_max_stale(request_cc: str, honor_client: bool, expected: Verdict) -> None:
    e = entry(lifetime=60.0)
    assert judge(e, 80.0, request_cc, honor_client=honor_client) is expected


def test_a_zero_lifetime_is_stale_at_once() -> None:
    assert judge(entry(lifetime=0.0), 0.0) is Verdict.REVALIDATE
    assert judge(entry(lifetime=0.0, swr=10.0), 0.0) is Verdict.STALE_REVALIDATE


def test_headers_to_verdict_end_to_end() -> None:
    # max-age=100 with Age: 90 from upstream: 10 s of freshness when it arrives
    cc = parse_cache_control("max-age=100, stale-while-revalidate=30")
    life = freshness_lifetime(response_cc=cc, expires=None, date=T, expires_present=False,
                              status=200, default_ttl=0.0, override=False)
    age = initial_age(age_header="90", date=T, request_time=T, response_time=T)
    e = Freshness(lifetime=life, initial_age=age, stored_at=T, no_cache=False,
                  must_revalidate=False, swr=30.0, sie=0.0)
    assert e.ttl(T) == 10.0
    assert verdict(e, {}, T + 9, honor_client=True) is Verdict.FRESH
    assert verdict(e, {}, T + 11, honor_client=True) is Verdict.STALE_REVALIDATE
    assert verdict(e, {}, T + 41, honor_client=True) is Verdict.REVALIDATE
