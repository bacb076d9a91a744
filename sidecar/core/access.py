"""Who calls the admin API, and what they may do there. Pure: the admin listener's guard
(admin.py) asks these questions of each request.

Tokens are named (`admin.tokens: {grafana: {token: ..., scope: read}}`) so that an audit line
can say which one acted without writing the secret; the single `admin.token` is an `admin`
token named `admin`. A `read` token reaches everything that only reads (health, metrics, stats,
config, lists, a job's view); `admin` reaches everything.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Scope = Literal["read", "admin"]
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Caller:
    """A request's token, by name and scope; `None` name: no token configured at all."""

    name: str | None
    scope: Scope

    def may(self, method: str) -> bool:
        return self.scope == "admin" or method in READ_METHODS


ANYONE = Caller(None, "admin")  # no token configured: the listener is on loopback


def scope_needed(method: str) -> Scope:
    """What a request needs: reading (`GET`, `HEAD`) or acting (every other method)."""
    return "read" if method in READ_METHODS else "admin"


def bearer(lines: Sequence[str]) -> str | None:
    """The token of exactly one `Authorization: Bearer <token>` line (the scheme is
    case-insensitive, RFC 9110 §11.1), or None: no line, several, or another scheme."""
    if len(lines) != 1:
        return None
    scheme, _, given = lines[0].partition(" ")
    if scheme.lower() != "bearer":
        return None
    given = given.lstrip(" ")
    return given or None


def identify(lines: Sequence[str], tokens: Mapping[str, tuple[str, Scope]]) -> Caller | None:
    """The caller whose token the request carries, or None. Every configured token is
    compared, each in constant time, so that timing says nothing of which one is close."""
    given = bearer(lines)
    if given is None:
        return None
    offered = given.encode("utf-8", "surrogateescape")
    found: Caller | None = None
    for name, (token, scope) in tokens.items():
        if hmac.compare_digest(offered, token.encode()) and found is None:
            found = Caller(name, scope)
    return found
