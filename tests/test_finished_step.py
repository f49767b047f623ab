"""A holder that died after recording its step applied and before recording its version:
the step finished, and every reader of the lock says so. The takeover, `status` and `unlock`
go on from the step's version; an operator's change meanwhile is never overwritten."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import migrate
from bootmigrate.commands import status
from bootmigrate.lock import LockBusy
from bootmigrate.waiting import Deadline
from tests.in_process import control, dead_holder_lock, ran, recorders
from tests.polling import wait_for
from tests.test_lock import lock_for

pytestmark = pytest.mark.anyio


async def died_after_recording(
    db: Any, *, version: int, step: int, direction: str = "up", to_version: int | None = None
) -> None:
    """The control document and history a holder leaves when killed between the history
    record of ``step`` and the write of its version."""
    await dead_holder_lock(db, version=version, running=None, acquisition="a1")
    running = {"version": step, "name": f"step_{step}", "direction": direction}
    reached = step if to_version is None else to_version
    unfinished = {**running, "from_version": version, "to_version": reached}
    await db.migrations.update_one(
        {"_id": "control"}, {"$set": {"running": running, "unfinished": unfinished}}
    )
    record = {**running, "outcome": "applied", "token": 7, "acquisition": "a1"}
    await db.migrations_history.insert_one(record)


async def test_the_taker_plans_and_announces_from_the_finished_steps_version(
    db: Any, bootmigrate_log: Any
) -> None:
    await died_after_recording(db, version=1, step=2)

    report = await migrate(db, recorders(1, 2, 3, 4))

    assert report.applied == [3, 4]
    assert await ran(db) == [(3, "up"), (4, "up")]
    assert bootmigrate_log.has("2 migration(s) to run, version 2 -> 4")


@pytest.mark.parametrize(
    "direction, version, step, to_version, pending",
    [("up", 1, 2, 2, [3, 4]), ("rerun", 3, 2, 3, [4]), ("down", 3, 3, 2, [3, 4])],
)
async def test_status_plans_from_the_finished_steps_version(
    db: Any, direction: str, version: int, step: int, to_version: int, pending: list[int]
) -> None:
    """Not stuck, and nothing pending that already ran: what the next boot will do."""
    await died_after_recording(
        db, version=version, step=step, direction=direction, to_version=to_version
    )

    found = await status(db, recorders(1, 2, 3, 4))

    assert (found.state, found.problem) == ("locked", None)
    assert (found.version, [s.migration.version for s in found.pending]) == (to_version, pending)
    assert f"takes it over at version {to_version}" in (found.lock.on_expiry or "")
    assert (await migrate(db, recorders(1, 2, 3, 4))).applied == pending


async def test_a_version_an_operator_set_meanwhile_is_not_overwritten(db: Any) -> None:
    """The taker read the lock and the history; then an operator, who had undone migration
    2's changes by hand, set the version back to 1. The takeover must not record 2."""
    await died_after_recording(db, version=1, step=2)
    taker, operator = lock_for(db, "taker", lease=1.0), lock_for(db, "operator", lease=1.0)
    seen = await taker.read()
    await wait_for(lambda: taker.presumed_dead(seen) is not None, 10, "the lease to pass")
    await operator.set_version(1, force=True)

    known = {m.version: m for m in recorders(1, 2, 3)}
    try:
        held = await taker.take_over(seen, known, Deadline.after(10))
    except LockBusy:
        held = None

    assert held is None
    doc = await control(db)
    assert doc is not None and (doc["version"], doc["token"]) == (1, 7)
