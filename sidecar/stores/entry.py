"""A stored response: everything a hit needs, computed once at store time."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

from ..core.freshness import Freshness
from ..http.headers import RawHeaders


@dataclass(slots=True)
class CachedResponse:
    key: str  # primary key
    uri: str  # normalised path?query, for purge by key or prefix
    status: int
    reason: str
    headers: RawHeaders  # end-to-end headers as stored (hop-by-hop, Age, Via, X-Request-ID out)
    body: bytes
    freshness: Freshness
    vary_names: tuple[str, ...]
    vary_values: tuple[str | None, ...]
    etag: str | None
    last_modified: float | None
    tags: tuple[str, ...]
    wire: bytes = b""  # `headers` serialized once, for hits (not stored in Redis)
    filled_at: float = 0.0  # when this worker's L1 took it (MemoryStore.put; not in Redis)
    # The last fresh hit's Age and TTL (whole seconds) and its fields and wire built from
    # them: every hit within the same second reuses them (CachePolicy._hit).
    hit: tuple[int, int, RawHeaders, bytes] | None = None

    def __post_init__(self) -> None:
        self.wire = b"".join(b"%s: %s\r\n" % (n, v) for n, v in self.headers)

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 256

    def matches(self, values: tuple[str | None, ...]) -> bool:
        return self.vary_values == values

    def pack(self) -> bytes:
        f = self.freshness
        meta = orjson.dumps({
            "k": self.key, "u": self.uri, "s": self.status, "r": self.reason,
            "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
            "f": [f.lifetime, f.initial_age, f.stored_at, f.no_cache, f.must_revalidate, f.swr,
                  f.sie],
            "vn": self.vary_names, "vv": self.vary_values, "e": self.etag,
            "lm": self.last_modified, "t": self.tags,
        })
        return struct.pack("!I", len(meta)) + meta + self.body

    @classmethod
    def unpack(cls, data: bytes) -> CachedResponse:
        (length,) = struct.unpack_from("!I", data)
        meta = orjson.loads(data[4 : 4 + length])
        lifetime, initial_age, stored_at, no_cache, must_revalidate, swr, sie = meta["f"]
        return cls(
            key=meta["k"], uri=meta["u"], status=meta["s"], reason=meta["r"],
            headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"]],
            body=data[4 + length :],
            freshness=Freshness(lifetime, initial_age, stored_at, no_cache, must_revalidate,
                                swr, sie),
            vary_names=tuple(meta["vn"]), vary_values=tuple(meta["vv"]), etag=meta["e"],
            last_modified=meta["lm"], tags=tuple(meta["t"]),
        )
