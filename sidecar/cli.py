"""`sidecar run|worker|check|loadtest|record`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from .config import ConfigError, LoadedConfig, load_config
from .logs import configure_logging
from .process.embedded_redis import EmbeddedRedis, EmbeddedRedisError, budget_for
from .process.worker import run_worker

log = logging.getLogger("sidecar")


def _load_or_report(path: str) -> LoadedConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{path}: {count} problem{'s' if count != 1 else ''}; nothing was started",
              file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    config = loaded.config
    configure_logging(config.log, loaded.path.parent)
    embedded: EmbeddedRedis | None = None
    redis_url = config.redis.url
    if redis_url == "embedded":
        budget = budget_for(config)
        if budget.unbounded:
            log.warning("queues without max_queued: the embedded Redis sets no room aside for "
                        "their jobs, which share redis.headroom with what no setting bounds",
                        extra={"queues": list(budget.unbounded)})
        embedded = EmbeddedRedis(config.server.state_dir, config.redis.binary, budget.total)
        try:
            redis_url = embedded.start()
        except EmbeddedRedisError as exc:
            print(f"sidecar: {exc}", file=sys.stderr)
            return 1
    try:
        if config.server.workers == 1:
            return run_worker(loaded, redis_url)
        from .process.supervisor import Supervisor

        return Supervisor(loaded, redis_url).run()
    finally:
        if embedded is not None:
            embedded.stop()


def cmd_worker(args: argparse.Namespace) -> int:
    from .jobs.worker import StandaloneWorker, embedded_url

    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    config = loaded.config
    configure_logging(config.log, loaded.path.parent)
    redis_url = config.redis.url
    if redis_url == "embedded":
        found = embedded_url(config)
        if found is None:
            print(f"sidecar worker: redis.url is 'embedded' but no embedded Redis runs in "
                  f"{config.server.state_dir}: start 'sidecar run' with this config first, "
                  "or set redis.url to a shared Redis", file=sys.stderr)
            return 1
        redis_url = found
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    async def work() -> None:
        await StandaloneWorker(loaded, redis_url).run()  # built in the loop its pools use

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(work())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    config = loaded.config
    print(f"{args.config}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams, "
          f"{len(loaded.bundles)} policy bundles from {len(loaded.files) - 1} files)")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .crypto import new_key

    print(new_key())
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .core.units import parse_duration
    from .loadtest import runner

    try:
        duration = parse_duration(args.duration) if args.duration else None
    except ValueError as exc:
        print(f"sidecar loadtest: --duration: {exc}", file=sys.stderr)
        return 2
    try:
        plan = runner.plan(config=args.config, replay=args.replay, users=args.users,
                           duration=duration, spawn_rate=args.spawn_rate, target=args.target,
                           results=args.results)
        return runner.run(plan)
    except runner.LoadtestError as exc:
        print(f"sidecar loadtest: {exc}", file=sys.stderr)
        return 2


def cmd_record(args: argparse.Namespace) -> int:
    from .loadtest import record

    upstream = args.upstream
    if upstream is None:
        if not Path(args.config).exists():
            print(f"sidecar record: give --upstream URL (no {args.config} to take the app's "
                  "address from)", file=sys.stderr)
            return 2
        loaded = _load_or_report(args.config)
        if loaded is None:
            return 2
        upstream = next(iter(loaded.config.upstreams.values())).url
    try:
        host, port = args.listen.rsplit(":", 1)
        port_number = int(port)
    except ValueError:
        print(f"sidecar record: --listen: expected HOST:PORT, got {args.listen!r}",
              file=sys.stderr)
        return 2
    try:
        return record.record(upstream=upstream, host=host, port=port_number,
                             output=Path(args.output), flows=args.flows and Path(args.flows),
                             venv=Path(args.venv) if args.venv else record.default_venv())
    except record.RecordError as exc:
        print(f"sidecar record: {exc}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A reverse-proxy sidecar driven by one YAML file.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="serve traffic", description=(
            "Start the sidecar: the public listener, the admin listener and, with "
            "redis.url: embedded, a private redis-server. SIGHUP or editing the config reloads "
            "it; SIGTERM drains requests in flight within server.shutdown_grace."))
    run.add_argument("-c", "--config", default="config.yaml", help="config file (config.yaml)")
    run.set_defaults(func=cmd_run)
    worker = sub.add_parser(
        "worker", help="run offloaded jobs only", description=(
            "Run the jobs of the queues in the config (see docs/jobs.md) without serving "
            "traffic; any number of workers, on any machines, share the queue through Redis. "
            "SIGTERM puts running jobs back in their queue; SIGHUP reloads the config."))
    worker.add_argument("-c", "--config", default="config.yaml", help="config file (config.yaml)")
    worker.set_defaults(func=cmd_worker)
    check = sub.add_parser(
        "check", help="validate a config file", description=(
            "Validate the config file and the policy files it includes. Exits 0 when valid, "
            "else prints every problem with its file, key path and line, and exits 1."))
    check.add_argument("-c", "--config", default="config.yaml", help="config file (config.yaml)")
    check.set_defaults(func=cmd_check)
    keygen = sub.add_parser(
        "keygen", help="print a new key for redis.encryption_keys", description=(
            "Print 32 random bytes in base64: a key for redis.encryption_keys. Put the new key "
            "first to rotate; keep the old one listed until what it sealed has expired "
            "(docs/security.md)."))
    keygen.set_defaults(func=cmd_keygen)
    loadtest = sub.add_parser(
        "loadtest", help="run a load test against SLAs", description=(
            "Run locust headless against the target of an SLA file, one task per SLA (an "
            "offloaded route: post, poll, fetch the result, timed as a whole), or replay "
            "captured traffic; print each SLA check as PASS/FAIL, write locust's CSV and HTML "
            "reports, exit 1 when an SLA is missed and 2 when the test could not run. "
            "See docs/loadtesting.md."))
    loadtest.add_argument("-c", "--config", default=None,
                          help="SLA file (loadtests/slas.yaml)")
    loadtest.add_argument("--users", type=_positive_int, help="concurrent users (the file's, 10)")
    loadtest.add_argument("--duration", help="how long, e.g. 60s or 5m (the file's, 60s)")
    loadtest.add_argument("--spawn-rate", type=_positive_float,
                          help="users started per second (default: all at once)")
    loadtest.add_argument("--target", help="base URL to load (the file's 'target')")
    loadtest.add_argument("--replay", metavar="HAR",
                          help="replay captured traffic (sidecar record) instead of the SLAs' "
                          "requests; checked against the file's 'replay' limits")
    loadtest.add_argument("--results", metavar="DIR",
                          help="reports folder (loadtests/results/<date-time>)")
    loadtest.set_defaults(func=cmd_loadtest)
    rec = sub.add_parser(
        "record", help="capture real traffic for --replay", description=(
            "Run mitmproxy (mitmdump, reverse mode) in front of the app and write the traffic "
            "sent through it to a HAR file, credentials removed, when stopped with Ctrl-C. "
            "mitmproxy is installed on first use into a virtual environment of its own."))
    rec.add_argument("--upstream", help="the app's URL (default: the first upstream of -c)")
    rec.add_argument("-c", "--config", default="config.yaml",
                     help="sidecar config to take the upstream from (config.yaml)")
    rec.add_argument("--listen", default="127.0.0.1:8081",
                     help="where clients send traffic to record (127.0.0.1:8081)")
    rec.add_argument("-o", "--output", default="capture.har", help="HAR file (capture.har)")
    rec.add_argument("--flows", help="also save mitmproxy's flow file here")
    rec.add_argument("--venv", help="mitmproxy's virtual environment "
                     "($SIDECAR_MITMPROXY_VENV or ~/.cache/sidecar/mitmproxy)")
    rec.set_defaults(func=cmd_record)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until a runtime or supervisor handles it
    args = build_parser().parse_args(argv)
    if args.command in ("run", "worker", "check") and not Path(args.config).exists():
        print(f"sidecar: config file not found: {args.config}", file=sys.stderr)
        return 1
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
