"""Which modules are compiled to C (mypyc) when the package is built, and whether they were.

The request path runs a few hundred Python operations per request; compiled with mypyc they
cost a quarter to a third less (callgrind instructions per request, docs/performance.md). The
sources stay plain, type-annotated Python: mypyc compiles them as they are, and a machine
without a C compiler installs and runs them unchanged (setup.py falls back), only slower.

A compiled module shadows its `.py` (the import system prefers extension modules), so an edited
source next to an older build would silently not run: `stale()` finds those, `make` rebuilds
them, and the test suite refuses to run on them.

No import here beyond the standard library: setup.py reads this module before anything is
installed.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

# Every module a request passes through on the edge, the proxy and the L1 hit, with the small
# modules they call per request (compiled together, their calls to each other skip the
# interpreter). Relative to the repository root.
COMPILED = (
    # the edge and the proxy
    "sidecar/edge/protocol.py",
    "sidecar/edge/handler.py",
    "sidecar/edge/responses.py",
    "sidecar/http/forwarding.py",
    "sidecar/upstream.py",
    "sidecar/http/headers.py",
    "sidecar/http/request.py",
    "sidecar/http/dates.py",
    "sidecar/pipeline.py",
    "sidecar/deadlines.py",
    "sidecar/metrics.py",
    # the cache's hit: with these, 95.8k -> 59.4k instructions per L1 hit in all
    "sidecar/policies/cache.py",
    "sidecar/stores/memory.py",
    "sidecar/stores/tiered.py",
    "sidecar/stores/entry.py",
    "sidecar/core/freshness.py",
    "sidecar/core/cachekey.py",
)

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _extension(source: Path) -> Path | None:
    """The compiled module built from `source`, if there is one next to it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def compiled() -> list[str]:
    """The modules of COMPILED that run compiled in this installation."""
    return [name for name in COMPILED if _extension(_PACKAGE_ROOT / name) is not None]


def stale() -> list[str]:
    """Compiled modules older than their source: the source's edits would not run."""
    out = []
    for name in COMPILED:
        source = _PACKAGE_ROOT / name
        built = _extension(source)
        if built is not None and source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            out.append(name)
    return out
