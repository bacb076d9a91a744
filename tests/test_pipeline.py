"""The policy order: one list, and every policy has its place in it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from support import make_config, write_config

from sidecar.app import POLICY_BUILDERS, Services, build_policies
from sidecar.config import Config, load_config
from sidecar.jobs.queue import JobService
from sidecar.pipeline import CANONICAL_ORDER, UPGRADE_POLICIES
from sidecar.policies.breaker import BreakerPolicy
from sidecar.policies.cache import CachePolicy
from sidecar.policies.compress import CompressPolicy, EncodePolicy
from sidecar.policies.dedup import DedupPolicy
from sidecar.policies.etag import EtagPolicy
from sidecar.policies.idempotency import IdempotencyPolicy
from sidecar.policies.ratelimit import RateLimitPolicy
from sidecar.policies.retry import RetryPolicy
from sidecar.stores.breakers import BreakerService
from sidecar.stores.dedup import DedupService
from sidecar.stores.tiered import CacheService


def test_every_policy_has_one_place_in_the_order() -> None:
    assert len(set(CANONICAL_ORDER)) == len(CANONICAL_ORDER)
    assert set(POLICY_BUILDERS) == set(CANONICAL_ORDER)
    assert set(CANONICAL_ORDER) >= UPGRADE_POLICIES


def _config(tmp_path: Path, **route: Any) -> Config:
    raw = make_config("http://127.0.0.1:9", "redis://127.0.0.1:1/0")
    raw["routes"] = [{"name": "r", "match": {"path": "/**"}, "upstream": "app", **route}]
    return load_config(write_config(tmp_path / "config.yaml", raw)).config


def test_policies_come_in_the_canonical_order_whatever_the_yaml_order(tmp_path: Path) -> None:
    # Written in the YAML in reverse, as an operator might.
    config = _config(tmp_path, retry={"attempts": 2}, breaker={"failures": 3}, dedup={},
                     cache={"ttl": "10s", "layers": ["memory"]}, idempotency={}, etag=True,
                     compress={}, rate_limit={"rate": "10/s", "burst": 5})
    services = Services(CacheService(), DedupService(), BreakerService(), JobService(),
                        Counter())
    kinds = [type(p) for p in build_policies(config.routes[0], config, services)]
    # Decoding for a client that takes no coding sits outside the cache, which stores the
    # compressed entry; compressing sits inside it, so that a hit is not compressed again.
    assert kinds == [RateLimitPolicy, CompressPolicy, EtagPolicy, IdempotencyPolicy, CachePolicy,
                     DedupPolicy, EncodePolicy, BreakerPolicy, RetryPolicy]
    upgrade = [type(p) for p in build_policies(config.routes[0], config, services,
                                               upgrade=True)]
    assert upgrade == [RateLimitPolicy, BreakerPolicy]
