"""A stop (cancellation) that lands while a lock write is on the wire: the write is held at the
wire until the stop is in, and the lock must be left free, naming no step that never ran, with
nothing for the next boot to wait out or refuse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from bootmigrate import migrate
from tests.clients import open_client
from tests.fail_points import fail_point, with_app_name
from tests.in_process import control, ran, recorder, recorders
from tests.polling import wait_for
from tests.wire_proxy import WireProxy

pytestmark = pytest.mark.anyio


@pytest.fixture
async def holder_db(driver: str, fault_uri: str, db: Any) -> AsyncIterator[Any]:
    """``db`` through the fault instrument, appName "holder"."""
    async with open_client(
        driver, with_app_name(fault_uri, "holder"), serverSelectionTimeoutMS=5000
    ) as client:
        yield client[db.name]


async def stopped_while_blocked(call: Any, point: fail_point, how: str) -> None:
    """Run ``call()``; once ``point`` holds one of its writes, stop it (an anyio cancel scope,
    or asyncio's ``Task.cancel()`` as a server sends); return once the call has ended."""
    with anyio.fail_after(30):
        if how == "scope":
            async with anyio.create_task_group() as tasks:
                with anyio.CancelScope() as scope:
                    tasks.start_soon(call)
                    await point.wait_entered()
                    scope.cancel()
                tasks.cancel_scope.cancel()
            return
        task = asyncio.ensure_future(call())
        await point.wait_entered()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def held_at_the_wire(holder_db: Any, command: str, ms: int) -> fail_point:
    """The holder's next ``command`` held ``ms`` at the wire."""
    return fail_point(
        holder_db,
        {"times": 1},
        failCommands=[command],
        blockConnection=True,
        blockTimeMS=ms,
        appName="holder",
    )


@pytest.mark.parametrize("how", ["scope", "task"])
@pytest.mark.parametrize(
    "held",
    [
        # the acquire itself, in flight
        ("findAndModify", 500),
        # the waiting part winding down (its change stream closing), the lock taken and not
        # yet owned by the apply loop; within the time a close may take
        ("killCursors", 300),
    ],
    ids=["acquiring", "leaving_the_wait"],
)
async def test_a_stop_while_the_lock_is_taken_after_waiting_leaves_it_free(
    holder_db: Any, db: Any, bootmigrate_log: Any, how: str, held: tuple[str, int]
) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": True, "version": 0})
    async with held_at_the_wire(holder_db, *held) as point:

        async def boot() -> None:
            await migrate(holder_db, [recorder(1)], wait_timeout=60)

        async def unlock_once_waiting() -> None:
            await bootmigrate_log.wait_for("waiting for")
            await db.migrations.update_one({"_id": "control"}, {"$set": {"locked": False}})

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(unlock_once_waiting)
            await stopped_while_blocked(boot, point, how)

    doc = await control(db)
    assert doc is not None
    assert doc["token"] == 1  # it was taken
    assert doc["locked"] is False, doc
    # A driver that closes its cursors in the background lets the migration start first:
    # then it ran, and counts.
    assert [v for v, _ in await ran(db)] == list(range(1, doc["version"] + 1))


@pytest.mark.parametrize(
    "command, how",
    [("findAndModify", "scope"), ("findAndModify", "task"), ("update", "scope")],
    ids=["acquiring-scope", "acquiring-task", "naming_the_step-scope"],
)
async def test_a_stop_before_a_down_ran_leaves_no_step_named(
    holder_db: Any, db: Any, command: str, how: str
) -> None:
    """Held: the acquire (a findAndModify), or the write naming the down step (the holder's
    first update)."""
    await migrate(db, recorders(1, 2))
    async with held_at_the_wire(holder_db, command, 500) as point:
        await stopped_while_blocked(
            lambda: migrate(holder_db, recorders(1, 2), target=1), point, how
        )

    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 2)
    assert "unfinished" not in doc, doc  # nothing to refuse a later up over
    assert await ran(db) == [(1, "up"), (2, "up")]  # the down never ran
    assert (await migrate(db, recorders(1, 2, 3))).applied == [3]


async def test_a_stopped_waiter_does_not_wait_for_its_change_stream_to_close(
    fault_proxy: WireProxy, holder_db: Any, db: Any, bootmigrate_log: Any
) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": True, "version": 0})
    scope, stopped = anyio.CancelScope(), anyio.Event()

    async def waiter() -> None:
        with scope:
            await migrate(holder_db, [recorder(1)], wait_timeout=300)
        stopped.set()

    # A partitioned server: the cursor's close does not return.
    closed_never = held_at_the_wire(holder_db, "killCursors", 20_000)
    async with closed_never, anyio.create_task_group() as tasks:
        tasks.start_soon(waiter)
        await bootmigrate_log.wait_for("waiting for")
        await wait_for(
            lambda: fault_proxy.command_counts("holder")["getMore"] >= 1,
            within=20,
            what="the waiter's change stream to be open",
        )
        scope.cancel()
        with anyio.fail_after(5):  # not the 20 s the close is held
            await stopped.wait()
    assert scope.cancelled_caught
