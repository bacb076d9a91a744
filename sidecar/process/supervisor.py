"""`server.workers > 1`: a small supervisor process and N workers sharing the port (SO_REUSEPORT).

The supervisor owns the embedded Redis, forwards SIGHUP (reload) and SIGTERM (drain) to the
workers, and restarts a worker that dies unexpectedly. It serves no traffic itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from ..config import LoadedConfig, load_config
from ..metrics import METRICS_DIR_ENV
from .parent import die_with_parent
from .worker import run_worker

log = logging.getLogger("sidecar.workers")


def _worker_main(loaded: LoadedConfig, redis_url: str, worker_id: int) -> None:
    die_with_parent()

    raise SystemExit(run_worker(loaded, redis_url, reuse_port=True, worker_id=worker_id))


class Supervisor:
    def __init__(self, loaded: LoadedConfig, redis_url: str) -> None:
        self.loaded = loaded
        self.redis_url = redis_url
        self.count = loaded.config.server.workers
        self.grace = loaded.config.server.shutdown_grace
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._stopping = False
        self._reload = False

    def _spawn(self, worker_id: int) -> None:
        process = self._ctx.Process(target=_worker_main, name=f"sidecar-worker-{worker_id}",
                                    args=(self.loaded, self.redis_url, worker_id))
        # The child inherits a blocked SIGHUP until it can handle one (run_worker unblocks it):
        # a reload forwarded while it is still starting must not kill it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._workers[worker_id] = process
        log.info("worker started", extra={"worker": worker_id, "pid": process.pid})

    def _refresh_config(self) -> None:
        """Re-read the config file, so a replacement worker starts with the config the others
        reloaded (SIGHUP or file change), not the one the supervisor started with. server and
        redis keep their running values (they apply only at start); an invalid file keeps the
        last good config."""
        try:
            fresh = load_config(self.loaded.path)
        except Exception as exc:
            log.warning("config file not reloadable; replacement workers use the last good one",
                        extra={"error": str(exc)})
            return
        config = fresh.config.model_copy(update={"server": self.loaded.config.server,
                                                 "redis": self.loaded.config.redis})
        self.loaded = dataclasses.replace(fresh, config=config)

    def _signal(self, signum: int) -> None:
        for process in self._workers.values():
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    def run(self) -> int:
        # The workers share their metrics through files here (sidecar/metrics.py); a fresh
        # directory per supervisor, so figures of an earlier run never add up with these.
        # In memory (/dev/shm) when the system has it: each worker rewrites its file every
        # second from its event loop, and on a disk busy with other writes (an fsyncing Redis)
        # a rename was seen to block the loop for up to 175 ms.
        state_dir = Path(self.loaded.config.server.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm")
        parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else state_dir.resolve()
        metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-", dir=parent)
        os.environ[METRICS_DIR_ENV] = metrics_dir
        try:
            return self._run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "_stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "_stopping", True))
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload", True))
        for worker_id in range(self.count):
            self._spawn(worker_id)
        restarts: list[float] = []
        while not self._stopping:
            time.sleep(0.1)
            if self._reload:
                self._reload = False
                self._refresh_config()
                self._signal(signal.SIGHUP)
            for worker_id, process in list(self._workers.items()):
                if not process.is_alive() and not self._stopping:
                    log.error("worker died; restarting it", extra={
                        "worker": worker_id, "pid": process.pid, "exitcode": process.exitcode})
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < 10] + [now]
                    if len(restarts) > 5 * self.count:
                        log.critical("workers keep dying; giving up")
                        self._stopping = True
                        break
                    self._refresh_config()
                    self._spawn(worker_id)
        log.info("stopping workers", extra={"grace_s": self.grace})
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 5
        for process in self._workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        return 0
