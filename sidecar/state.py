"""`State`: what one loaded config compiles to. A reload builds a new one beside the old and
swaps one reference (app.Runtime.state), so requests in flight finish under the rules they
started with. Its own module so that what reads it (the edge, the admin API) need not import
the app that builds it."""

from __future__ import annotations

from dataclasses import dataclass

from .balancer import Upstream
from .config import Config, LoadedConfig
from .core.redact import Redactor
from .pipeline import Handler
from .routing import RouteTable


@dataclass(frozen=True, slots=True)
class State:
    """Everything one loaded config needs to serve, built once."""

    loaded: LoadedConfig
    config: Config
    routes: RouteTable
    pools: dict[str, Upstream]
    chains: dict[str, Handler]
    upgrade_chains: dict[str, Handler]  # for requests that ask to switch protocols
    via_response_bytes: bytes  # `1.1 <server.via>`, this hop in a response's Via
    via_request_id: bytes  # `Via: 1.1 <server.via>\r\nX-Request-ID: `, ahead of the id
    jobs_path: str
    redactor: Redactor  # log.redact: what the access log and spans do not show
