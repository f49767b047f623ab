"""transactional = True: the migration, its version and its history record commit together
where the deployment has transactions, and migrate() refuses up front where it has not."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from bootmigrate import InvalidMigrations, Migration, MigrationFailed, migrate
from tests.databases import async_database
from tests.in_process import control, dead_holder_lock, history, recorder

pytestmark = pytest.mark.anyio


def transactional(
    version: int,
    *,
    fail: bool = False,
    seen: list[Any] | None = None,
    started: anyio.Event | None = None,
) -> Migration:
    async def up(db: Any, ctx: Any) -> None:
        if seen is not None:
            seen.append(ctx.session)
        await db.accounts.insert_one({"v": version}, session=ctx.session)
        await db.accounts.insert_one({"v": version + 0.5}, session=ctx.session)
        if started is not None:
            started.set()
            await anyio.sleep_forever()
        if fail:
            raise RuntimeError("half way through")

    return Migration(version=version, up=up, name=f"tx_{version}", transactional=True)


async def test_migration_version_and_history_commit_together(db: Any) -> None:
    seen: list[Any] = []

    report = await migrate(db, [recorder(1), transactional(2, seen=seen)])

    assert report.applied == [1, 2]
    assert seen[0] is not None  # ctx.session is the transaction's session
    assert await db.accounts.count_documents({}) == 2
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 2)
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [
        (1, "applied"),
        (2, "applied"),
    ]


async def test_a_failing_transactional_migration_leaves_nothing_half_written(db: Any) -> None:
    with pytest.raises(MigrationFailed, match="half way through"):
        await migrate(db, [recorder(1), transactional(2, fail=True)])

    assert await db.accounts.count_documents({}) == 0  # both inserts rolled back
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (True, 1)
    assert doc["failure"]["version"] == 2
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [
        (1, "applied"),
        (2, "failed"),
    ]


async def test_cancelled_inside_a_transaction_releases_with_nothing_written(db: Any) -> None:
    started = anyio.Event()
    with anyio.fail_after(20), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(
                lambda: migrate(db, [transactional(1, started=started)], shutdown_grace=0)
            )
            await started.wait()
            scope.cancel()

    assert await db.accounts.count_documents({}) == 0
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 0)


async def test_a_dead_holder_inside_a_transaction_is_rerun(db: Any) -> None:
    await dead_holder_lock(db, version=1, running=2)

    report = await migrate(db, [recorder(1), transactional(2), recorder(3)])

    assert report.applied == [2, 3]


async def test_a_transaction_longer_than_half_the_lease_fails(db: Any) -> None:
    started = anyio.Event()
    with anyio.fail_after(20), pytest.raises(MigrationFailed, match=r"timeout of 0\.5 s"):
        await migrate(db, [transactional(1, started=started)], lease=1.0)

    assert await db.accounts.count_documents({}) == 0


async def test_a_standalone_server_is_refused_before_anything_runs(
    driver: str, standalone_uri: str
) -> None:
    async with async_database(driver, standalone_uri) as db:
        with pytest.raises(InvalidMigrations, match="does not support transactions"):
            await migrate(db, [recorder(1), transactional(2)])
        assert await db.list_collection_names() == []
