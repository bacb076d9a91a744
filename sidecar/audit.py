"""The audit log: one structured line for each admin action, whatever its outcome.

An action is anything that changes the sidecar's state from outside its traffic: a cache purge,
a breaker reset, a job or bulk retry and cancel, a queue paused, resumed or drained, a schedule
run by hand, a config reload (by signal, file change or the admin API). Each line says when,
what, on what, how it ended, from which address and with which named token (never the token),
on logger `sidecar.audit`: on stderr with the other logs, or in `log.audit_file` on its own.
A refused attempt (no token, a `read` token acting) is an action too, with its outcome.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("sidecar.audit")

OK, REFUSED, FAILED = "ok", "refused", "failed"


def record(action: str, target: str | None, outcome: str, *, token: str | None,
           client: str | None, worker: int, **details: Any) -> None:
    """Write one audit line. `details`: what the action reports (counts, a reason, a status)."""
    log.info("admin action", extra={"audit": True, "action": action, "target": target,
                                    "outcome": outcome, "client": client, "token": token,
                                    "worker": worker, **details})
