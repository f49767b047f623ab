"""Waiters wake on a change stream where the deployment has them, and poll where it does not."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest

from bootmigrate import Migration, migrate
from bootmigrate.watch import ControlWatch
from tests.clients import open_client
from tests.command_monitor import CommandLog
from tests.databases import async_database
from tests.in_process import recorders

pytestmark = pytest.mark.anyio


async def test_a_nap_ends_when_the_control_document_changes(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": True, "version": 1})
    async with anyio.create_task_group() as tasks:
        watch = ControlWatch(db.migrations, tasks, idle_wait=1.0)
        await watch.nap(5)  # opens the stream; its first wake is the re-read it asks for
        assert watch.available is True

        async def change_soon() -> None:
            await anyio.sleep(0.2)
            await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 2}})

        tasks.start_soon(change_soon)
        with anyio.fail_after(30):  # a nap of 60 s would fail this: the change ends it
            await watch.nap(60)
        tasks.cancel_scope.cancel()


async def test_changes_to_other_documents_do_not_wake(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": True, "version": 1})
    async with anyio.create_task_group() as tasks:
        watch = ControlWatch(db.migrations, tasks, idle_wait=1.0)
        await watch.nap(5)
        await db.migrations.insert_one({"_id": "something else"})
        started = anyio.current_time()
        await watch.nap(1.0)
        assert anyio.current_time() - started >= 0.9  # slept its full nap
        tasks.cancel_scope.cancel()


async def test_standalone_servers_fall_back_to_sleeping(driver: str, standalone_uri: str) -> None:
    async with async_database(driver, standalone_uri) as db:
        await db.migrations.insert_one({"_id": "control", "locked": True, "version": 1})
        async with anyio.create_task_group() as tasks:
            watch = ControlWatch(db.migrations, tasks, idle_wait=1.0)
            started = anyio.current_time()
            await watch.nap(0.5)
            assert watch.available is False
            assert anyio.current_time() - started >= 0.45
            tasks.cancel_scope.cancel()


async def test_waiters_on_a_standalone_server_still_see_the_holder_finish(
    driver: str, standalone_uri: str
) -> None:
    release, inside = anyio.Event(), anyio.Event()

    async def slow(db: Any) -> None:
        inside.set()
        await release.wait()

    migrations = [Migration(version=1, up=slow, name="slow"), *recorders(2)]
    reports: dict[str, Any] = {}

    async def run(name: str, db: Any) -> None:
        reports[name] = await migrate(db, migrations, wait_timeout=30)

    async with (
        async_database(driver, standalone_uri) as holder_db,
        open_client(driver, standalone_uri) as waiter_client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(run, "holder", holder_db)
        await inside.wait()
        tasks.start_soon(run, "waiter", waiter_client[holder_db.name])
        await anyio.sleep(0.3)  # the fault: the holder keeps working this long
        release.set()

    assert reports["holder"].holder and reports["waiter"].to_version == 2
    assert not reports["waiter"].holder


async def test_a_holders_progress_writes_do_not_wake_its_waiters(
    driver: str, mongo_uri: str, db: Any, bootmigrate_log: Any
) -> None:
    """A migration reporting progress every 100 ms: each of those writes changes the control
    document, but none changes a waiter's decision. A waiter's load stays that of its polls
    and its idle stream (two or three commands a second), not one wake (a getMore and a
    read) per progress write."""
    done, window = anyio.Event(), 3.0

    async def reporting(db: Any, ctx: Any) -> None:
        count = 0
        while not done.is_set():
            count += 1
            await ctx.progress(count, 0)
            await anyio.sleep(0.1)

    migrations = [Migration(version=1, up=reporting, name="reporting")]
    commands = CommandLog()
    async with (
        open_client(driver, mongo_uri, event_listeners=[commands]) as waiter_client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(lambda: migrate(db, migrations, wait_timeout=60))
        await bootmigrate_log.wait_for("took the migration lock")
        tasks.start_soon(lambda: migrate(waiter_client[db.name], migrations, wait_timeout=60))
        await bootmigrate_log.wait_for("waiting for")
        await anyio.sleep(2.0)  # past the first quick polls: the steady load
        commands.clear()
        await anyio.sleep(window)
        sent = commands.names()
        done.set()

    # Bounds from the pacers, not from how fast this machine is: an empty batch is followed
    # by the next getMore half a second later at the earliest (EMPTY_BATCH_PACE), and looks
    # are paced to two a second with bursts of three (LookPacer). One wake per progress write
    # would be about thirty getMores in the window.
    counts = Counter(sent)
    assert counts["getMore"] <= 2 * window + 2, counts
    assert counts["find"] <= 2 * window + 3, counts
    assert set(counts) <= {"getMore", "find"}, counts  # no hello, no write
