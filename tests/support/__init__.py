"""Helpers the tests share (the fixtures that start them live in tests/conftest.py): import
them from here, `from support import make_config, until`, not from conftest."""

from .ports import free_port, wait_for_port
from .redis import RedisServer
from .sidecars import ROOT, InProcessSidecar, SidecarProcess, make_config, write_config
from .upstreams import Backend, Origin
from .waiting import gather_limited, until

__all__ = [
    "ROOT",
    "Backend",
    "InProcessSidecar",
    "Origin",
    "RedisServer",
    "SidecarProcess",
    "free_port",
    "gather_limited",
    "make_config",
    "until",
    "wait_for_port",
    "write_config",
]
