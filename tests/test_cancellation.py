"""Semantic 8: cancellation while waiting, between migrations, and inside one."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from bootmigrate import Migration, migrate
from tests.in_process import control, history, ran, recorder

pytestmark = pytest.mark.anyio


async def test_cancelled_waiter_writes_nothing(db: Any, bootmigrate_log: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": True, "version": 1})
    before = await control(db)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: migrate(db, [recorder(1), recorder(2)], wait_timeout=60))
            await bootmigrate_log.wait_for("waiting for")
            scope.cancel()

    assert scope.cancelled_caught
    assert await control(db) == before
    assert "migrations_history" not in await db.list_collection_names()


async def test_holder_cancelled_between_migrations_releases_at_the_current_version(
    db: Any,
) -> None:
    scope = anyio.CancelScope()

    async def cancel_after_me(db: Any) -> None:
        await db.ran.insert_one({"version": 2, "direction": "up"})
        scope.cancel()  # lands once this step is recorded, before the next one starts

    migrations = [recorder(1), Migration(version=2, up=cancel_after_me, name="two"), recorder(3)]
    with scope:
        await migrate(db, migrations)

    assert scope.cancelled_caught
    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 2)
    assert "failure" not in doc
    assert await ran(db) == [(1, "up"), (2, "up")]
    assert [r["outcome"] for r in await history(db)] == ["applied", "applied"]

    report = await migrate(db, [*migrations[:1], recorder(2), recorder(3)])
    assert report.applied == [3]


async def _cancel_inside(db: Any, idempotent: bool) -> None:
    started = anyio.Event()

    async def forever(db: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    migrations = [
        recorder(1),
        Migration(version=2, up=forever, name="forever", idempotent=idempotent),
    ]
    with anyio.fail_after(10), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: migrate(db, migrations, shutdown_grace=0))
            await started.wait()
            scope.cancel()


async def test_holder_cancelled_inside_a_migration_leaves_it_stuck_as_interrupted(
    db: Any,
) -> None:
    await _cancel_inside(db, idempotent=False)

    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (True, 1)
    assert (doc["failure"]["kind"], doc["failure"]["version"]) == ("interrupted", 2)
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [
        (1, "applied"),
        (2, "interrupted"),
    ]


async def test_holder_cancelled_inside_an_idempotent_migration_releases_for_a_rerun(
    db: Any,
) -> None:
    await _cancel_inside(db, idempotent=True)

    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (False, 1)
    assert "failure" not in doc
    report = await migrate(db, [recorder(1), recorder(2, idempotent=True)])
    assert report.applied == [2]
    assert await ran(db) == [(1, "up"), (2, "up")]
