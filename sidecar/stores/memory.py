"""L1: a byte-bounded LRU of cached responses in one worker process.

Hand-written because the entries are variants grouped under one key (Vary) and bounded by
bytes, not count; functools.lru_cache and cachetools bound by count or need a size function
per item and a wrapper for the variants anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .entry import CachedResponse

# Variants kept per key (Vary): a header with values the client picks must not make one key
# grow without bound, nor each lookup scan them all. The oldest go first; Redis keeps as many.
MAX_VARIANTS = 32


class MemoryStore:
    """`max_ttl`: how long an entry stays once put, whatever its freshness; None for as long as
    it is fresh. A short L1 in front of a longer L2: past it, the worker reads Redis again and
    sees what another instance stored there meanwhile."""

    def __init__(self, max_bytes: int, max_entry: int, max_ttl: float | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.max_ttl = max_ttl
        self._data: OrderedDict[str, list[CachedResponse]] = OrderedDict()
        self.bytes = 0
        self.entries = 0
        self.evictions = 0

    def get(self, key: str, now: float) -> list[CachedResponse] | None:
        """The key's variants put less than `max_ttl` before `now`; the others are dropped."""
        variants = self._data.get(key)
        if variants is None:
            return None
        max_ttl = self.max_ttl
        if max_ttl is not None and any(now - e.filled_at >= max_ttl for e in variants):
            for old in [e for e in variants if now - e.filled_at >= max_ttl]:
                variants.remove(old)
                self.bytes -= old.size
                self.entries -= 1
            if not variants:
                del self._data[key]
                return None
        self._data.move_to_end(key)
        return variants

    def put(self, entry: CachedResponse, now: float) -> bool:
        size = entry.size
        if size > self.max_entry or size > self.max_bytes:
            return False
        entry.filled_at = now
        variants = self._data.get(entry.key)
        if variants is None:
            self._data[entry.key] = [entry]
        else:
            for i, old in enumerate(variants):
                if old.vary_names == entry.vary_names and old.vary_values == entry.vary_values:
                    self.bytes -= old.size
                    self.entries -= 1
                    del variants[i]
                    break
            if variants and variants[0].vary_names != entry.vary_names:
                self._drop(entry.key)  # Vary changed: the old variants no longer apply
                self._data[entry.key] = [entry]
            else:
                while len(variants) >= MAX_VARIANTS:
                    oldest = variants.pop(0)
                    self.bytes -= oldest.size
                    self.entries -= 1
                    self.evictions += 1
                variants.append(entry)
            self._data.move_to_end(entry.key)
        self.bytes += size
        self.entries += 1
        while self.bytes > self.max_bytes and self._data:
            key = next(iter(self._data))
            self._drop(key)
            self.evictions += 1
        return True

    def _drop(self, key: str) -> int:
        variants = self._data.pop(key, None)
        if not variants:
            return 0
        for entry in variants:
            self.bytes -= entry.size
        self.entries -= len(variants)
        return len(variants)

    def remove_key(self, key: str) -> int:
        return self._drop(key)

    def remove_where(self, predicate: Callable[[CachedResponse], bool]) -> int:
        doomed = [key for key, variants in self._data.items()
                  if any(predicate(entry) for entry in variants)]
        return sum(self._drop(key) for key in doomed)

    def __repr__(self) -> str:
        max_ttl = "" if self.max_ttl is None else f" max_ttl={self.max_ttl:g}s"
        return (f"<MemoryStore {self.entries} entries {self.bytes}/{self.max_bytes} bytes "
                f"evictions={self.evictions}{max_ttl}>")
