"""Structured logs (JSON or logfmt) and a buffered access log.

Application events go through `logging` to stderr. The access log is kept apart and buffered:
one line per request written through `logging` costs a record, a format and a write syscall per
request, which on the proxy's hot path is a large share of the whole. Lines are encoded at once
and flushed every 100 ms or every 64 KiB, like nginx's `access_log ... buffer=`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import IO, Any

import orjson

from .config import LogConfig

_STD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    if text == "" or any(c in text for c in ' ="\\\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def render(fields: dict[str, Any], fmt: str) -> bytes:
    if fmt == "json":
        return orjson.dumps(fields, default=str) + b"\n"
    return (" ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items()) + "\n").encode()


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class StructuredFormatter(logging.Formatter):
    """`logger.info("event", extra={...})` -> one JSON or logfmt line with the extras as fields."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.kind = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS:
                fields[key] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return render(fields, self.kind).decode().rstrip("\n")


def configure_logging(config: LogConfig, base: Path | None = None) -> None:
    """Logs to stderr; audit lines to `log.audit_file` when set (relative to `base`, the
    config file's directory)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(config.format))
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    audit = logging.getLogger("sidecar.audit")
    for handler in list(audit.handlers):
        audit.removeHandler(handler)
        handler.close()
    # Audit lines are written whatever log.level says: an operator's action is never noise.
    audit.setLevel(logging.INFO)
    audit.propagate = config.audit_file is None
    if config.audit_file is not None:
        path = Path(config.audit_file)
        file = logging.FileHandler(path if base is None else base / path, encoding="utf-8")
        file.setFormatter(StructuredFormatter("json"))
        audit.addHandler(file)


class AccessLog:
    """One line per request, buffered; `enabled` is checked before anything is built."""

    def __init__(self, config: LogConfig, stream: IO[bytes] | None = None) -> None:
        self.enabled = config.access
        self.format = config.format
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._buffer: list[bytes] = []
        self._size = 0
        self._task: asyncio.Task[None] | None = None

    def configure(self, config: LogConfig) -> None:
        self.enabled = config.access
        self.format = config.format

    def write(self, fields: dict[str, Any]) -> None:
        line = render(fields, self.format)
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= 65536:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or a broken pipe must not take requests down

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(0.1)
                self.flush()
        finally:
            self.flush()

    @staticmethod
    def now_iso() -> str:
        return _timestamp(time.time())
