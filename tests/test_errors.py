"""Errors carry their facts as fields, and write their messages from them."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import ControlLocked, Migration, MigrationFailed, migrate
from tests.helpers import dead_holder_lock, recorder

pytestmark = pytest.mark.anyio


async def broken(db: Any) -> None:
    raise RuntimeError("index build failed")


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


async def test_a_wait_that_times_out_names_the_live_holder(db: Any) -> None:
    await dead_holder_lock(db, version=0, running=1, silent_for=0.0, lease=3600.0)

    with pytest.raises(ControlLocked) as caught:
        await migrate(db, [recorder(1)], wait_timeout=0.3, max_poll_interval=0.1)

    error = caught.value
    assert (error.reason, error.wait_timeout) == ("wait_timeout", 0.3)
    assert error.holder == "deadhost (pid 4242, build old)"
    assert error.running is not None and error.running["version"] == 1
    assert "gave up after 0.3 s (wait_timeout)" in str(error)
