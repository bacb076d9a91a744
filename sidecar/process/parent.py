"""A child process that dies with its parent: a killed supervisor (or sidecar) must never leave
orphans holding the port or the embedded Redis."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)
