"""What a ``migrate()`` call tells its caller (its log lines are ``events.py``'s)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MigrationReport:
    """What one ``migrate()`` call found and did.

    ``from_version``: the version at this call's first read; ``to_version``: at its end.
    ``applied``/``reverted``: versions this call ran up/down. ``waited``: seconds spent
    waiting for another process's lock. ``holder``: whether this call took the lock.
    ``ahead``: the database is newer than this build. ``exit_requested``:
    ``MIGRATION_VERSION=N,exit`` asked the service to exit once migrated.
    """

    from_version: int
    to_version: int
    applied: list[int] = field(default_factory=list)
    reverted: list[int] = field(default_factory=list)
    waited: float = 0.0
    holder: bool = False
    ahead: bool = False
    exit_requested: bool = False


def log_fields(event: str, **fields: Any) -> dict[str, Any]:
    """Structured attributes for a log record made outside a ``migrate()`` call (the
    integrations' own): ``event`` names it for log shippers, as an event's record does."""
    return {"event": event, **fields}
