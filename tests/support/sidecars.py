"""The sidecar under test: its config, in-process (fast) or as a real `python -m sidecar run`
process (signals, workers, memory)."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.app import Runtime

from .ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def make_config(upstream_url: str, redis_url: str, **sections: Any) -> dict[str, Any]:
    """A config dict listening on free ports, in front of `upstream_url`; `sections` override."""
    config: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{free_port()}", "admin_listen":
                   f"127.0.0.1:{free_port()}", "shutdown_grace": "5s",
                   "watch_interval": "100ms"},
        "redis": {"url": redis_url, "health_interval": "200ms"},
        "upstreams": {"app": {"url": upstream_url, "timeout": "5s", "connect_timeout": "1s"}},
        "log": {"access": False},
        "routes": [{"name": "default", "match": {"path": "/**"}, "upstream": "app"}],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class InProcessSidecar:
    runtime: Runtime
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.admin_port}"


@dataclass
class SidecarProcess:
    """`python -m sidecar run` as a real process."""

    config_path: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = field(default=False)

    @property
    def port(self) -> int:
        return int(self.config["server"]["listen"].rsplit(":", 1)[1])

    @property
    def admin_port(self) -> int:
        return int(self.config["server"]["admin_listen"].rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stopped = True
        return self.process.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")
