"""Faults at the wire, in failCommand's vocabulary: lost replies, writes that never return, a
heartbeat that cannot get through, a commit whose outcome is unknown, and a server whose clock
runs ahead. Each client under test connects through ``fault_uri`` with an appName, so a fail
point targets it alone; the test's own look at the database goes straight to the server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from bootmigrate import (
    ControlLocked,
    DatabaseUnavailable,
    LockLost,
    Migration,
    MigrationError,
    migrate,
)
from bootmigrate.control import Owner
from bootmigrate.history import Entry
from bootmigrate.lock import ControlLock, HeldLock
from bootmigrate.waiting import Deadline, WaitPolicy
from tests.clients import open_client
from tests.fail_points import fail_point, with_app_name
from tests.faults.conftest import record
from tests.in_process import control, dead_holder_lock, history, ran, recorder, recorders

pytestmark = pytest.mark.anyio

LOCK_WRITES = ["findAndModify", "update", "insert"]
CONTROL_WRITES = ["findAndModify", "update"]


@pytest.fixture
async def holder_db(driver: str, fault_uri: str, db: Any) -> AsyncIterator[Any]:
    """``db`` as seen by the process under test: through the fault instrument, appName
    "holder", and without the driver's own single retry of writes (so that a lost reply
    reaches bootmigrate, as it does when that one retry fails too)."""
    async with open_client(
        driver,
        with_app_name(fault_uri, "holder"),
        retryWrites=False,
        serverSelectionTimeoutMS=5000,
    ) as client:
        yield client[db.name]


async def acquired(db: Any, lease: float = 30.0) -> HeldLock:
    """The lock, taken by a process of its own on ``db``."""
    lock = ControlLock(
        db,
        collection="migrations",
        history="migrations_history",
        owner=Owner.this_process(None, lease),
        waiting=WaitPolicy(),
    )
    held = await lock.acquire(await lock.read(), Deadline.after(10))
    assert held is not None
    return held


async def test_a_release_whose_reply_was_lost_is_recognised_as_done(
    holder_db: Any, db: Any
) -> None:
    held = await acquired(holder_db)

    async with fail_point(
        holder_db, {"times": 1}, failCommands=["findAndModify"], dropReply=True, appName="holder"
    ):
        await held.release()  # sent again after the lost reply: finds it done, not lost

    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["token"]) == (False, held.token)


async def test_a_history_record_whose_reply_was_lost_is_written_once(
    holder_db: Any, db: Any
) -> None:
    held = await acquired(holder_db)

    async with fail_point(
        holder_db, {"times": 1}, failCommands=["insert"], dropReply=True, appName="holder"
    ):
        await held.record(Entry(version=1, name="one", outcome="applied", direction="up"))

    assert [(r["version"], r["outcome"]) for r in await history(db)] == [(1, "applied")]


async def test_a_takeover_past_a_finished_step_whose_reply_was_lost_leaves_the_lock_free(
    holder_db: Any, db: Any
) -> None:
    """The dead holder had recorded migration 2 applied, its last; the takeover that records
    version 2 lands, its reply is lost. On the next look nothing is left to do, and the lock
    is this process's own: it is released, not left held by nobody for a lease."""
    await dead_holder_lock(db, version=1, running=2, acquisition="a1")
    await db.migrations_history.insert_one(
        {"version": 2, "direction": "up", "outcome": "applied", "token": 7, "acquisition": "a1"}
    )

    async with fail_point(
        holder_db, {"times": 1}, failCommands=["findAndModify"], dropReply=True, appName="holder"
    ):
        report = await migrate(holder_db, recorders(1, 2), wait_timeout=30)

    assert report.applied == []
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"], doc["token"]) == (False, 2, 8)
    assert await ran(db) == []


async def test_a_boot_whose_lock_writes_never_return_gives_up_within_its_deadline(
    holder_db: Any, db: Any
) -> None:
    """A majority that cannot be reached (a PSA set with its secondary down, the minority side
    of a partition): the writes hang. ``migrate()`` still returns within ``wait_timeout`` plus
    one lease, with an error that says the database did not answer."""
    wait_timeout, lease = 2.0, 1.0
    async with fail_point(
        holder_db,
        "alwaysOn",
        failCommands=LOCK_WRITES,
        blockConnection=True,
        blockTimeMS=60_000,
        appName="holder",
    ):
        started = time.monotonic()
        with pytest.raises(MigrationError) as caught:
            await migrate(holder_db, recorders(1), wait_timeout=wait_timeout, lease=lease)
        took = time.monotonic() - started

    assert isinstance(caught.value, (DatabaseUnavailable, ControlLocked)), caught.value
    record("9 writes never return (waiter)", runs=1, faults=1, returned_ms_max=int(took * 1000))
    assert took < wait_timeout + lease + 1.0, f"returned after {took:.1f} s"
    assert await ran(db) == []


async def test_a_holder_whose_writes_stop_returning_stops_within_a_lease(
    holder_db: Any, db: Any
) -> None:
    """The lock is taken, the migration runs, then the server stops answering writes: the
    holder gives up one lease later instead of hanging in a shielded write."""
    lease = 1.0
    blocked: list[fail_point] = []
    blocked_at: list[float] = []

    async def then_block_writes() -> None:
        point = fail_point(
            holder_db,
            "alwaysOn",
            failCommands=CONTROL_WRITES,  # the migration's own inserts still go through
            blockConnection=True,
            blockTimeMS=60_000,
            appName="holder",
        )
        await point.__aenter__()
        blocked.append(point)
        blocked_at.append(time.monotonic())

    try:
        # Unavailable (a write found no server for a lease) or lost (nor did the heartbeat):
        # either way said within about a lease, not after the 60 s the server holds writes.
        with anyio.fail_after(30), pytest.raises((DatabaseUnavailable, LockLost)):
            await migrate(holder_db, [recorder(1, before=then_block_writes)], lease=lease)
        gave_up = time.monotonic()
    finally:
        for point in blocked:
            await point.__aexit__(None, None, None)

    after = gave_up - blocked_at[0]
    record("9 writes never return (holder)", runs=1, faults=1, gave_up_ms_max=int(after * 1000))
    assert after < 2 * lease + 1.0, f"gave up {after:.1f} s after the writes stopped returning"
    assert await ran(db) == [(1, "up")]
    # Its history record (an insert) went first and got through; the version write that
    # follows never did, and nothing came after it.
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [(1, "applied")]
    doc = await control(db)
    assert doc is not None and (doc["version"], doc["running"]["version"]) == (0, 1)


async def test_a_holder_whose_heartbeat_cannot_get_through_writes_nothing_more(
    holder_db: Any, db: Any
) -> None:
    """Its heartbeat fails for a whole lease: the holder must consider the lock lost, stop
    the migration and write nothing more: not the version, not a history record, not the next
    migration's marker."""
    lease = 0.6
    release = anyio.Event()

    async def heartbeats_fail_then_wait() -> None:
        await holder_db.client.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": "alwaysOn",
                "data": {"failCommands": ["update"], "errorCode": 91, "appName": "holder"},
            }
        )
        await release.wait()  # never set: the lost lock cancels this migration

    migrations = [recorder(1, before=heartbeats_fail_then_wait), recorder(2)]
    with anyio.fail_after(20), pytest.raises(LockLost):
        await migrate(holder_db, migrations, lease=lease)

    assert await ran(db) == []
    assert await history(db) == []
    doc = await control(db)
    assert doc is not None and doc["version"] == 0
    assert (doc.get("running") or {}).get("version") == 1  # no marker of migration 2


async def test_a_commit_whose_outcome_is_unknown_is_sent_again(holder_db: Any, db: Any) -> None:
    async def up(db: Any, ctx: Any) -> None:
        await db.accounts.insert_one({"moved": True}, session=ctx.session)

    migration = Migration(version=1, up=up, name="move", transactional=True)
    # Twice: the driver sends a commit again once by itself; the second loss is bootmigrate's.
    async with fail_point(
        holder_db,
        {"times": 2},
        failCommands=["commitTransaction"],
        closeConnection=True,
        appName="holder",
    ):
        report = await migrate(holder_db, [migration])

    assert report.applied == [1]
    assert await db.accounts.count_documents({}) == 1
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [(1, "applied")]


async def test_a_waiter_on_a_server_whose_clock_runs_ahead_never_takes_a_live_lock(
    driver: str, fault_uri: str, db: Any
) -> None:
    """The waiter's "now" comes from a node whose clock is an hour ahead of the one that
    stamps the holder's heartbeats (a mongos, a new primary). The holder is alive and beating:
    its lock must not be taken over."""
    lease = 1.0
    holder_running = anyio.Event()

    async def long_migration() -> None:
        holder_running.set()
        await anyio.sleep(4 * lease)  # the migration's own length: several leases

    reports: dict[str, Any] = {}
    async with open_client(
        driver, with_app_name(fault_uri, "waiter"), serverSelectionTimeoutMS=5000
    ) as waiter_client:
        waiter_db = waiter_client[db.name]
        async with fail_point(
            waiter_client, "alwaysOn", name="skewLocalTime", seconds=3600, appName="waiter"
        ):
            hello = await waiter_client.admin.command("hello")
            assert hello["localTime"].year >= 2000  # the skewed clock is what the waiter sees

            async def boot(name: str, target: Any) -> None:
                reports[name] = await migrate(
                    target,
                    [recorder(1, before=long_migration)],
                    lease=lease,
                    max_poll_interval=0.1,
                )

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(boot, "holder", db)
                    await holder_running.wait()
                    tasks.start_soon(boot, "waiter", waiter_db)

    assert reports["holder"].holder and not reports["waiter"].holder
    assert await ran(db) == [(1, "up")]


async def test_a_failed_transaction_whose_abort_never_returns_is_still_recorded(
    holder_db: Any, db: Any
) -> None:
    """The abort after a failed transactional migration hangs (the server is cut off): it is
    bounded like every other write of the holder, so the failure is recorded and reported
    within about a lease, not after the abort's own hang."""
    lease = 1.0

    async def up(db: Any, ctx: Any) -> None:
        await db.accounts.insert_one({"x": 1}, session=ctx.session)
        # From here on the server holds every abort (set here, so that only this one is hit).
        await holder_db.client.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": "alwaysOn",
                "data": {
                    "failCommands": ["abortTransaction"],
                    "blockConnection": True,
                    "blockTimeMS": 30_000,
                    "appName": "holder",
                },
            }
        )
        raise RuntimeError("half way through")

    migration = Migration(version=1, up=up, name="move", transactional=True)
    started = time.monotonic()
    with anyio.fail_after(60), pytest.raises(MigrationError) as caught:
        await migrate(holder_db, [migration], lease=lease, wait_timeout=2.0)
    took = time.monotonic() - started

    assert "half way through" in str(caught.value)
    assert took < 3 * lease, f"took {took:.1f} s"
    doc = await control(db)
    assert doc is not None and doc["failure"]["kind"] == "failed"


async def test_a_commit_whose_every_reply_is_lost_is_found_applied(holder_db: Any, db: Any) -> None:
    """Every commit reaches the server and commits, and no reply comes back: after its
    budget the holder reads its own fenced version write, finds the step applied, and goes on
    rather than sticking a migration that committed as failed."""

    async def up(db: Any, ctx: Any) -> None:
        await db.accounts.insert_one({"moved": True}, session=ctx.session)

    migration = Migration(version=1, up=up, name="move", transactional=True)
    async with fail_point(
        holder_db, "alwaysOn", failCommands=["commitTransaction"], dropReply=True, appName="holder"
    ):
        with anyio.fail_after(30):
            report = await migrate(holder_db, [migration, recorder(2)], lease=2.0)

    assert report.applied == [1, 2]
    assert await db.accounts.count_documents({}) == 1
    outcomes = [(r["version"], r["outcome"]) for r in await history(db)]
    assert sorted(outcomes) == [(1, "applied"), (2, "applied")]
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 2)


async def test_a_release_answered_late_is_not_taken_for_a_lost_lock(
    holder_db: Any, db: Any
) -> None:
    """The release is applied at once, its reply comes back two beats later (within the
    lease): a beat sent meanwhile finds the lock free. That is the release's own doing, not a
    lost lock."""
    lease = 0.9  # a beat every 0.3 s
    # Armed by the migration: the write after its advance (findAndModify) is the release.
    slow_release = fail_point(
        holder_db,
        {"skip": 1},
        failCommands=["findAndModify"],
        delayReplyMS=600,
        appName="holder",
    )

    async def up(db: Any) -> None:
        await slow_release.__aenter__()

    report = await migrate(holder_db, [Migration(version=1, up=up, name="one")], lease=lease)

    assert (report.applied, report.holder) == ([1], True)
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 1)
