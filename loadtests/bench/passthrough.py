"""Pass-through benchmark: the sidecar against nginx `proxy_pass`, same machine, same run.

Measures requests/s and p50/p99 latency with wrk (64 connections by default) for:
  origin       nginx serving a fixed 1 KiB body directly
  nginx-proxy  nginx proxy_pass (1 worker, upstream keepalive) in front of the origin
  sidecar      the sidecar (1 worker, access log off) in front of the origin
  sidecar+log  the same with its access log on (written to /dev/null)

The server under test runs on core 0 (`taskset -c 0`); wrk and the origin share core 1, so the
origin costs every proxied case the same. Prints a table and the ratio sidecar / nginx-proxy
against the 0.25 target; exits non-zero only when the harness itself fails.

    .venv/bin/python loadtests/bench/passthrough.py [--duration 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from common import Result, free_port, nginx, sidecar_process, wait_for_port, wrk

ROOT = Path(__file__).resolve().parents[2]
TARGET_RATIO = 0.25


def ensure_tools() -> None:
    missing = [name for name in ("nginx", "wrk") if not shutil.which(name)
               and not Path(f"/usr/sbin/{name}").exists()]
    if missing:
        subprocess.run([str(ROOT / "scripts" / "ensure-debian-packages"), *missing], check=True)


@contextmanager
def sidecar(workdir: Path, name: str, origin_port: int, port: int,
            access_log: bool) -> Iterator[None]:
    with sidecar_process(workdir, name, {
        "server": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{free_port()}",
                   "watch_config": False, "state_dir": str(workdir / f"{name}-state")},
        "redis": {"url": "embedded"},
        "upstreams": {"app": {"url": f"http://127.0.0.1:{origin_port}"}},
        "log": {"access": access_log},
        "routes": [{"name": "default", "match": {"path": "/**"}, "upstream": "app"}],
    }, port):
        yield


def run(duration: float, connections: int) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as nobody
        (workdir / "tmp").mkdir()
        (workdir / "body.txt").write_bytes(b"x" * 1024)
        direct, origin, proxy, side, side_log = (free_port() for _ in range(5))
        results = []

        def static_block(port: int) -> str:
            return (f"  server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;\n"
                    f"    location / {{ root {workdir}; try_files /body.txt =404; }} }}")

        # (a) the fast upstream alone, on core 0 like every server under test.
        with nginx(workdir, "direct", static_block(direct), core=0):
            wait_for_port(direct)
            results.append(wrk("origin (direct)", direct, duration, connections))
        with nginx(workdir, "origin", static_block(origin), core=1):
            wait_for_port(origin)
            proxy_block = (
                f"  upstream origin {{ server 127.0.0.1:{origin}; keepalive 128; }}\n"
                f"  server {{ listen 127.0.0.1:{proxy}; keepalive_requests 100000;\n"
                f"    location / {{ proxy_pass http://origin; proxy_http_version 1.1;\n"
                f"      proxy_set_header Connection \"\"; }} }}")
            with nginx(workdir, "proxy", proxy_block, core=0):
                wait_for_port(proxy)
                results.append(wrk("nginx proxy_pass", proxy, duration, connections))
            with sidecar(workdir, "sidecar", origin, side, access_log=False):
                results.append(wrk("sidecar", side, duration, connections))
            with sidecar(workdir, "sidecar-log", origin, side_log, access_log=True):
                results.append(wrk("sidecar + access log", side_log, duration, connections))
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case (10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("needs 2 cores: the server under test on core 0, wrk on core 1", file=sys.stderr)
        return 2
    ensure_tools()
    results = run(args.duration, args.connections)
    print(f"\npass-through, 1 KiB body, {args.connections} connections, {args.duration:g}s "
          "each; server under test on core 0, wrk + origin on core 1")
    print(f"{'case':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in results:
        print(f"{r.name:<24}{r.rps:>10.0f}{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}{r.errors:>8}")
    by_name = {r.name: r for r in results}
    ratio = by_name["sidecar"].rps / by_name["nginx proxy_pass"].rps
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    print(f"\nratio sidecar / nginx proxy_pass: {ratio:.2f} (target >= {TARGET_RATIO}) {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results],
                                         "ratio": ratio, "target": TARGET_RATIO}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
