"""One worker process: the runtime on a uvloop event loop until SIGTERM/SIGINT, and the one
line that says why it could not start."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from ..config import LoadedConfig
from ..logs import configure_logging

log = logging.getLogger("sidecar")


def run_worker(loaded: LoadedConfig, redis_url: str, *, reuse_port: bool = False,
               worker_id: int = 0) -> int:
    from ..app import StartupError, serve

    configure_logging(loaded.config.log, loaded.path.parent)
    # A SIGHUP that arrives before the runtime's handler is installed must not kill the process
    # (its default action); the reload it asks for is moot, the config is being read anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(loaded, redis_url, reuse_port=reuse_port, worker_id=worker_id))
    except (StartupError, OSError) as exc:
        log.critical("cannot start", extra={"error": str(exc)})
        return 1
    return 0
