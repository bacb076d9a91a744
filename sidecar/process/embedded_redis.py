"""`redis.url: embedded`: a private redis-server owned by the sidecar, on a unix socket in the
state directory, stopped with it (and, through PR_SET_PDEATHSIG, even when the sidecar is killed).

It keeps an append-only file (jobs must survive a restart) and is bounded: `maxmemory` from
`budget_for(config)` (core/maxmemory.py says how it is sized) with `noeviction`, since Redis's
own eviction would pick job records and idempotency keys as readily as cached responses; the
cache keeps itself within its quota (stores/redis.py). A restart therefore reloads at most the
quota's worth of cached responses besides the jobs, never an unbounded history of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.maxmemory import Budget, QueueNeed, budget, job_head
from .parent import die_with_parent

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("sidecar.redis")


class EmbeddedRedisError(Exception):
    pass


def budget_for(config: Config) -> Budget:
    """The embedded Redis's memory, from the settings that bound what it holds."""
    limits = config.server.limits
    largest_body: dict[str, int] = {}
    largest_entry = 0
    for route in config.routes:
        if route.offload is not None:
            name = route.offload.queue
            largest_body[name] = max(largest_body.get(name, 0), route.offload.max_body)
        if route.cache is not None and "redis" in route.cache.layers:
            largest_entry = max(largest_entry, route.cache.redis.max_entry)
    queues = [QueueNeed(name, queue.max_queued, queue.concurrency, largest_body.get(name))
              for name, queue in config.queues.items()]
    return budget(cache_quota=config.cache.redis.max_bytes, largest_entry=largest_entry,
                  queues=queues, head=job_head(limits.max_request_line, limits.max_header_size,
                                               limits.max_headers),
                  headroom=config.redis.headroom)


class EmbeddedRedis:
    """`maxmemory`: bytes, or None for a Redis without a bound (`sidecar worker` only finds
    the socket of one `sidecar run` started)."""

    def __init__(self, state_dir: str | os.PathLike[str], binary: str = "redis-server",
                 maxmemory: int | None = None) -> None:
        self.dir = Path(state_dir).resolve() / "redis"
        self.binary = binary
        self.maxmemory = maxmemory
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> str:
        path = shutil.which(self.binary)
        if path is None:
            raise EmbeddedRedisError(
                f"redis.url is 'embedded' but {self.binary!r} is not on PATH: install Redis 7 "
                "(Debian: apt-get install redis-server; `make run` does it for you) or point "
                "redis.url at a running server (redis://host:6379/0)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket)) > 100:
            raise EmbeddedRedisError(
                f"the state directory path is too long for a unix socket: {self.socket} "
                "(set server.state_dir to a shorter path)")
        if self.socket.exists():
            if self._ping():
                raise EmbeddedRedisError(
                    f"another embedded Redis already serves {self.socket}: is another sidecar "
                    "running with the same server.state_dir?")
            self.socket.unlink()
        args = [
            path, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str(self.dir / "redis.log"),
        ]
        if self.maxmemory is not None:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "noeviction"]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=die_with_parent, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if (
                    self.process.stderr) else ""
                logfile = self.dir / "redis.log"
                if logfile.exists():
                    err += logfile.read_text(errors="replace")[-2000:]
                raise EmbeddedRedisError(f"embedded redis-server exited at start: {err.strip()}")
            if self._ping():
                log.info("embedded redis started", extra={
                    "socket": str(self.socket), "pid": self.process.pid,
                    "maxmemory": self.maxmemory})
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"embedded redis-server did not answer within {timeout:g}s")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("embedded redis stopped")

    def __repr__(self) -> str:
        state = "running" if self.process and self.process.poll() is None else "stopped"
        bound = "" if self.maxmemory is None else f" maxmemory={self.maxmemory}"
        return f"<EmbeddedRedis {self.socket} {state}{bound}>"
