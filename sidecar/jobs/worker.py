"""`sidecar worker`: a process that only runs offloaded jobs (no listeners), for machines that
add job capacity without serving traffic. Any number of them share the queue through Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from ..app import attach_jobs, progress_base, tracing_for
from ..balancer import make_upstream
from ..config import Config, ConfigError, LoadedConfig, load_config
from ..logs import configure_logging
from ..process.embedded_redis import EmbeddedRedis
from .callbacks import CallbackSender
from .queue import JobService
from .runner import JobRunner

log = logging.getLogger("sidecar")


class StandaloneWorker:
    def __init__(self, loaded: LoadedConfig, redis_url: str) -> None:
        self.loaded = loaded
        self.redis_url = redis_url
        self.pools = {name: make_upstream(name, upstream)
                      for name, upstream in loaded.config.upstreams.items()}
        self.service = JobService()
        self.service.sealer.configure(loaded.config.redis.keys())
        self.runner = JobRunner(self, self.service)
        self.tracing = tracing_for(loaded.config, os.getpid())
        self.callbacks = CallbackSender(self, self.service)
        self._stopped = asyncio.Event()

    @property
    def config(self) -> Config:
        return self.loaded.config

    def progress_base(self) -> str:
        return progress_base(self.config, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopped.set)
        loop.add_signal_handler(signal.SIGINT, self._stopped.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        attach_jobs(self.service, self.redis_url, self.config)
        self.service.redis_up = True
        await self.callbacks.start()
        await self.runner.start()
        log.info("sidecar worker running", extra={"pid": os.getpid(),
                                                  "queues": sorted(self.config.queues)})
        await self._stopped.wait()
        log.info("sidecar worker stopping; running jobs go back to their queues")
        await self.runner.stop()
        await self.callbacks.stop()
        await self.service.close()
        for pool in self.pools.values():
            await pool.close()
        if self.tracing is not None:
            self.tracing.shutdown()

    async def reload(self) -> None:
        """SIGHUP: queues, limits and upstreams from the config file again."""
        try:
            loaded = await asyncio.to_thread(load_config, self.loaded.path)
        except ConfigError as exc:
            log.error("config reload rejected; the previous config keeps running", extra={
                "problems": [str(p) for p in exc.problems]})
            return
        old = self.pools
        self.pools = {name: old[name] if name in old and old[name].config == upstream
                      else make_upstream(name, upstream)
                      for name, upstream in loaded.config.upstreams.items()}
        self.loaded = loaded
        self.service.sealer.configure(loaded.config.redis.keys())
        for name, pool in old.items():
            if self.pools.get(name) is not pool:
                await pool.close()
        configure_logging(loaded.config.log, loaded.path.parent)
        log.info("config reloaded", extra={"queues": sorted(loaded.config.queues)})


def embedded_url(config: Config) -> str | None:
    """The socket of the embedded Redis a `sidecar run` with the same state_dir started."""
    socket = EmbeddedRedis(config.server.state_dir, config.redis.binary).socket
    return f"unix://{socket.resolve()}" if socket.exists() else None
