"""Raw header lists and the rules about which fields belong to one hop.

Headers stay as the `(name, value)` byte pairs the parser produced, in order, with repeats: a
proxy forwards them as they came and must not merge or re-case them. `Headers` adds the
case-insensitive lookup policies need (`headers.get("If-None-Match")`) without copying them
into a dict of decoded strings per request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import overload

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard Proxy-Connection. Expect is answered
# by the sidecar itself (100 Continue), not forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection", b"expect",
})

# Lower-cased byte names of the str names policies look up: computed once per name, not per
# lookup. Names come from code and config, so the table stays small.
_NAMES: dict[str, bytes] = {}


def _lname(name: str) -> bytes:
    key = _NAMES.get(name)
    if key is None:
        key = _NAMES[name] = name.lower().encode("latin-1")
    return key


def connection_tokens(value: str) -> frozenset[bytes]:
    """The field names a Connection header lists (lower-cased)."""
    return frozenset(t.strip().lower().encode("latin-1") for t in value.split(",") if t.strip())


# A Transfer-Encoding value whose final coding is chunked, as llhttp reads it: `chunked` as the
# last list member, with nothing after it but whitespace (`chunked ,` or `chunked;q=1` is not).
_CHUNKED_FINAL = re.compile(rb"(?:.*,)?[ \t]*chunked[ \t]*", re.IGNORECASE | re.DOTALL)


def response_codings(transfer_encoding: Sequence[bytes]) -> tuple[bool, tuple[bytes, ...]]:
    """How a response body is transfer-coded (RFC 9112 §6.1, §6.3), from the values of its
    Transfer-Encoding fields in order: whether its final coding is chunked (the last member of
    the last field, which the parser undoes), and the codings still on the body after that.
    Without a final chunked the body runs until the connection closes (§6.3 rule 4) with every
    listed coding still applied, chunked included. `identity` (RFC 2616's name for no coding)
    is left out, as are empty list members."""
    codings = [coding for value in transfer_encoding for part in value.split(b",")
               if (coding := part.strip(b" \t").lower())]
    chunked = bool(codings) and _CHUNKED_FINAL.fullmatch(transfer_encoding[-1]) is not None
    if chunked:
        codings.pop()
    return chunked, tuple(coding for coding in codings if coding != b"identity")


class Headers(Mapping[str, str]):
    """A read-only, case-insensitive view of a raw header list. `get` answers the first
    value of a field (as aiohttp's CIMultiDict does), `getall` every value in order."""

    __slots__ = ("_first", "raw")

    def __init__(self, raw: RawHeaders, first: dict[bytes, bytes] | None = None) -> None:
        self.raw = raw
        # lower-cased name -> first value; the edge fills it while parsing, so a lookup costs
        # one dict probe.
        if first is None:
            first = {}
            for name, value in raw:
                first.setdefault(name.lower(), value)
        self._first = first

    @overload  # type: ignore[override]
    def get(self, name: str, /) -> str | None: ...

    @overload
    def get(self, name: str, default: str, /) -> str: ...

    def get(self, name: str, default: str | None = None, /) -> str | None:
        key = _NAMES.get(name)
        value = self._first.get(key if key is not None else _lname(name))
        return default if value is None else value.decode("latin-1")

    def get_bytes(self, lname: bytes) -> bytes | None:
        """The first value of the field whose lower-cased name is `lname`."""
        return self._first.get(lname)

    def has_any(self, lnames: frozenset[bytes]) -> bool:
        """Whether any of these fields (lower-cased names) is present: one set operation for
        a policy that looks for several and usually finds none."""
        return not self._first.keys().isdisjoint(lnames)

    def getall(self, name: str, default: Iterable[str] = ()) -> list[str]:
        key = _lname(name)
        if key not in self._first:
            return list(default)
        return [v.decode("latin-1") for n, v in self.raw if n.lower() == key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _lname(name) in self._first

    def __getitem__(self, name: str) -> str:
        value = self._first.get(_lname(name))
        if value is None:
            raise KeyError(name)
        return value.decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name, _ in self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"<Headers {[n.decode('latin-1') for n, _ in self.raw]}>"
