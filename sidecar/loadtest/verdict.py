"""Measured figures against an SLA's limits: one PASS/FAIL row per limit, and the table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .sla import LATENCY_LIMITS, Limits


@dataclass(frozen=True)
class Measured:
    """What locust saw for one SLA (for an offloaded one: whole jobs, not single requests)."""

    requests: int
    failures: int
    rps: float
    quantiles_ms: Mapping[str, float]  # the keys of LATENCY_LIMITS


@dataclass(frozen=True)
class Check:
    sla: str
    what: str
    measured: str
    limit: str
    passed: bool

    @property
    def result(self) -> str:
        return "PASS" if self.passed else "FAIL"


def format_ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{round(ms / 1000, 2):g} s"


def format_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate == int(rate) or rate >= 100 else f"{rate:,.1f}"


def evaluate(name: str, limits: Limits, measured: Measured, *,
             job_completes_within: float | None = None) -> list[Check]:
    """Every limit set becomes a row; with nothing measured, every row fails (no silent pass)."""
    unit = "jobs" if job_completes_within is not None else "requests"
    rows: list[Check] = []
    if measured.requests == 0:
        return [Check(name, what, f"no {unit} done", limit, False)
                for what, limit in _limits(limits, job_completes_within, unit)]
    for key, quantile in LATENCY_LIMITS.items():
        limit_s = getattr(limits, key)
        if limit_s is not None:
            value = measured.quantiles_ms[key]
            what = "max" if quantile == 1.0 else key
            rows.append(Check(name, what, format_ms(value), format_ms(limit_s * 1000),
                              value <= limit_s * 1000))
    ratio = measured.failures / measured.requests
    rows.append(Check(name, "error rate",
                      f"{ratio:.2%} ({measured.failures}/{measured.requests})",
                      f"{limits.error_rate:.2%}", ratio <= limits.error_rate))
    if limits.min_rps is not None:
        rows.append(Check(name, f"{unit}/s", format_rate(measured.rps),
                          f">= {format_rate(limits.min_rps)}", measured.rps >= limits.min_rps))
    if job_completes_within is not None:
        slowest = measured.quantiles_ms["max"]
        text = f"slowest {format_ms(slowest)}"
        if measured.failures:
            text += f"; {measured.failures} of {measured.requests} not done"
        rows.append(Check(name, "job completes within", text,
                          format_ms(job_completes_within * 1000),
                          measured.failures == 0 and slowest <= job_completes_within * 1000))
    return rows


def _limits(limits: Limits, job_completes_within: float | None,
            unit: str) -> Iterable[tuple[str, str]]:
    for key in LATENCY_LIMITS:
        if getattr(limits, key) is not None:
            yield key, format_ms(getattr(limits, key) * 1000)
    yield "error rate", f"{limits.error_rate:.2%}"
    if limits.min_rps is not None:
        yield f"{unit}/s", f">= {format_rate(limits.min_rps)}"
    if job_completes_within is not None:
        yield "job completes within", format_ms(job_completes_within * 1000)


def table(checks: list[Check]) -> str:
    """A plain-text table that reads in a terminal and in a CI log."""
    header = ("SLA", "check", "measured", "limit", "result")
    rows = [header] + [(c.sla, c.what, c.measured, c.limit, c.result) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not c.passed for c in checks)
    lines.append("")
    lines.append(f"{failed} of {len(checks)} checks FAILED" if failed
                 else f"all {len(checks)} checks passed")
    return "\n".join(lines)


def markdown(checks: list[Check]) -> str:
    lines = ["| SLA | check | measured | limit | result |", "|---|---|---|---|---|"]
    lines += [f"| {c.sla} | {c.what} | {c.measured} | {c.limit} | **{c.result}** |"
              for c in checks]
    return "\n".join(lines) + "\n"


def to_json(checks: list[Check]) -> dict[str, Any]:
    return {"passed": all(c.passed for c in checks), "checks": [asdict(c) for c in checks]}


def from_json(data: Mapping[str, Any]) -> list[Check]:
    return [Check(**row) for row in data["checks"]]
