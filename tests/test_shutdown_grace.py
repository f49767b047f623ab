"""Asked to stop inside a migration: ``shutdown_grace`` lets it finish, then cancels it.

The stop is a cancellation of the ``migrate()`` call, both kinds a server sends: asyncio's own
``Task.cancel()`` (uvicorn, aiohttp) and an anyio cancel scope. The real-signal versions of
these, in server processes, are in the shutdown and SIGTERM tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from pymongo.errors import OperationFailure

from bootmigrate import ControlLocked, Migration, migrate
from tests.in_process import control, history, ran, recorder
from tests.polling import wait_for

pytestmark = pytest.mark.anyio


def gated(version: int, gate: anyio.Event, started: anyio.Event, **options: Any) -> Migration:
    """A migration that says it started, then waits for ``gate`` before doing its write."""

    async def up(db: Any) -> None:
        started.set()
        await gate.wait()
        await db.ran.insert_one({"version": version, "direction": "up"})

    return Migration(version=version, up=up, name=f"gated_{version}", **options)


async def cancelled_once_started(call: Any, started: anyio.Event) -> None:
    """Run the ``migrate()`` coroutine ``call`` as a task; once ``started`` is set, cancel it
    as a server does (``Task.cancel()``) and await its end."""
    task = asyncio.ensure_future(call)
    with anyio.fail_after(10):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


async def test_a_migration_asked_to_stop_may_finish_within_the_grace_and_counts_as_applied(
    db: Any, bootmigrate_log: Any
) -> None:
    gate, started = anyio.Event(), anyio.Event()
    migrations = [recorder(1), gated(2, gate, started), recorder(3)]
    # asyncio's own cancellation, as a server cancelling its startup task sends it.
    call = asyncio.ensure_future(migrate(db, migrations, shutdown_grace=30))
    with anyio.fail_after(10):
        await started.wait()
    call.cancel()
    await bootmigrate_log.wait_for("asked to stop while a migration runs")
    assert not call.done()  # the migration is inside its grace, and the call waits for it
    gate.set()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 10)

    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 2)  # released once 2 was recorded
    assert "failure" not in doc and "running" not in doc
    assert await ran(db) == [(1, "up"), (2, "up")]  # 3 never started: the stop came first
    assert [r["outcome"] for r in await history(db)] == ["applied", "applied"]


async def test_the_heartbeat_goes_on_while_a_migration_uses_its_grace(db: Any) -> None:
    gate, started = anyio.Event(), anyio.Event()
    lease = 0.6
    call = asyncio.ensure_future(
        migrate(db, [gated(1, gate, started)], lease=lease, shutdown_grace=60)
    )
    with anyio.fail_after(10):
        await started.wait()
    call.cancel()
    beats = (await control(db) or {}).get("beats", 0)

    # Several leases' worth of beats after the stop: no other replica may presume it dead.
    async def beaten() -> bool:
        return (await control(db) or {}).get("beats", 0) >= beats + 4

    await wait_for(beaten, within=10 * lease, what="heartbeats during the shutdown grace")
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 10)
    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 1)


async def test_a_migration_past_its_grace_is_cancelled_and_left_interrupted(db: Any) -> None:
    gate, started = anyio.Event(), anyio.Event()  # the gate never opens
    migrations = [recorder(1), gated(2, gate, started)]
    with anyio.fail_after(10), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: migrate(db, migrations, shutdown_grace=0.3))
            await started.wait()
            scope.cancel()
    assert scope.cancelled_caught

    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (True, 1)
    assert doc["failure"]["kind"] == "interrupted"
    assert "shutdown_grace (0.3 s)" in doc["failure"]["error"]
    assert [r["outcome"] for r in await history(db)] == ["applied", "interrupted"]
    # The next boot says so at once, rather than waiting out a lease.
    with anyio.fail_after(5), pytest.raises(ControlLocked) as raised:
        await migrate(db, [recorder(1), recorder(2)], wait_timeout=60)
    assert raised.value.reason == "stuck"
    assert "interrupted" in str(raised.value)


async def test_an_idempotent_migration_past_its_grace_is_released_for_a_rerun(db: Any) -> None:
    gate, started = anyio.Event(), anyio.Event()
    migrations = [recorder(1), gated(2, gate, started, idempotent=True)]
    await cancelled_once_started(migrate(db, migrations, shutdown_grace=0.3), started)

    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 1)
    assert "failure" not in doc
    report = await migrate(db, [recorder(1), recorder(2)])
    assert report.applied == [2]


async def test_a_transaction_past_its_grace_is_aborted_and_released_for_a_rerun(db: Any) -> None:
    started = anyio.Event()

    async def up(db: Any, ctx: Any) -> None:
        await db.moved.insert_one({"moved": True}, session=ctx.session)
        started.set()
        await anyio.sleep_forever()

    migration = Migration(version=1, up=up, name="move", transactional=True)
    await cancelled_once_started(migrate(db, [migration], shutdown_grace=0.3), started)

    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 0)
    assert await db.moved.count_documents({}) == 0  # its writes were never committed


async def test_the_grace_also_ends_a_transaction_run_again_after_the_stop(db: Any) -> None:
    tries = 0
    scope = anyio.CancelScope()

    async def up(db: Any, ctx: Any) -> None:
        nonlocal tries
        tries += 1
        if tries == 1:
            scope.cancel()  # asked to stop; then this try meets a transient error
            raise OperationFailure(
                "WriteConflict", code=112, details={"errorLabels": ["TransientTransactionError"]}
            )
        await db.moved.insert_one({"moved": True}, session=ctx.session)
        await anyio.sleep_forever()  # the next try would never end by itself

    migration = Migration(version=1, up=up, name="move", transactional=True)
    with anyio.fail_after(20), scope:
        await migrate(db, [migration], shutdown_grace=0.3)

    assert scope.cancelled_caught and tries == 2
    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 0)  # released for a re-run
    assert await db.moved.count_documents({}) == 0
