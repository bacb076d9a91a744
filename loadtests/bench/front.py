"""Front-proxy benchmark: TLS pass-through and compressed cache hits against nginx.

Two pairs, each nginx against the sidecar with the same settings, measured in one run with wrk
(1 thread, 64 connections by default, keep-alive: one TLS handshake per connection):

  nginx TLS proxy_pass     nginx (1 worker) terminating TLS (the same self-signed P-256
                           certificate, TLS 1.3) and proxying GET /pass (1 KiB, no-store) to the
                           origin over kept-alive HTTP/1.1
  sidecar TLS pass-through the sidecar with `server.tls`, GET /pass on a route with no policies
  nginx gzip hit           nginx proxy_cache answering GET /doc.json (a 10 KiB JSON document,
                           max-age=3600) from its cache with `gzip on; gzip_comp_level 6`, to a
                           client sending `Accept-Encoding: gzip`: nginx compresses every hit
  sidecar gzip hit         the sidecar, `cache: {ttl: 60s, layers: [memory]}` and
                           `compress: {encodings: [gzip], levels: {gzip: 6}}`, the same request:
                           the stored entry is compressed once and sent as stored
  nginx hit, stored gzipped  nginx's best case for the same: GET /doc-gz.json, gzipped by the
                           origin (`Vary: Accept-Encoding`), so nginx's cache keeps the gzipped
                           variant and sends it as stored, like the sidecar

plus, for scale, the sidecar's plain-HTTP pass-through (the TLS cost is the difference). The
origin is nginx on core 1 with wrk; the servers under test run on core 0 (`taskset -c 0`), each
idle while another is measured. Every case is checked first (status 200, the body and, for the
gzip cases, `Content-Encoding: gzip` and a cache hit). Cases run in turns within each round
(--rounds, 3 by default) and each reports its median round. The sidecar's CPU per request is
read from /proc during the measured part.

Prints the table and the ratios sidecar / nginx (no goal is set for them: the figures go to
docs/performance.md). Without wrk or nginx it prints SKIP and exits 0; 2 when the harness
fails.

    .venv/bin/python loadtests/bench/front.py [--duration 10] [--connections 64] [--rounds 3]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import (
    HarnessError,
    Result,
    free_port,
    http_get,
    loadavg,
    log_on_failure,
    nginx,
    on_signal,
    redis_server,
    sidecar_cpu,
    sidecar_process,
    wait_for_port,
    which,
    wrk,
)

PASS_PATH, PASS_SIZE = "/pass", 1024
DOC_PATH = "/doc.json"
STORED_PATH = "/doc-gz.json"  # gzipped by the origin: nginx stores the gzipped variant
GZIP_LEVEL = 6
GZIP = {"Accept-Encoding": "gzip"}

NGINX_TLS = "nginx TLS proxy_pass"
SIDE_TLS = "sidecar TLS pass-through"
SIDE_PLAIN = "sidecar pass-through (plain)"
NGINX_GZIP = "nginx gzip hit"
NGINX_STORED = "nginx hit, stored gzipped"
SIDE_GZIP = "sidecar gzip hit"


def document() -> bytes:
    """About 10 KiB of JSON, as compressible as a typical API listing (about 8:1 at gzip 6)."""
    items = [{"id": i, "name": f"product {i}", "price": round(i * 1.37, 2),
              "tags": ["catalog", "in-stock" if i % 3 else "backorder"],
              "description": f"Item number {i} of the example catalog."} for i in range(72)]
    return json.dumps(items).encode()


def certificate(workdir: Path) -> tuple[Path, Path]:
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    key.chmod(0o644)  # nginx's master reads it as root; kept readable for the worker too
    return cert, key


def origin_block(workdir: Path, port: int) -> str:
    return (f"  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n"
            f"    location = {PASS_PATH} {{ default_type text/plain;\n"
            f"      add_header Cache-Control \"no-store\"; return 200 \"{'x' * PASS_SIZE}\"; }}\n"
            f"    location = {DOC_PATH} {{ default_type application/json;\n"
            f"      add_header Cache-Control \"max-age=3600\"; alias {workdir}/doc.json; }}\n"
            f"    location = {STORED_PATH} {{ default_type application/json;\n"
            f"      gzip on; gzip_comp_level {GZIP_LEVEL}; gzip_types application/json;"
            " gzip_vary on; gzip_proxied any;\n"
            f"      add_header Cache-Control \"max-age=3600\"; alias {workdir}/doc.json; }} }}")


def proxy_block(workdir: Path, tls_port: int, gzip_port: int, origin: int, cert: Path,
                key: Path) -> str:
    return (f"  proxy_cache_path {workdir}/nginx-cache levels=1:2 keys_zone=bench:10m"
            " max_size=64m inactive=60m use_temp_path=off;\n"
            f"  upstream origin {{ server 127.0.0.1:{origin}; keepalive 64;"
            " keepalive_requests 1000000; }\n"
            "  proxy_http_version 1.1; proxy_set_header Connection \"\";\n"
            f"  server {{ listen 127.0.0.1:{tls_port} ssl; keepalive_requests 1000000;\n"
            f"    ssl_certificate {cert}; ssl_certificate_key {key};\n"
            "    ssl_protocols TLSv1.2 TLSv1.3;\n"
            f"    location = {PASS_PATH} {{ proxy_pass http://origin; }} }}\n"
            f"  server {{ listen 127.0.0.1:{gzip_port}; keepalive_requests 1000000;\n"
            f"    gzip on; gzip_comp_level {GZIP_LEVEL}; gzip_min_length 1024;"
            " gzip_types application/json; gzip_vary on; gzip_proxied any;\n"
            f"    location = {DOC_PATH} {{ proxy_pass http://origin;\n"
            "      proxy_cache bench; proxy_cache_valid 200 60s;\n"
            "      add_header X-Cache-Status $upstream_cache_status always; }\n"
            f"    location = {STORED_PATH} {{ gzip off; proxy_pass http://origin;\n"
            "      proxy_cache bench; proxy_cache_valid 200 60s;\n"
            "      add_header X-Cache-Status $upstream_cache_status always; } }")


def sidecar_config(workdir: Path, port: int, tls_port: int, admin: int, tls_admin: int,
                   redis: int, origin: int, cert: Path, key: Path
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two sidecars of one config but the listener: plain, and TLS."""
    def config(name: str, listen: int, admin_port: int) -> dict[str, Any]:
        return {
            "server": {"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin_port}",
                       "workers": 1, "watch_config": False,
                       "state_dir": str(workdir / f"{name}-state")},
            "redis": {"url": f"redis://127.0.0.1:{redis}/0"},
            "upstreams": {"origin": {"url": f"http://127.0.0.1:{origin}"}},
            "log": {"access": False},
            "routes": [
                {"name": "doc", "match": {"path": DOC_PATH}, "upstream": "origin",
                 "cache": {"ttl": "60s", "layers": ["memory"]},
                 "compress": {"encodings": ["gzip"], "levels": {"gzip": GZIP_LEVEL}}},
                {"name": "pass", "match": {"path": PASS_PATH}, "upstream": "origin"},
            ],
        }
    plain = config("sidecar", port, admin)
    tls = config("sidecar-tls", tls_port, tls_admin)
    tls["server"]["tls"] = {"cert": str(cert), "key": str(key)}
    return plain, tls


def check(port: int, path: str, *, tls: bool = False, gzipped: bytes | None = None,
          hit_header: str | None = None, hit: str = "") -> None:
    """GET until the expected answer: 200 with the body (decoded from gzip when `gzipped`),
    and, given `hit_header`, a cache hit."""
    for _ in range(20):
        status, headers, body = http_get(port, path, GZIP if gzipped else None, tls=tls)
        if status != 200:
            raise HarnessError(f"GET {path} on :{port}: status {status}: {body[:200]!r}")
        if gzipped is not None:
            if headers.get("content-encoding") != "gzip" or gzip.decompress(body) != gzipped:
                raise HarnessError(f"GET {path} on :{port}: not the gzipped document "
                                   f"(Content-Encoding {headers.get('content-encoding')!r})")
        elif len(body) != PASS_SIZE:
            raise HarnessError(f"GET {path} on :{port}: {len(body)} bytes, not {PASS_SIZE}")
        if hit_header is None or hit in headers.get(hit_header, "").lower():
            return
    raise HarnessError(f"no cache hit for {path} on :{port}")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run(args: argparse.Namespace, redis_bin: str) -> tuple[list[Result], dict[str, Any]]:
    extra: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-front-") as tmp, \
            ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx workers run as nobody
        (workdir / "tmp").mkdir()
        doc = document()
        (workdir / "doc.json").write_bytes(doc)
        cert, key = certificate(workdir)
        origin, tls_proxy, gzip_proxy, redis, side, side_tls, side_admin, tls_admin = (
            free_port() for _ in range(8))

        stack.enter_context(nginx(workdir, "origin", origin_block(workdir, origin), core=1))
        with log_on_failure("origin nginx", workdir / "origin.error.log"):
            wait_for_port(origin)
        stack.enter_context(nginx(workdir, "proxy", proxy_block(
            workdir, tls_proxy, gzip_proxy, origin, cert, key), core=0))
        with log_on_failure("proxy nginx", workdir / "proxy.error.log"):
            wait_for_port(tls_proxy)
            wait_for_port(gzip_proxy)
        check(tls_proxy, PASS_PATH, tls=True)
        check(gzip_proxy, DOC_PATH, gzipped=doc, hit_header="x-cache-status", hit="hit")
        check(gzip_proxy, STORED_PATH, gzipped=doc, hit_header="x-cache-status", hit="hit")

        stack.enter_context(redis_server(redis_bin, workdir, redis, core=1))
        plain, tls = sidecar_config(workdir, side, side_tls, side_admin, tls_admin, redis,
                                    origin, cert, key)
        for name, config, port in (("sidecar", plain, side), ("sidecar-tls", tls, side_tls)):
            stack.enter_context(log_on_failure(name, workdir / f"{name}.log"))
            stack.enter_context(sidecar_process(workdir, name, config, port))
        check(side, PASS_PATH)
        check(side_tls, PASS_PATH, tls=True)
        check(side, DOC_PATH, gzipped=doc, hit_header="cache-status", hit="hit")
        extra["document"] = {"bytes": len(doc), "gzip_bytes": len(gzip.compress(doc, 6))}

        cases: list[tuple[str, int, str, str, dict[str, str] | None, int | None]] = [
            (NGINX_TLS, tls_proxy, PASS_PATH, "https", None, None),
            (SIDE_TLS, side_tls, PASS_PATH, "https", None, tls_admin),
            (SIDE_PLAIN, side, PASS_PATH, "http", None, side_admin),
            (NGINX_GZIP, gzip_proxy, DOC_PATH, "http", GZIP, None),
            (NGINX_STORED, gzip_proxy, STORED_PATH, "http", GZIP, None),
            (SIDE_GZIP, side, DOC_PATH, "http", GZIP, side_admin),
        ]
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}", file=sys.stderr, flush=True)
            for name, port, path, scheme, headers, admin in cases:
                start: list[float] = []
                result = wrk(name, port, args.duration, args.connections, path,
                             after_warmup=(lambda a=admin, s=start: s.append(sidecar_cpu(a)))
                             if admin else None, scheme=scheme, headers=headers)
                runs.setdefault(name, []).append(result)
                if admin:
                    used = sidecar_cpu(admin) - start[0]
                    extra.setdefault(name, {}).setdefault("cpu_us", []).append(
                        round(used / (result.rps * args.duration) * 1e6, 2))
                print(f"  {name:<30}{result.rps:>9.0f} req/s", file=sys.stderr, flush=True)
    results = []
    for name, measured in runs.items():
        row = extra.setdefault(name, {})
        row["rounds_rps"] = [round(r.rps) for r in measured]
        if "cpu_us" in row:
            row["cpu_us_median"] = median(row["cpu_us"])
        results.append(sorted(measured, key=lambda r: r.rps)[len(measured) // 2])
    return results, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case (10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median counts (3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        parser.error("--rounds, --duration and --connections must be positive")
    for tool, fallback in (("wrk", "/usr/bin/wrk"), ("nginx", "/usr/sbin/nginx"),
                           ("openssl", "/usr/bin/openssl")):
        if which(tool, fallback) is None:
            reason = f"{tool} is not installed (apt-get install {tool}); nothing measured"
            print(f"SKIP: {reason}")
            if args.json:
                args.json.write_text(json.dumps({"skipped": reason}) + "\n")
            return 0
    redis_bin = which("redis-server", "/usr/bin/redis-server", "/usr/sbin/redis-server")
    if redis_bin is None:
        print("redis-server is not installed (`make setup`)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    load_start = loadavg()
    try:
        results, extra = run(args, redis_bin)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}); every process started was stopped",
              file=sys.stderr)
        return 130
    except (HarnessError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        return 2
    load_end = loadavg()
    by = {r.name: r for r in results}
    ratios = {
        "sidecar TLS pass-through / nginx TLS proxy_pass, req/s":
            by[SIDE_TLS].rps / by[NGINX_TLS].rps,
        "sidecar TLS / plain pass-through, req/s": by[SIDE_TLS].rps / by[SIDE_PLAIN].rps,
        "sidecar gzip hit / nginx gzip hit, req/s": by[SIDE_GZIP].rps / by[NGINX_GZIP].rps,
        "sidecar gzip hit / nginx hit stored gzipped, req/s":
            by[SIDE_GZIP].rps / by[NGINX_STORED].rps,
        "sidecar TLS p99 / nginx TLS p99": by[SIDE_TLS].p99_ms / by[NGINX_TLS].p99_ms,
        "sidecar gzip hit p99 / nginx gzip hit p99": by[SIDE_GZIP].p99_ms / by[NGINX_GZIP].p99_ms,
    }
    doc = extra["document"]
    print(f"\nfront: wrk -t1 -c{args.connections}, {args.rounds} round(s) of {args.duration:g}s "
          "per case in turns (median round); servers under test on core 0, wrk + origin on "
          f"core 1; TLS cases 1 KiB over TLS 1.3 (P-256), gzip cases a {doc['bytes']} B JSON "
          f"document ({doc['gzip_bytes']} B at gzip {GZIP_LEVEL})")
    print(f"load average: {load_start} at start, {load_end} at end")
    print(f"{'case':<32}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'CPU us/req':>12}"
          "   rounds req/s")
    for r in results:
        row = extra[r.name]
        cpu = f"{row['cpu_us_median']:.1f}" if "cpu_us_median" in row else "-"
        print(f"{r.name:<32}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.errors:>8}"
              f"{cpu:>12}   {', '.join(str(x) for x in row['rounds_rps'])}")
    print()
    for name, value in ratios.items():
        print(f"{name:<58}{value:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "results": [asdict(r) | extra.get(r.name, {}) for r in results],
            "ratios": {k: round(v, 4) for k, v in ratios.items()}, "document": doc,
            "duration_s": args.duration, "connections": args.connections,
            "rounds": args.rounds, "loadavg_start": load_start, "loadavg_end": load_end},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
