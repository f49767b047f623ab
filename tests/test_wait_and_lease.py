"""Semantics 3, 4 and 5 in one process: waiting, the lease, takeover, and fencing."""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest

from bootmigrate import ControlLocked, LockLost, Migration, migrate
from tests.clients import open_client
from tests.in_process import control, dead_holder_lock, history, ran, recorder, recorders

pytestmark = pytest.mark.anyio


@pytest.fixture
async def other_db(driver: str, mongo_uri: str, db_name: str) -> Any:
    """The same database through a second client, as another replica would see it."""
    async with open_client(driver, mongo_uri) as client:
        yield client[db_name]


async def test_waiter_returns_when_the_holder_finishes_without_taking_the_lock(
    db: Any, other_db: Any, bootmigrate_log: Any
) -> None:
    release, inside_2 = anyio.Event(), anyio.Event()

    async def slow(db: Any) -> None:
        inside_2.set()
        await release.wait()
        await db.ran.insert_one({"version": 2, "direction": "up"})

    migrations = [recorder(1), Migration(version=2, up=slow, name="slow")]
    reports: dict[str, Any] = {}

    async def run(name: str, target_db: Any) -> None:
        reports[name] = await migrate(target_db, migrations, wait_timeout=30)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run, "holder", db)
        await inside_2.wait()
        tasks.start_soon(run, "waiter", other_db)
        await bootmigrate_log.wait_for("waiting for")
        release.set()

    holder, waiter = reports["holder"], reports["waiter"]
    assert (holder.holder, holder.applied) == (True, [1, 2])
    assert (waiter.holder, waiter.applied, waiter.to_version) == (False, [], 2)
    assert waiter.waited > 0
    assert await ran(db) == [(1, "up"), (2, "up")]
    waiting = [r for r in bootmigrate_log.records if getattr(r, "event", None) == "waiting"]
    assert len(waiting) == 1  # one line when waiting starts, not one per poll
    assert waiting[0].holder["pid"] == os.getpid()
    assert (waiting[0].db_version, waiting[0].running["version"]) == (1, 2)


async def test_wait_timeout_names_the_holder(db: Any, other_db: Any) -> None:
    release, locked = anyio.Event(), anyio.Event()

    async def blocked(db: Any) -> None:
        locked.set()
        await release.wait()

    migrations = [Migration(version=1, up=blocked, name="blocked")]
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: migrate(db, migrations, build="b-holder"))
        await locked.wait()
        with pytest.raises(ControlLocked) as caught:
            await migrate(other_db, migrations, wait_timeout=0.5)
        release.set()

    message = str(caught.value)
    assert "gave up after 0.5 s" in message
    assert "build b-holder" in message and "running migration 1" in message


async def test_a_live_holder_is_never_taken_over_however_long_it_runs(
    db: Any, other_db: Any
) -> None:
    """The migration runs for four leases; the heartbeat keeps the lock alive throughout.
    (A lease of a second leaves a loaded machine room to schedule the heartbeat.)"""
    lease = 1.0
    beats: list[int] = []
    locked = anyio.Event()

    async def long(db: Any) -> None:
        locked.set()
        for _ in range(20):
            await anyio.sleep(0.2)
            beats.append((await control(db) or {}).get("beats", 0))
        await db.ran.insert_one({"version": 1, "direction": "up"})

    migrations = [Migration(version=1, up=long, name="long", idempotent=True)]
    reports: dict[str, Any] = {}

    async def run(name: str, target_db: Any) -> None:
        reports[name] = await migrate(
            target_db, migrations, lease=lease, wait_timeout=30, max_poll_interval=0.05
        )

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run, "holder", db)
        await locked.wait()
        tasks.start_soon(run, "waiter", other_db)

    assert reports["holder"].holder and not reports["waiter"].holder
    assert await ran(db) == [(1, "up")]
    assert beats[-1] >= 6, beats  # heartbeats (every lease/3) kept coming all along


async def test_dead_holder_between_migrations_is_taken_over_and_the_job_finished(
    db: Any, bootmigrate_log: Any
) -> None:
    await dead_holder_lock(db, version=1, running=None)

    report = await migrate(db, recorders(1, 2, 3))

    assert (report.holder, report.applied) == (True, [2, 3])
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"], doc["token"]) == (False, 3, 8)
    assert bootmigrate_log.has("took over the migration lock from deadhost (pid 4242")


async def test_dead_holder_inside_an_idempotent_migration_has_it_rerun(db: Any) -> None:
    await dead_holder_lock(db, version=1, running=2)

    report = await migrate(db, [recorder(1), recorder(2, idempotent=True), recorder(3)])

    assert report.applied == [2, 3]


async def test_dead_holder_inside_a_plain_migration_leaves_it_stuck_as_interrupted(
    db: Any,
) -> None:
    await dead_holder_lock(db, version=1, running=2)

    with pytest.raises(ControlLocked) as caught:
        await migrate(db, recorders(1, 2, 3))

    assert "migration 2 step_2 was interrupted on deadhost (pid 4242)" in str(caught.value)
    assert "bootmigrate unlock" in str(caught.value)
    doc = await control(db)
    assert doc is not None and doc["locked"] is True and doc["version"] == 1
    assert (doc["failure"]["kind"], doc["failure"]["version"]) == ("interrupted", 2)
    assert await ran(db) == []
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [(2, "interrupted")]


def applied_record(version: int, *, token: int, acquisition: str) -> dict[str, Any]:
    """The history record a holder writes once a step is done, before the step's version."""
    return {
        "version": version,
        "name": f"step_{version}",
        "direction": "up",
        "outcome": "applied",
        "token": token,
        "acquisition": acquisition,
    }


async def test_dead_holder_that_recorded_its_migration_applied_is_taken_over_past_it(
    db: Any, bootmigrate_log: Any
) -> None:
    """Killed after the history record of migration 2 and before its version write: the
    record says 2 finished, so the taker records version 2 and goes on with 3, where a lock
    naming 2 would otherwise be stuck as interrupted (2 is not safe to repeat)."""
    await dead_holder_lock(db, version=1, running=2, acquisition="a1")
    await db.migrations_history.insert_one(applied_record(2, token=7, acquisition="a1"))

    report = await migrate(db, recorders(1, 2, 3))

    assert (report.holder, report.applied) == (True, [3])
    assert await ran(db) == [(3, "up")]
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"], doc["token"]) == (False, 3, 8)
    assert "unfinished" not in doc and "running" not in doc
    assert bootmigrate_log.has("migration 2 had finished (its history record says applied)")


@pytest.mark.parametrize(
    "record",
    [
        applied_record(2, token=6, acquisition="a1"),  # an earlier acquisition's
        applied_record(2, token=7, acquisition="a0"),  # a token reused after a failover
        {**applied_record(2, token=7, acquisition="a1"), "outcome": "failed"},
        {**applied_record(2, token=7, acquisition="a1"), "direction": "down"},
    ],
    ids=["other token", "other acquisition", "not applied", "other direction"],
)
async def test_only_the_dead_holders_own_applied_record_counts(
    db: Any, record: dict[str, Any]
) -> None:
    await dead_holder_lock(db, version=1, running=2, acquisition="a1")
    await db.migrations_history.insert_one(record)

    with pytest.raises(ControlLocked, match="was interrupted"):
        await migrate(db, recorders(1, 2, 3))

    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (True, 1)
    assert (doc["failure"]["kind"], doc["failure"]["version"]) == ("interrupted", 2)
    assert await ran(db) == []


async def test_a_holder_within_its_lease_is_waited_for_not_taken_over(db: Any) -> None:
    await dead_holder_lock(db, version=1, running=2, silent_for=5, lease=3600)

    with pytest.raises(ControlLocked, match="held by deadhost"):
        await migrate(db, recorders(1, 2, 3), wait_timeout=0.3)

    assert (await control(db) or {})["token"] == 7  # untouched


async def test_the_holders_own_lease_decides_not_the_waiters(db: Any) -> None:
    await dead_holder_lock(db, version=1, running=None, silent_for=60, lease=600)

    with pytest.raises(ControlLocked):
        await migrate(db, recorders(1, 2), lease=1, wait_timeout=0.3)


async def test_a_lock_without_a_lease_is_never_taken_over(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": True, "version": 1})

    with pytest.raises(ControlLocked) as caught:
        await migrate(db, recorders(1, 2), wait_timeout=0.3)

    assert "records no owner" in str(caught.value)
    assert await control(db) == {"_id": "control", "locked": True, "version": 1}


async def test_fenced_holder_writes_nothing_once_it_finds_its_lock_taken(db: Any) -> None:
    """A hook inside migration 2 plays an operator's forced takeover meanwhile (a takeover
    within the holder's lease). Migration 2 did finish, and its history record, written
    before its version, says so; the version write that follows finds the lock gone, and
    nothing more is written: not the version, not migration 3."""

    async def taken_over_meanwhile(db: Any) -> None:
        await db.migrations.update_one(
            {"_id": "control"}, {"$inc": {"token": 1}, "$set": {"owner.host": "newholder"}}
        )

    migrations = [
        recorder(1),
        Migration(version=2, up=taken_over_meanwhile, name="hook"),
        recorder(3),
    ]

    with pytest.raises(LockLost, match="lost the migration lock"):
        await migrate(db, migrations)

    doc = await control(db)
    assert doc is not None
    assert (doc["version"], doc["token"], doc["owner"]["host"]) == (1, 2, "newholder")
    assert await ran(db) == [(1, "up")]
    records = [(r["version"], r["outcome"], r["token"]) for r in await history(db)]
    assert records == [(1, "applied", 1), (2, "applied", 1)]


async def test_holder_that_cannot_heartbeat_stops_itself(db: Any) -> None:
    """Its heartbeat finds the lock gone: the running migration is cancelled, nothing written."""

    async def lose_lock_then_wait(db: Any) -> None:
        await db.migrations.update_one({"_id": "control"}, {"$inc": {"token": 1}})
        await anyio.sleep(30)  # cancelled by the failed heartbeat long before this ends

    migrations = [Migration(version=1, up=lose_lock_then_wait, name="slow")]

    with anyio.fail_after(10), pytest.raises(LockLost):
        await migrate(db, migrations, lease=0.3)

    doc = await control(db)
    assert doc is not None and doc["version"] == 0 and "failure" not in doc
    assert await history(db) == []


async def test_lock_of_a_holder_dead_after_its_last_migration_is_left_to_the_next_boot_with_work(
    db: Any,
) -> None:
    """An up-to-date boot does not pay a lease of watching to tell a dead holder from a live
    one: it boots and leaves the lock as it is; the next boot with work takes it over."""
    await dead_holder_lock(db, version=3, running=None, lease=0.3)

    report = await migrate(db, recorders(1, 2, 3))

    assert (report.applied, report.to_version) == ([], 3)
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["token"]) == (True, 7)

    with anyio.fail_after(10):
        report = await migrate(db, recorders(1, 2, 3, 4), max_poll_interval=0.1)

    assert report.applied == [4]
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"], doc["token"]) == (False, 4, 8)


async def test_live_lock_beyond_this_builds_target_is_left_alone(db: Any) -> None:
    await dead_holder_lock(db, version=3, running=None, silent_for=1, lease=3600)

    report = await migrate(db, recorders(1, 2, 3))

    assert report.to_version == 3
    assert (await control(db) or {})["locked"] is True


async def test_progress_is_recorded_on_the_control_document(db: Any) -> None:
    seen: list[Any] = []

    async def backfill(db: Any, ctx: Any) -> None:
        for done in (250, 500):
            await ctx.progress(done, 1000)
            seen.append((await control(db) or {})["running"]["progress"])

    report = await migrate(db, [Migration(version=1, up=backfill, name="backfill")])

    assert report.applied == [1]
    assert [(p["done"], p["total"]) for p in seen] == [(250, 1000), (500, 1000)]
    assert all(p["at"] for p in seen)  # stamped by the server
    assert "running" not in (await control(db) or {})  # gone once the migration is done
