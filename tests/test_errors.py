"""Errors carry their facts as fields, and write their messages from them."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from bootmigrate import (
    ControlLocked,
    DatabaseAhead,
    DatabaseUnavailable,
    InvalidControlDocument,
    LockLost,
    Migration,
    MigrationError,
    MigrationFailed,
    UnsupportedUpgrade,
    migrate,
)
from bootmigrate.control import Control
from tests.in_process import dead_holder_lock, recorder


async def broken(db: Any) -> None:
    raise RuntimeError("index build failed")


@pytest.mark.anyio
async def test_a_failed_migration_names_itself_its_host_and_the_version_left(db: Any) -> None:
    migrations = [recorder(1), Migration(version=2, up=broken, name="build_index")]

    with pytest.raises(MigrationFailed) as caught:
        await migrate(db, migrations)

    error = caught.value
    assert (error.version, error.name, error.direction) == (2, "build_index", "up")
    assert (error.db_version, error.collection) == (1, "migrations")
    assert error.error == "RuntimeError: index build failed"
    assert error.host and error.pid
    assert f"failed on {error.host} (pid {error.pid})" in str(error)


@pytest.mark.anyio
async def test_a_stuck_lock_reports_the_failure_it_records(db: Any) -> None:
    await migrate(db, [recorder(1)])
    await db.migrations.update_one(
        {"_id": "control"},
        {"$set": {"locked": True, "failure": {"kind": "failed", "version": 2, "error": "boom"}}},
    )

    with pytest.raises(ControlLocked) as caught:
        await migrate(db, [recorder(1), recorder(2)])

    error = caught.value
    assert (error.reason, error.db_version, error.collection) == ("stuck", 1, "migrations")
    assert error.failure is not None and error.failure["error"] == "boom"
    assert error.control is not None and error.control["locked"] is True


@pytest.mark.anyio
async def test_a_wait_that_times_out_names_the_live_holder(db: Any) -> None:
    await dead_holder_lock(db, version=0, running=1, silent_for=0.0, lease=3600.0)

    with pytest.raises(ControlLocked) as caught:
        await migrate(db, [recorder(1)], wait_timeout=0.3, max_poll_interval=0.1)

    error = caught.value
    assert (error.reason, error.wait_timeout) == ("wait_timeout", 0.3)
    assert error.holder == "deadhost (pid 4242, build old)"
    assert error.running is not None and error.running["version"] == 1
    assert "gave up after 0.3 s (wait_timeout)" in str(error)


@pytest.mark.anyio
async def test_a_failure_names_the_version_the_database_was_really_at(db: Any) -> None:
    # At 4 (earlier migrations were dropped from this build, the floor is 4): a failure in 5
    # leaves the database at 4, not at the version before 5 among the files shipped.
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 4})
    migrations = [Migration(version=5, up=broken, name="five"), recorder(6)]

    with pytest.raises(MigrationFailed) as caught:
        await migrate(db, migrations)

    assert caught.value.db_version == 4
    assert "database at version 4" in str(caught.value)


@pytest.mark.parametrize(
    "error",
    [
        MigrationFailed(
            version=2,
            name="two",
            direction="up",
            host="h",
            pid=1,
            collection="migrations",
            db_version=1,
            error="E: x",
        ),
        ControlLocked(
            "stuck",
            Control(exists=True, locked=True, version=1, failure={"version": 2, "error": "x"}),
            collection="migrations",
        ),
        LockLost(token=3, collection="migrations", lease=30.0, during="at its next write"),
        DatabaseUnavailable(address="db:27017", seconds=5.0, cause="refused", holding=False),
        UnsupportedUpgrade(db_version=1, floor=4, known="5..6", release="6.0"),
        DatabaseAhead(db_version=9, latest=6, wanted=None),
        InvalidControlDocument(collection="migrations", problem="p", fix="f", document={}),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_survive_pickling_with_their_fields(error: MigrationError) -> None:
    # A migrate() run in a worker process reaches its parent as a pickled exception.
    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is type(error) and str(copy) == str(error)
    assert vars(copy) == vars(error)
