"""Helpers shared by the benchmark scripts in this directory: ports, wrk, nginx, the sidecar.

The scripts run as `python loadtests/bench/<script>.py`, so this directory is on sys.path and
they import this module as `common`.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def die_with_parent() -> None:
    """preexec_fn: Linux sends SIGTERM to the child if the benchmark script dies without its
    clean-up (SIGKILL), so no server is left behind; a normal exit stops them explicitly.
    SIGINT goes back to its default: a script started in the background by a shell has it
    ignored, and its children would inherit that and outlive a Ctrl-C sent by run_all.py."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g}s")


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def to_ms(text: str) -> float:
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    for unit in ("us", "ms", "s"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def parse_wrk(name: str, output: str) -> Result:
    rps = p50 = p99 = 0.0
    errors = 0
    for line in output.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] == ["50%"]:
            p50 = to_ms(parts[1])
        elif parts[:1] == ["99%"]:
            p99 = to_ms(parts[1])
        elif line.strip().startswith("Non-2xx"):
            errors += int(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            errors += sum(int(p.rstrip(",")) for p in parts[2::2])
    if rps == 0.0:
        raise RuntimeError(f"could not read wrk's output for {name}:\n{output}")
    return Result(name, rps, p50, p99, errors)


def wrk(name: str, port: int, duration: float, connections: int, path: str = "/",
        after_warmup: Callable[[], object] | None = None, *, scheme: str = "http",
        headers: dict[str, str] | None = None) -> Result:
    """wrk on core 1: a 2 s warm-up, then `duration` seconds measured. `after_warmup` is
    called between the two (e.g. to read the server's CPU time at the start of the measured
    run). `scheme` https: wrk's TLS (OpenSSL), one handshake per connection."""
    url = f"{scheme}://127.0.0.1:{port}{path}"
    base = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}"]
    for header, value in (headers or {}).items():
        base += ["-H", f"{header}: {value}"]
    subprocess.run([*base, "-d2s", url], check=True, capture_output=True,  # warm-up
                   preexec_fn=die_with_parent)
    if after_warmup is not None:
        after_warmup()
    out = subprocess.run([*base, f"-d{duration:g}s", "--latency", url], check=True,
                         capture_output=True, text=True, preexec_fn=die_with_parent).stdout
    return parse_wrk(name, out)


def stop(process: subprocess.Popen[bytes], sig: int, timeout: float = 15.0) -> None:
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def nginx(workdir: Path, name: str, http_block: str, core: int) -> Iterator[None]:
    """nginx (1 worker, no access log) pinned to `core`, with `http_block` inside `http {}`."""
    conf = workdir / f"{name}.conf"
    conf.write_text(
        f"worker_processes 1;\ndaemon off;\npid {workdir}/{name}.pid;\n"
        f"error_log {workdir}/{name}.error.log;\nevents {{ worker_connections 4096; }}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {workdir}/tmp;\n"
        f"  proxy_temp_path {workdir}/tmp;\n{http_block}\n}}\n")
    process = subprocess.Popen(["taskset", "-c", str(core), nginx_binary(), "-p", str(workdir),
                                "-c", str(conf)], stderr=subprocess.PIPE,
                               preexec_fn=die_with_parent)
    try:
        yield
    finally:
        stop(process, signal.SIGQUIT)  # nginx's graceful stop


@contextmanager
def sidecar_process(workdir: Path, name: str, config: dict[str, Any],
                    port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    """`python -m sidecar run` on core 0 with `config` (written as JSON, which is YAML), until
    it listens on `port`; its stderr goes to `<workdir>/<name>.log`. `env`: added to the
    environment."""
    conf = workdir / f"{name}.yaml"
    conf.write_text(json.dumps(config))
    process = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "sidecar", "run", "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.log", "wb"),  # noqa: SIM115
        cwd=workdir, preexec_fn=die_with_parent, env={**os.environ, **(env or {})})
    try:
        wait_for_port(port)
        yield
    finally:
        stop(process, signal.SIGTERM)


def shared_hash_seed() -> dict[str, str]:
    """The environment for sidecars that are compared with each other (metrics on against
    off): one PYTHONHASHSEED for all, drawn per run and printed. With a seed each, two sidecars
    of the *same* config differed by 5.8% CPU per hit (dict layouts follow the seed), more than
    the metrics' budget; with one seed, by 0.7%. Drawn, not fixed, so that no run's figures
    rest on a hand-picked seed."""
    seed = str(int.from_bytes(os.urandom(4), "big"))
    print(f"sidecars' PYTHONHASHSEED: {seed}", file=sys.stderr)
    return {"PYTHONHASHSEED": seed}


# --- helpers for scripts that run their own origin and redis-server ---------------------------


class HarnessError(Exception):
    """The benchmark itself failed (not the server under test): exit status 2."""


@contextmanager
def log_on_failure(what: str, log: Path) -> Iterator[None]:
    """Adds the tail of `log` to a RuntimeError (nothing listening, output unreadable)."""
    try:
        yield
    except RuntimeError as exc:
        raise HarnessError(f"{what}: {exc}\n--- {log.name}:\n{tail(log)}") from exc


def which(name: str, *fallbacks: str) -> str | None:
    """`name` on PATH, else the first of `fallbacks` that exists (sbin is not always on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    return next((path for path in fallbacks if Path(path).exists()), None)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def child(args: list[str], log: Path, sig: int = signal.SIGTERM) -> Iterator[None]:
    """A helper process (origin, redis) that dies with the script in any case; its stderr goes
    to `log`."""
    with open(log, "wb") as err:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=err, preexec_fn=die_with_parent)
    try:
        yield
    finally:
        stop(process, sig)


def _unchecked_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 5.0, *, tls: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection: status, headers (lower-case names), body (as sent: not
    decoded). `tls`: over HTTPS, the certificate not checked (the benchmarks make their own)."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                        context=_unchecked_tls())
            if tls else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout))
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(binary: str, workdir: Path, port: int, core: int = 0) -> Iterator[None]:
    """A throw-away redis-server (no persistence) pinned to `core`, until it answers PING;
    RuntimeError (with its log) if it does not within 10 s."""
    log = workdir / "redis.log"
    with child(["taskset", "-c", str(core), binary, "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir),
                "--loglevel", "warning", "--logfile", str(log)], workdir / "redis.err"):
        deadline = time.monotonic() + 10
        while not redis_ping(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on :{port}\n{tail(log)}")
            time.sleep(0.05)
        yield


def sidecar_cpu(admin: int) -> float:
    """The CPU seconds (user + system) the sidecar has used so far (its pid from /admin/stats;
    with `server.workers: 1` the one process serves and runs the jobs)."""
    pid = int(json.loads(http_get(admin, "/admin/stats")[2])["pid"])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def on_signal(signum: int, _frame: object) -> None:
    # First signal: unwind (every `finally` stops its process); later ones must not cut the
    # clean-up short, so they are ignored from here on.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


# --- helpers for scripts that signal, kill and restart what they start (loadtests/soak.py) -----


def spawn(args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A process the caller signals, kills, restarts and stops itself (`stop`), unlike `child`;
    it still dies with the script (PR_SET_PDEATHSIG). Its stderr is appended to `log`.
    Call it from the main thread: Linux sends the death signal when the *thread* that started
    the child ends, so a child started from a worker thread would be killed with that thread."""
    with open(log, "ab") as err:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, cwd=cwd, preexec_fn=die_with_parent)


def redis_args(binary: str, workdir: Path, port: int, *, appendonly: bool = False) -> list[str]:
    """redis-server's command line, its data and log in `workdir`. `appendonly`: every write
    is fsync'ed to the append-only file before it is acknowledged (`appendfsync always`), so a
    server SIGKILLed and started again on the same `workdir` still has every acknowledged
    write; without it nothing is persisted (as `redis_server`)."""
    persistence = (["--appendonly", "yes", "--appendfsync", "always"] if appendonly
                   else ["--appendonly", "no"])
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
            "--daemonize", "no", "--dir", str(workdir), "--loglevel", "warning",
            "--logfile", str(workdir / "redis.log")]
