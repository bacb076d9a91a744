"""`sidecar record`: mitmdump in reverse-proxy mode in front of the app, writing a HAR.

mitmproxy pins versions of libraries the sidecar also uses, so it is never installed beside
it: it gets a virtual environment of its own, created on first use (docs/loadtesting.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .child import Forwarding, spawn
from .har import HarError, read_har, sanitize_har

MITMPROXY = "mitmproxy>=11,<13"
_READY = ".sidecar-installed"  # written once pip succeeded: a half-made venv is remade


class RecordError(Exception):
    """Recording could not start or finish; the message says why and what to do."""


class MitmproxyUnavailable(RecordError):
    """mitmproxy cannot be installed here (no network, no venv module...)."""


def default_venv() -> Path:
    if os.environ.get("SIDECAR_MITMPROXY_VENV"):
        return Path(os.environ["SIDECAR_MITMPROXY_VENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sidecar" / "mitmproxy"


def ensure_mitmdump(venv: Path) -> Path:
    """The mitmdump of `venv`, installing mitmproxy there first if need be (one process at a
    time: a lock file beside the venv)."""
    mitmdump = venv / "bin" / "mitmdump"
    if (venv / _READY).exists() and mitmdump.exists():
        return mitmdump
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _READY).exists() and mitmdump.exists():
            return mitmdump
        shutil.rmtree(venv, ignore_errors=True)
        print(f"first use: installing {MITMPROXY} into its own virtual environment, {venv} "
              "(its pinned dependencies clash with the sidecar's)...", file=sys.stderr, flush=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise MitmproxyUnavailable(
                f"cannot create a virtual environment in {venv}: {_tail(made.stderr)} "
                "(on Debian: apt-get install python3-venv)")
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", MITMPROXY],
                             capture_output=True, text=True)
        if pip.returncode != 0 or not mitmdump.exists():
            shutil.rmtree(venv, ignore_errors=True)
            raise MitmproxyUnavailable(f"pip could not install {MITMPROXY}: "
                                       f"{_tail(pip.stderr or pip.stdout)}")
        (venv / _READY).touch()
    return mitmdump


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "no output"


def record(*, upstream: str, host: str, port: int, output: Path, flows: Path | None,
           venv: Path) -> int:
    mitmdump = ensure_mitmdump(venv)
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    command = [str(mitmdump), "--mode", f"reverse:{upstream}", "--listen-host", host,
               "--listen-port", str(port), "--set", f"hardump={output}"]
    if flows is not None:
        command += ["--save-stream-file", str(flows.resolve())]
    child = spawn(command)
    with Forwarding(child):
        _wait_listening(child, host, port)
        print(f"recording: send traffic to http://{host}:{port} (passed on to {upstream}); "
              f"Ctrl-C stops and writes {output}", file=sys.stderr, flush=True)
        code = child.wait()
    if not output.exists():
        raise RecordError(f"mitmdump stopped (exit code {code}) without writing {output}")
    return _clean(output)


def _wait_listening(child: subprocess.Popen[bytes], host: str, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RecordError(f"mitmdump exited (code {child.returncode}) before listening on "
                              f"{host}:{port}: see its output above (port taken?)")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RecordError(f"mitmdump did not listen on {host}:{port} within 30 s")


def _clean(output: Path) -> int:
    """Credentials never stay on disk: the HAR is rewritten without them."""
    try:
        data = read_har(output.read_bytes())
        removed = sanitize_har(data)
        captured = len(data["log"]["entries"])
    except (HarError, KeyError, TypeError) as exc:
        raise RecordError(f"{output}: mitmdump wrote an unreadable HAR: {exc}") from None
    output.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{output}: {captured} requests captured, {removed} credential values removed; "
          f"replay them with: sidecar loadtest --replay {output}", file=sys.stderr, flush=True)
    return 0
