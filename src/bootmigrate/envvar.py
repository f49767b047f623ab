"""``MIGRATION_VERSION``, read as Rocket.Chat reads it: ``latest``, ``N``, ``N,rerun``,
``N,exit``."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidTarget
from .plan import Target

ENV_VAR = "MIGRATION_VERSION"


@dataclass(frozen=True)
class VersionRequest:
    """What the operator asked for through the environment."""

    target: Target = "latest"
    rerun: int | None = None
    exit: bool = False


def parse_version_request(raw: str | None) -> VersionRequest | None:
    """``None`` when unset or empty; :class:`InvalidTarget` for anything unrecognised."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text == "latest":
        return VersionRequest()
    number, _, action = (part.strip() for part in text.partition(","))
    if not number.isdigit() or action not in ("", "rerun", "exit"):
        raise InvalidTarget(
            f"{ENV_VAR}={raw!r} is not understood; use latest, N, N,rerun or N,exit "
            "(N a migration version)"
        )
    version = int(number)
    if action == "rerun":
        return VersionRequest(rerun=version)
    return VersionRequest(target=version, exit=action == "exit")
