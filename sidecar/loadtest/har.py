"""Captured traffic (HAR) to a weighted load-test scenario, with secrets taken out.

Requests are grouped by method and normalised path (`/api/products/{id}`): each group weighs as
many times as it was captured, and replaying it sends one of its captured requests as it was
(ids included, so a cache sees the real spread of keys). Credentials are removed from headers,
cookies, query strings and bodies, both from a file `sidecar record` writes and again on replay
(a HAR saved from a browser's developer tools holds them all).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

# Names of headers, query parameters, form fields and JSON keys that carry credentials.
_SECRET = re.compile(
    r"authorization|cookie|token|secret|passw|api[-_]?key|session|csrf|xsrf|signature"
    r"|credential|private|^key$|^sig$|^auth$|^code$", re.IGNORECASE)
# Headers that describe one connection or one message: the load generator sets its own.
_TRANSPORT = frozenset({
    "host", "content-length", "connection", "keep-alive", "proxy-connection",
    "transfer-encoding", "te", "trailer", "upgrade", "expect",
})
# A path segment that is an id rather than a name: digits, a UUID, a long hex digest, or a
# long token mixing letters and digits (`reports.5.Xk3v0yq6cR1o7dQm`).
_ID_SEGMENT = re.compile(
    r"^(?:\d+"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|[0-9a-f]{12,}"
    r"|(?=[^/]*\d)(?=[^/]*[a-z])[a-z0-9._~-]{16,})$", re.IGNORECASE)


class HarError(ValueError):
    """The file is not a HAR this module can read; the message says what is wrong."""


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def normalise_path(path: str) -> str:
    return "/".join("{id}" if _ID_SEGMENT.match(seg) else seg for seg in path.split("/"))


@dataclass(frozen=True)
class Recorded:
    method: str
    target: str                       # path and query, secrets removed
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    status: int                       # what the application answered when it was captured

    def succeeded(self, status: int) -> bool:
        """A replayed request fails on a 5xx, or on a 4xx the application did not answer then."""
        if status == 0 or status >= 500:
            return False
        return status < 400 or self.status >= 400


@dataclass(frozen=True)
class Endpoint:
    method: str
    name: str                         # normalised path: the row name in the report
    requests: tuple[Recorded, ...]

    @property
    def weight(self) -> int:
        return len(self.requests)


@dataclass
class Scenario:
    host: str
    endpoints: list[Endpoint]
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(e.weight for e in self.endpoints)

    def describe(self) -> str:
        lines = [f"replaying {self.requests} captured requests to {self.host or 'the target'} "
                 f"as {len(self.endpoints)} endpoints (weight: times captured):"]
        lines += [f"  {e.weight:>6}  {e.method} {e.name}" for e in self.endpoints]
        lines += [f"  skipped {count}: {reason}" for reason, count in self.skipped.items()]
        return "\n".join(lines)


def _entries(data: Any) -> list[Mapping[str, Any]]:
    log = data.get("log") if isinstance(data, Mapping) else None
    entries = log.get("entries") if isinstance(log, Mapping) else None
    if not isinstance(entries, list):
        raise HarError("not a HAR file: expected a JSON object with log.entries")
    return [e for e in entries if isinstance(e, Mapping) and isinstance(e.get("request"), Mapping)]


def read_har(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise HarError(f"not a HAR file: invalid JSON ({exc})") from None


def scenario_from_har(data: Any) -> Scenario:
    """Raise HarError when there is nothing to replay."""
    entries = _entries(data)
    hosts = Counter(urlsplit(str(e["request"].get("url", ""))).netloc for e in entries)
    host = hosts.most_common(1)[0][0] if hosts else ""
    groups: dict[tuple[str, str], list[Recorded]] = {}
    skipped: Counter[str] = Counter()
    for entry in entries:
        request = entry["request"]
        method = str(request.get("method", "")).upper()
        url = urlsplit(str(request.get("url", "")))
        if method in ("", "CONNECT") or not url.path.startswith("/"):
            skipped["not a plain HTTP request"] += 1
            continue
        if url.netloc != host:
            skipped[f"to another host than {host}"] += 1
            continue
        response = entry.get("response")
        status = response.get("status", 0) if isinstance(response, Mapping) else 0
        recorded = Recorded(method, _target(url.path, url.query), _headers(request),
                            _body(request), int(status) if isinstance(status, int) else 0)
        groups.setdefault((method, normalise_path(url.path)), []).append(recorded)
    if not groups:
        raise HarError(f"nothing to replay: the HAR holds {len(entries)} requests"
                       + (f" ({', '.join(f'{n} {r}' for r, n in skipped.items())})"
                          if skipped else ""))
    endpoints = [Endpoint(method, name, tuple(reqs)) for (method, name), reqs in groups.items()]
    endpoints.sort(key=lambda e: (-e.weight, e.name, e.method))
    return Scenario(host, endpoints, skipped)


def _target(path: str, query: str) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if not is_secret(k)]
    return f"{path}?{urlencode(pairs)}" if pairs else path


def _headers(request: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    out = []
    for header in request.get("headers") or ():
        name, value = str(header.get("name", "")), str(header.get("value", ""))
        lower = name.lower()
        if lower.startswith(":") or lower in _TRANSPORT or is_secret(lower):
            continue
        out.append((name, value))
    return tuple(out)


def _body(request: Mapping[str, Any]) -> bytes | None:
    post = request.get("postData")
    if not isinstance(post, Mapping) or not isinstance(post.get("text"), str):
        return None
    return _scrub_body(str(post.get("mimeType", "")), post["text"]).encode()


def _scrub_body(mime: str, text: str) -> str:
    """JSON keys and form fields that name a credential are removed; other bodies stay as
    captured (docs/loadtesting.md says so)."""
    if "json" in mime:
        try:
            parsed = json.loads(text)
        except ValueError:
            return text
        scrubbed = _scrub_json(parsed)
        return text if scrubbed == parsed else json.dumps(scrubbed, separators=(",", ":"))
    if "x-www-form-urlencoded" in mime:
        fields = parse_qsl(text, keep_blank_values=True)
        kept = [(k, v) for k, v in fields if not is_secret(k)]
        return text if len(kept) == len(fields) else urlencode(kept)
    return text


def _scrub_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub_json(v) for k, v in value.items() if not is_secret(str(k))}
    if isinstance(value, list):
        return [_scrub_json(v) for v in value]
    return value


def sanitize_har(data: Any) -> int:
    """Take credentials out of a HAR in place (headers, cookies, query, bodies, both ways);
    return how many values were removed."""
    removed = 0
    for entry in _entries(data):
        for side in ("request", "response"):
            message = entry.get(side)
            if not isinstance(message, dict):
                continue
            headers = message.get("headers") or []
            kept = [h for h in headers if not is_secret(str(h.get("name", "")))]
            removed += len(headers) - len(kept)
            message["headers"] = kept
            removed += len(message.get("cookies") or [])
            message["cookies"] = []
            removed += _sanitize_query(message) + _sanitize_body(message)
    return removed


def _sanitize_query(message: dict[str, Any]) -> int:
    query = message.get("queryString")
    if not isinstance(query, list):
        return 0
    kept = [q for q in query if not is_secret(str(q.get("name", "")))]
    if len(kept) != len(query):
        url = urlsplit(str(message.get("url", "")))
        message["url"] = url._replace(query=_target("", url.query).lstrip("?")).geturl()
        message["queryString"] = kept
    return len(query) - len(kept)


def _sanitize_body(message: dict[str, Any]) -> int:
    removed = 0
    for key in ("postData", "content"):
        part = message.get(key)
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            continue
        if part.get("encoding") == "base64":
            continue
        scrubbed = _scrub_body(str(part.get("mimeType", "")), part["text"])
        if scrubbed != part["text"]:
            part["text"] = scrubbed
            part.pop("params", None)
            removed += 1
    return removed
