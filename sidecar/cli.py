"""`sidecar run|worker|check`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from .config import ConfigError, LoadedConfig, load_config
from .embedded_redis import EmbeddedRedis, EmbeddedRedisError
from .logs import configure_logging

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


def run_worker(loaded: LoadedConfig, redis_url: str, *, reuse_port: bool = False,
               worker_id: int = 0) -> int:
    from .app import serve

    configure_logging(loaded.config.log)
    # A SIGHUP that arrives before the runtime's handler is installed must not kill the process
    # (its default action); the reload it asks for is moot, the config is being read anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(loaded, redis_url, reuse_port=reuse_port, worker_id=worker_id))
    except OSError as exc:
        log.critical("cannot start", extra={"error": str(exc)})
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    config = loaded.config
    configure_logging(config.log)
    embedded: EmbeddedRedis | None = None
    redis_url = config.redis.url
    if redis_url == "embedded":
        embedded = EmbeddedRedis(config.server.state_dir, config.redis.binary)
        try:
            redis_url = embedded.start()
        except EmbeddedRedisError as exc:
            print(f"sidecar: {exc}", file=sys.stderr)
            return 1
    try:
        if config.server.workers == 1:
            return run_worker(loaded, redis_url)
        from .workers import Supervisor

        return Supervisor(loaded, redis_url).run()
    finally:
        if embedded is not None:
            embedded.stop()


def cmd_worker(args: argparse.Namespace) -> int:
    from .jobworker import StandaloneWorker, embedded_url

    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    config = loaded.config
    configure_logging(config.log)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until a runtime or supervisor handles it
    args = build_parser().parse_args(argv)
    if not Path(args.config).exists():
        print(f"sidecar: config file not found: {args.config}", file=sys.stderr)
        return 1
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
