"""The `Date` value, formatted once a second rather than once per response."""

from __future__ import annotations

import time

_second = 0
_value = b""


def http_date_now() -> bytes:
    """Now as an IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Dec 2026 04:11:20 GMT`."""
    global _second, _value
    now = int(time.time())
    if now != _second:
        _second = now
        _value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    return _value
