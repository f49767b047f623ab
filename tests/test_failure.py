"""Semantic 7: a failing migration leaves the lock stuck, recorded, and waiters fail fast."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from bootmigrate import ControlLocked, Migration, MigrationFailed, migrate
from tests.clients import open_client
from tests.in_process import announce, control, history, ran, recorder

pytestmark = pytest.mark.anyio


def flaky(version: int, broken: dict[str, bool], gate: anyio.Event | None = None) -> Migration:
    async def up(db: Any) -> None:
        if gate is not None:
            await gate.wait()
        if broken["value"]:
            raise RuntimeError("disk full while building index")
        await db.ran.insert_one({"version": version, "direction": "up"})

    return Migration(version=version, up=up, name="build_index")


async def test_failure_sticks_the_lock_and_resumes_after_unlock(db: Any) -> None:
    broken = {"value": True}
    migrations = [recorder(1), flaky(2, broken), recorder(3)]

    with pytest.raises(MigrationFailed) as caught:
        await migrate(db, migrations, build="b-2")

    message = str(caught.value)
    assert caught.value.version == 2
    for fragment in (
        "0002 build_index",
        "RuntimeError: disk full",
        "bootmigrate unlock",
        "version 1",
        "resumes at migration 2",
    ):
        assert fragment in message
    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"]) == (True, 1)
    failure = doc["failure"]
    assert (failure["kind"], failure["version"], failure["build"]) == ("failed", 2, "b-2")
    assert "disk full" in failure["error"] and "RuntimeError" in failure["traceback"]
    assert failure["host"] and failure["at"]
    records = await history(db)
    assert [(r["version"], r["outcome"]) for r in records] == [(1, "applied"), (2, "failed")]
    assert "disk full" in records[1]["error"]

    # Stuck: the next boot refuses at once rather than guessing.
    with pytest.raises(ControlLocked, match="migration 2 build_index failed"):
        await migrate(db, migrations)

    broken["value"] = False
    await db.migrations.update_one({"_id": "control"}, {"$set": {"locked": False}})
    report = await migrate(db, migrations)

    assert (report.from_version, report.applied) == (1, [2, 3])
    assert await ran(db) == [(1, "up"), (2, "up"), (3, "up")]
    assert "failure" not in (await control(db) or {})


async def test_waiter_fails_fast_naming_the_failed_version(
    db: Any, driver: str, mongo_uri: str, db_name: str, bootmigrate_log: Any
) -> None:
    gate, locked = anyio.Event(), anyio.Event()
    migrations = [recorder(1, before=announce(locked)), flaky(2, {"value": True}, gate)]
    outcome: dict[str, BaseException] = {}

    async def hold() -> None:
        with pytest.raises(MigrationFailed):
            await migrate(db, migrations)

    async def wait(waiter_db: Any) -> None:
        try:
            await migrate(waiter_db, migrations, wait_timeout=120)
        except BaseException as exc:
            outcome["waiter"] = exc

    async with open_client(driver, mongo_uri) as waiter_client:
        # Fail fast means: well before the 120 s wait_timeout.
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(hold)
                await locked.wait()
                tasks.start_soon(wait, waiter_client[db_name])
                await bootmigrate_log.wait_for("waiting for")
                gate.set()

    error = outcome["waiter"]
    assert isinstance(error, ControlLocked)
    assert "migration 2 build_index failed" in str(error)
    assert "disk full" in str(error)


async def test_a_step_that_returns_a_value_is_a_failure(db: Any) -> None:
    async def up(db: Any) -> Any:
        return db.ran.insert_one({"forgot": "await"})

    with pytest.raises(MigrationFailed, match="an `await` forgotten"):
        await migrate(db, [Migration(version=1, up=up, name="forgetful")])

    assert (await control(db) or {})["failure"]["version"] == 1


async def test_a_hanging_migration_fails_at_its_timeout(db: Any) -> None:
    async def hang(db: Any) -> None:
        await anyio.sleep_forever()

    migrations = [recorder(1), Migration(version=2, up=hang, name="hangs")]
    with anyio.fail_after(10), pytest.raises(MigrationFailed) as caught:
        await migrate(db, migrations, migration_timeout=0.3)

    assert "ran longer than its timeout of 0.3 s" in str(caught.value)
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (True, 1)
    assert doc["failure"]["version"] == 2 and "timeout" in doc["failure"]["error"]


async def test_a_migrations_own_timeout_wins(db: Any) -> None:
    async def hang(db: Any) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(10), pytest.raises(MigrationFailed, match=r"timeout of 0\.2 s"):
        await migrate(
            db, [Migration(version=1, up=hang, name="hangs", timeout=0.2)], migration_timeout=60
        )
