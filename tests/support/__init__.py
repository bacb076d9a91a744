"""Helpers the tests share (the fixtures that start them live in tests/conftest.py): import
them from here, `from support import make_config, until`, not from conftest."""

from .ports import free_port, wait_for_port
from .redis import RedisServer
from .sidecars import ROOT, InProcessSidecar, SidecarProcess, make_config, write_config
from .upstreams import Backend, Conn, Origin, Script, ScriptedUpstream
from .waiting import gather_limited, until
from .wire import Responses, read_responses, read_until_closed

__all__ = [
    "ROOT",
    "Backend",
    "Conn",
    "InProcessSidecar",
    "Origin",
    "RedisServer",
    "Responses",
    "Script",
    "ScriptedUpstream",
    "SidecarProcess",
    "free_port",
    "gather_limited",
    "make_config",
    "read_responses",
    "read_until_closed",
    "until",
    "wait_for_port",
    "write_config",
]
