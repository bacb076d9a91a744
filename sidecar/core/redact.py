"""What logs and spans must not show: secret query parameters and header values.

`log.redact` names more of them; the defaults cover the common secrets (tokens, passwords,
API keys, session ids, signatures, e-mail addresses), and `Authorization`, `Proxy-Authorization`,
`Cookie` and `Set-Cookie` are always redacted whatever the config says. Pure; the access log and
the tracing spans call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote_plus

REDACTED = "<redacted>"

DEFAULT_QUERY = (
    "token", "access_token", "refresh_token", "id_token", "auth", "jwt", "code",
    "password", "passwd", "pwd", "secret", "client_secret", "api_key", "apikey", "key",
    "session", "sessionid", "session_id", "sid", "signature", "sig", "x-amz-signature",
    "x-amz-credential", "x-amz-security-token", "email",
)
ALWAYS_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie")
DEFAULT_HEADERS = (*ALWAYS_HEADERS, "x-api-key", "x-auth-token", "x-csrf-token",
                   "x-xsrf-token", "x-sidecar-progress-token", "x-amz-security-token")


class Redactor:
    """Replaces the values of the named query parameters and headers (names compared without
    case) by `<redacted>`."""

    def __init__(self, query: Iterable[str] = (), headers: Iterable[str] = ()) -> None:
        self.query = frozenset(name.lower() for name in (*DEFAULT_QUERY, *query))
        self.headers = frozenset(name.lower() for name in (*DEFAULT_HEADERS, *headers))

    def target(self, target: str) -> str:
        """A request target with the named parameters' values redacted; the rest as sent
        (an access log shows what came, not a normalised form)."""
        path, mark, query = target.partition("?")
        if not mark or not query:
            return target
        changed = False
        parts = query.split("&")
        for i, part in enumerate(parts):
            name, equals, value = part.partition("=")
            if equals and value and _unquoted(name).lower() in self.query:
                parts[i] = f"{name}={REDACTED}"
                changed = True
        return f"{path}?{'&'.join(parts)}" if changed else target

    def header(self, name: str, value: str) -> str:
        return REDACTED if name.lower() in self.headers else value


def _unquoted(name: str) -> str:
    """A parameter name percent-decoded enough to recognise `api%5Fkey` or `Token`."""
    if "%" not in name and "+" not in name:
        return name
    return unquote_plus(name)
