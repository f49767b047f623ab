"""Migrations built in code for tests that call ``migrate()`` in their own process, and
readers of what those runs leave in the database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from bootmigrate import Migration
from bootmigrate.drivers import server_time


def recorder(
    version: int,
    *,
    idempotent: bool = False,
    down: bool = True,
    before: Callable[[], Awaitable[None]] | None = None,
) -> Migration:
    """A migration that appends its version to ``db.ran`` (and removes it on down)."""

    async def up(db: Any) -> None:
        if before is not None:
            await before()
        await db.ran.insert_one({"version": version, "direction": "up"})

    async def undo(db: Any) -> None:
        await db.ran.insert_one({"version": version, "direction": "down"})

    return Migration(
        version=version,
        up=up,
        down=undo if down else None,
        name=f"step_{version}",
        idempotent=idempotent,
    )


def failing(version: int, error: str = "disk full") -> Migration:
    """A migration whose ``up`` raises ``RuntimeError(error)``."""

    async def up(db: Any) -> None:
        raise RuntimeError(error)

    return Migration(version=version, up=up, name=f"broken_{version}")


def announce(event: Any) -> Callable[[], Awaitable[None]]:
    """A ``before`` hook that sets ``event``: the migration started, so the lock is held."""

    async def hook() -> None:
        event.set()

    return hook


def recorders(*versions: int, **options: Any) -> list[Migration]:
    """One :func:`recorder` per version, all with the same ``options``."""
    return [recorder(v, **options) for v in versions]


async def ran(db: Any) -> list[tuple[int, str]]:
    """What the recorders ran, in order: (version, direction) pairs."""
    docs = await db.ran.find({}, sort=[("_id", 1)]).to_list(None)
    return [(d["version"], d["direction"]) for d in docs]


async def control(db: Any) -> dict[str, Any] | None:
    """The control document as stored, or ``None`` before there is one."""
    doc: dict[str, Any] | None = await db.migrations.find_one({"_id": "control"})
    return doc


async def history(db: Any) -> list[dict[str, Any]]:
    """The history records, oldest first."""
    docs: list[dict[str, Any]] = await db.migrations_history.find({}, sort=[("_id", 1)]).to_list(
        None
    )
    return docs


async def dead_holder_lock(
    db: Any,
    *,
    version: int,
    running: int | None,
    silent_for: float = 3600.0,
    lease: float = 1.0,
    token: int = 7,
    acquisition: str | None = None,
) -> None:
    """Write the control document a holder killed ``silent_for`` seconds ago leaves behind
    (with an ``acquisition`` id and the step it names as unfinished, if ``acquisition``).
    Its lease is short by default: a waiter (or ``unlock``) must watch the lock that long
    before judging its holder dead."""
    beat = await server_time(db) - timedelta(seconds=silent_for)
    doc: dict[str, Any] = {
        "_id": "control",
        "locked": True,
        "version": version,
        "token": token,
        "beats": 3,
        "heartbeat": beat,
        "locked_at": beat,
        "owner": {"host": "deadhost", "pid": 4242, "build": "old", "lease": lease, "id": "x"},
    }
    if running is not None:
        doc["running"] = {"version": running, "name": f"step_{running}", "direction": "up"}
    if acquisition is not None:  # as this build's holders leave it
        doc["acquisition"] = acquisition
        if running is not None:
            doc["unfinished"] = {**doc["running"], "from_version": version, "to_version": running}
    await db.migrations.replace_one({"_id": "control"}, doc, upsert=True)
