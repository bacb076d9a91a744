"""The SLA file (`loadtests/slas.yaml`): what to send, and the limits a release must meet."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..config import load_document
from ..core.units import parse_duration, parse_percent

Duration = Annotated[float, BeforeValidator(parse_duration)]
Percent = Annotated[float, BeforeValidator(parse_percent)]

_METHOD = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# The latency limits an SLA may set, with the quantile each reads (1.0: the slowest request).
LATENCY_LIMITS = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "max": 1.0}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RequestSpec(_Model):
    """One request, as a task sends it again and again."""

    method: str = "GET"
    path: str
    headers: dict[str, str] = {}
    json_body: Any = Field(None, alias="json")
    body: str | None = None
    expect: list[int] | None = None  # statuses that count as success; default: any below 400

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if not _METHOD.match(value):
            raise ValueError(f"expected an HTTP method like GET or POST, got {value!r}")
        return value.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"expected a path starting with '/', got {value!r} "
                             "(the host comes from 'target')")
        return value

    @model_validator(mode="after")
    def _one_body(self) -> RequestSpec:
        if self.json_body is not None and self.body is not None:
            raise ValueError("give either 'json' or 'body', not both")
        return self

    def succeeded(self, status: int) -> bool:
        return status in self.expect if self.expect is not None else 0 < status < 400


class Limits(_Model):
    """Limits on what was measured; a limit left out is not checked."""

    p50: Duration | None = None
    p90: Duration | None = None
    p95: Duration | None = None
    p99: Duration | None = None
    max: Duration | None = None
    error_rate: Percent = 0.01
    min_rps: float | None = Field(None, gt=0)


class Sla(Limits):
    name: str = Field(min_length=1)
    request: RequestSpec
    weight: int = Field(1, ge=1)            # share of the users, against the other SLAs
    users: int | None = Field(None, ge=1)   # or exactly this many users
    wait: Duration = 0.0                    # each user's pause between two iterations
    # An offloaded route: post, poll the job until it is over, fetch its result; the latency
    # limits then apply to the whole job.
    job_completes_within: Duration | None = None
    poll: Duration = 0.2

    @property
    def offloaded(self) -> bool:
        return self.job_completes_within is not None


class SlaFile(_Model):
    target: str = "http://127.0.0.1:8080"
    users: int = Field(10, ge=1)
    duration: Duration = 60.0
    spawn_rate: float | None = Field(None, gt=0)  # users started per second; default: all at once
    slas: list[Sla] = []
    replay: Limits = Limits()  # checked against all the requests of `loadtest --replay`

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError(f"expected a base URL like 'http://127.0.0.1:8080', got {value!r}")
        return value.rstrip("/")

    @field_validator("slas")
    @classmethod
    def _unique(cls, value: list[Sla]) -> list[Sla]:
        seen: set[str] = set()
        for sla in value:
            if sla.name in seen:
                raise ValueError(f"two SLAs are named {sla.name!r}: names must be unique, "
                                 "they name the rows of the report")
            seen.add(sla.name)
        return value


    @property
    def stop_timeout(self) -> float:
        """How long users get, when the time is up, to finish what they are doing: a job in
        flight is measured to its end (or its limit) rather than dropped."""
        jobs = [s.job_completes_within + 2 * s.poll for s in self.slas
                if s.job_completes_within is not None]
        return max([5.0, *(j + 5.0 for j in jobs)])


def load_slas(path: str | Path) -> SlaFile:
    """Raise `ConfigError` listing every problem, located (`slas[1] (reports).p95: ...`)."""
    return load_document(path, SlaFile, named_list="slas")
