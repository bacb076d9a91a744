"""The tool a command drives (locust, mitmdump) as a child process that stops cleanly."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
from types import FrameType

_PR_SET_PDEATHSIG = 1


def _prepare() -> None:
    # A command started in the background by a shell has SIGINT ignored, and the child would
    # inherit that: the one SIGINT sent below must stop it. And if this process is killed
    # outright, Linux sends the child SIGTERM rather than leaving it running.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Its own process group, so that a Ctrl-C at the terminal reaches it once, from here."""
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_prepare)


class Forwarding:
    """While active, the first SIGINT or SIGTERM asks the child to stop (SIGINT: it writes its
    reports or files); a second one kills it."""

    def __init__(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        self.asked = False
        self._previous: dict[int, object] = {}

    def _forward(self, _signum: int, _frame: FrameType | None) -> None:
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL if self.asked else signal.SIGINT)
        self.asked = True

    def __enter__(self) -> Forwarding:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
