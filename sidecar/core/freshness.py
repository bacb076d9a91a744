"""RFC 9111 rules for a shared cache, as pure functions of headers and `now`.

Everything here is decided from already-parsed values so that the cache policy can call it on
the request path without I/O, and the tests can be exhaustive without sockets or sleeping.
"""

from __future__ import annotations

import calendar
import enum
import re
import time
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

Directives = dict[str, str | None]

# RFC 9110 §15.1: statuses cacheable by default (heuristic freshness allowed). 206 is left out:
# the sidecar does not store partial content.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Statuses whose reuse needs rules the sidecar does not implement (partial content, a 304 as
# such): never stored, whatever the response says.
_NEVER_STORED = frozenset({206, 304})
# Final statuses a response may be stored for when it carries explicit freshness.
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | frozenset({302, 303, 307, 400, 403, 500, 502, 503,
                                                      504})


def parse_cache_control(value: str | None) -> Directives:
    """`max-age=60, no-cache="Set-Cookie", public` -> {"max-age": "60", "no-cache": ..., ...}.

    Names are case-insensitive; the first occurrence of a directive wins (RFC 9111 §4.2.1 says
    a duplicate makes it invalid; the first is the conservative reading for max-age).
    """
    directives: Directives = {}
    if not value:
        return directives
    for part in _split_commas(value):
        name, sep, arg = part.partition("=")
        name = name.strip().lower()
        if not name or name in directives:
            continue
        if sep:
            arg = arg.strip()
            if len(arg) >= 2 and arg[0] == '"' and arg[-1] == '"':
                arg = arg[1:-1]
            directives[name] = arg
        else:
            directives[name] = None
    return directives


def _split_commas(value: str) -> list[str]:
    if '"' not in value:
        return value.split(",")
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def delta_seconds(directives: Directives, name: str) -> int | None:
    """A delta-seconds argument, or None when absent or malformed (then treated as absent,
    except max-age/s-maxage which callers treat as stale: RFC 9111 §1.2.2)."""
    value = directives.get(name)
    if value is None or not _is_digits(value):
        return None
    return min(int(value), 2**31)


def _is_digits(value: str) -> bool:
    # 1*DIGIT is ASCII: str.isdigit() also accepts "²", which int() then refuses.
    return value.isascii() and value.isdigit()


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # asctime-date carries no zone; every HTTP-date is GMT
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
# RFC 9110 §5.6.7, to the letter: IMF-fixdate, the obsolete RFC 850 form, asctime.
_IMF_FIXDATE = re.compile(_DAY + ", ([0-9]{2}) " + _MONTH + " ([0-9]{4}) " + _TIME + " GMT")
_RFC850 = re.compile("(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
                     "([0-9]{2})-" + _MONTH + "-([0-9]{2}) " + _TIME + " GMT")
_ASCTIME = re.compile(_DAY + " " + _MONTH + " ([0-9]{2}| [0-9]) " + _TIME + " ([0-9]{4})")


def strict_http_date(value: str | None, *, now: float) -> float | None:
    """An HTTP-date in exactly one of the three forms of RFC 9110 §5.6.7, as a timestamp; None
    for anything else (another zone than GMT, a missing comma, a one-digit hour, doubled
    spaces, two values joined by a comma...). For `Expires`, where an invalid date means
    already expired (RFC 9111 §5.3), not a guess. `now` places an RFC 850 two-digit year: one
    more than 50 years ahead is the most recent past year with those digits."""
    if not value:
        return None
    if match := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850.fullmatch(value):
        day, month, short, hour, minute, second = match.groups()
        this_year = time.gmtime(now).tm_year
        year_n = this_year - this_year % 100 + int(short)
        if year_n > this_year + 50:
            year_n -= 100
        year = str(year_n)
    elif match := _ASCTIME.fullmatch(value):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    y, m, d = int(year), _MONTHS.index(month) + 1, int(day)
    if not (1 <= d <= calendar.monthrange(y, m)[1] and int(hour) <= 23 and int(minute) <= 59
            and int(second) <= 60):  # 60: a leap second
        return None
    return float(calendar.timegm((y, m, d, int(hour), int(minute), int(second), 0, 0, 0)))


def not_storable_reason(
    *, method: str, status: int, request_cc: Directives, response_cc: Directives,
    has_authorization: bool, has_set_cookie: bool, store_set_cookie: bool, vary: str | None,
    explicit_freshness: bool, default_ttl: float, has_cookie: bool = False,
) -> str | None:
    """None when a shared cache may store the response (RFC 9111 §3), else why not.

    `has_cookie`: the request carried cookies the key does not separate. Its response is then
    stored only on the upstream's word (explicit freshness or `public`), never on the policy's
    default ttl: an application that says nothing about caching is most often answering with a
    page personalised by that cookie."""
    if method != "GET":
        return "method"
    # must-understand (§5.2.2.3): stored only by a cache that knows the status, which then
    # ignores the no-store sent along for caches that do not.
    must_understand = "must-understand" in response_cc
    if status not in UNDERSTOOD_STATUSES and (
            must_understand or status < 200 or status in _NEVER_STORED
            or not (explicit_freshness or "public" in response_cc)):
        # A status the cache does not know is stored only on the upstream's word (§3); an
        # interim one never, nor those a cache must understand to reuse (206, 304).
        return "status"
    if "no-store" in request_cc or ("no-store" in response_cc and not must_understand):
        return "no-store"
    if "private" in response_cc and response_cc["private"] is None:
        return "private"
    if has_authorization and not (
        "public" in response_cc or "s-maxage" in response_cc
        or "must-revalidate" in response_cc
    ):
        return "authorization"
    if has_set_cookie and not store_set_cookie:
        return "set-cookie"
    if vary is not None and "*" in vary:
        return "vary-star"
    if explicit_freshness:
        return None
    if status in HEURISTIC_STATUSES or "public" in response_cc:
        if has_cookie and "public" not in response_cc:
            return "cookie"
        # no-cache alone does not make a response storable (§3), but it needs no lifetime
        return None if default_ttl > 0 or "no-cache" in response_cc else "no-freshness"
    return "no-freshness"


def has_explicit_freshness(response_cc: Directives, expires: str | None) -> bool:
    return "s-maxage" in response_cc or "max-age" in response_cc or expires is not None


def freshness_lifetime(
    *, response_cc: Directives, expires: float | None, date: float | None,
    expires_present: bool, status: int, default_ttl: float, override: bool,
) -> float:
    """Seconds the response is fresh for (RFC 9111 §4.2.1), as a shared cache."""
    if override:
        return default_ttl
    if "s-maxage" in response_cc:
        return float(delta_seconds(response_cc, "s-maxage") or 0)
    if "max-age" in response_cc:
        return float(delta_seconds(response_cc, "max-age") or 0)
    if expires_present:
        if expires is None or date is None:
            return 0.0  # an invalid Expires means already expired
        return max(0.0, expires - date)
    if status in HEURISTIC_STATUSES or "public" in response_cc:
        return default_ttl
    return 0.0


def default_lifetime(*, ttl: float, heuristic: float, heuristic_max: float,
                     last_modified: float | None, date: float | None, now: float) -> float:
    """The freshness of a response that carries none of its own (RFC 9111 §4.2.2).

    With `heuristic` (a fraction, 0 for none) and a Last-Modified: that fraction of how long
    the resource had gone unchanged when the response was generated (its `date`, else `now`,
    when it arrived), at most `heuristic_max`: a resource untouched for a year is unlikely to
    change within the hour, one edited a minute ago may change again. Otherwise the route's
    `ttl`. A Last-Modified later than the Date gives no freshness: the clocks disagree, and
    nothing is known of how long the resource stays as it is.
    """
    if heuristic <= 0 or last_modified is None:
        return ttl
    generated = date if date is not None else now
    return min(heuristic_max, heuristic * max(0.0, generated - last_modified))


def initial_age(*, age_header: str | None, date: float | None, request_time: float,
                response_time: float) -> float:
    """corrected_initial_age of RFC 9111 §4.2.3; current age = this + time resident.

    A list-based Age counts by its first member, an invalid one is ignored (§5.1).
    """
    first = age_header.split(",", 1)[0].strip() if age_header else ""
    age_value = int(first) if _is_digits(first) else 0
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    return max(apparent_age, age_value + response_delay)


class Verdict(enum.Enum):
    FRESH = "fresh"
    STALE_REVALIDATE = "stale-while-revalidate"  # serve now, refresh in the background
    REVALIDATE = "revalidate"  # ask the upstream (conditionally) before answering


@dataclass(frozen=True, slots=True)
class Freshness:
    """What the cache stored about an entry's freshness."""

    lifetime: float
    initial_age: float
    stored_at: float
    no_cache: bool  # response said no-cache: revalidate on every use
    must_revalidate: bool  # must-revalidate / proxy-revalidate / s-maxage: never serve stale
    swr: float  # stale-while-revalidate window
    sie: float  # stale-if-error window

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)

    def ttl(self, now: float) -> float:
        return self.lifetime - self.age(now)

    def usable_for_error(self, now: float) -> bool:
        """stale-if-error (RFC 5861): may this stale entry answer when the upstream fails?

        Never for no-cache or must-revalidate entries (RFC 9111 §4.2.4, §5.2.2.2, §5.2.2.4).
        """
        if self.must_revalidate or self.no_cache:
            return False
        return self.age(now) < self.lifetime + self.sie


def verdict(entry: Freshness, request_cc: Directives, now: float, *,
            honor_client: bool) -> Verdict:
    """May a stored response answer this request (RFC 9111 §4.2, §5.2.1; RFC 5861)?"""
    age = entry.age(now)
    if entry.no_cache:
        return Verdict.REVALIDATE
    if honor_client and request_cc:
        if "no-cache" in request_cc:
            return Verdict.REVALIDATE
        max_age = delta_seconds(request_cc, "max-age")
        if max_age is not None and age > max_age:
            return Verdict.REVALIDATE
        min_fresh = delta_seconds(request_cc, "min-fresh")
        if min_fresh is not None and entry.lifetime - age < min_fresh:
            return Verdict.REVALIDATE
    if age < entry.lifetime:
        return Verdict.FRESH
    if entry.must_revalidate:
        return Verdict.REVALIDATE
    if honor_client and "max-stale" in request_cc:
        max_stale = request_cc["max-stale"]
        if max_stale is None or (_is_digits(max_stale) and age - entry.lifetime <= int(max_stale)):
            return Verdict.FRESH
    if age < entry.lifetime + entry.swr:
        return Verdict.STALE_REVALIDATE
    return Verdict.REVALIDATE
