"""A real redis-server on a free port, which fault tests kill, pause and restart."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from .ports import free_port, wait_for_port


class RedisServer:
    """A real redis-server on a free port; kill() and start() for fault tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # More redis-server options, after the defaults (a later option wins), e.g.
        # ["--appendonly", "yes", "--appendfsync", "always"] for data that survives restart().
        self.options: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run the tests with `make test`, which "
                        "installs it")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel queues them) and takes
        commands, but nothing answers until resume()."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """SIGKILL, then a new redis-server on the same port (empty unless `options` turned
        persistence on)."""
        if self.process is not None:
            self.resume()  # a stopped process dies of SIGKILL too, but let it be plain
        self.kill()
        self.start()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(64)
