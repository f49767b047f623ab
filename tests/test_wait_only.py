"""Wait-only replicas: ``migrate(..., apply=False)`` and ``bootmigrate wait`` never take the lock
and never write; they return once another process migrated, and fail fast on a stuck lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from bootmigrate import ControlLocked, NotMigrated, migrate
from tests.in_process import control, recorders
from tests.migration_files import recording_migrations
from tests.operator_cli import Cli
from tests.processes import Replicas, start_blocked_holder

pytestmark = pytest.mark.anyio

FAILED = {
    "_id": "control",
    "locked": True,
    "version": 1,
    "failure": {"kind": "failed", "version": 2, "direction": "up", "error": "boom"},
}


async def test_a_wait_only_call_writes_nothing_and_says_nothing_migrated(db: Any) -> None:
    with pytest.raises(NotMigrated) as raised:
        await migrate(db, recorders(1, 2), apply=False, wait_timeout=1.0)

    assert (raised.value.db_version, raised.value.wanted) == (0, 2)
    assert "bootmigrate up" in str(raised.value)
    assert await db.list_collection_names() == []  # no lock, no history, no migration ran


async def test_a_wait_only_call_on_an_up_to_date_database_returns_at_once(db: Any) -> None:
    await migrate(db, recorders(1, 2))
    report = await migrate(db, recorders(1, 2), apply=False, wait_timeout=5)
    assert (report.from_version, report.to_version, report.holder) == (2, 2, False)


async def test_a_wait_only_call_fails_fast_on_a_stuck_lock(db: Any) -> None:
    await db.migrations.insert_one(FAILED)
    with anyio.fail_after(5), pytest.raises(ControlLocked) as raised:
        await migrate(db, recorders(1, 2), apply=False, wait_timeout=300)
    assert raised.value.reason == "stuck"
    assert await control(db) == FAILED


async def test_a_wait_only_call_leaves_a_rerun_asked_in_the_environment_to_the_migrator(
    db: Any, monkeypatch: pytest.MonkeyPatch, bootmigrate_log: Any
) -> None:
    await migrate(db, recorders(1, 2))
    monkeypatch.setenv("MIGRATION_VERSION", "2,rerun")  # the Job's environment, shared
    report = await migrate(db, recorders(1, 2), apply=False, wait_timeout=5)
    assert (report.to_version, report.applied) == (2, [])
    assert bootmigrate_log.has("the process that migrates carries out")


async def test_wait_only_refuses_a_rerun() -> None:
    with pytest.raises(ValueError, match="rerun cannot be combined with apply=False"):
        await migrate(object(), recorders(1), apply=False, rerun=1)


@pytest.mark.multiprocess
def test_a_wait_only_replica_returns_once_another_process_migrated(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path / "m", 3))
    holder = start_blocked_holder(replicas, 2, env={"BM_RELEASE_FILE": str(release)}, lease=5)
    waiter = replicas.start(apply=False, wait_timeout=60, announce="only waits")
    try:
        assert [waiter.read_event()["event"] for _ in range(2)] == ["ready", "announced"]
        before = sync_db.migrations.find_one({"_id": "control"})
        release.touch()
        waited, migrated = waiter.result(), holder.result()
    finally:
        holder.kill()
        waiter.kill()

    assert migrated["ok"] and migrated["applied"] == [1, 2, 3]
    assert waited["ok"], waited
    assert (waited["holder"], waited["applied"], waited["to_version"]) == (False, [], 3)
    assert before["owner"]["pid"] == holder.pid  # the waiter never took the lock
    assert {d["pid"] for d in sync_db.ran.find()} == {holder.pid}


@pytest.mark.multiprocess
def test_bootmigrate_wait_exit_codes(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path / "m", 3))
    cli = Cli.for_replicas(replicas)

    nobody = cli("wait", "--timeout", "1")
    assert nobody.returncode == 3, nobody.stderr  # pending, nobody migrating
    assert "nothing migrated it" in nobody.stderr
    assert sync_db.list_collection_names() == []

    holder = start_blocked_holder(replicas, 2, env={"BM_RELEASE_FILE": str(release)}, lease=5)
    try:
        busy = cli("wait", "--timeout", "1")
        assert busy.returncode == 4, busy.stderr  # a live holder still at it
        waiting = subprocess.Popen(
            [sys.executable, "-m", "bootmigrate", "wait", "--timeout", "60", "--json"],
            env=cli.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        release.touch()
        out, err = waiting.communicate(timeout=60)
        assert holder.result()["ok"]
    finally:
        holder.kill()
    assert waiting.returncode == 0, err
    assert '"to_version": 3' in out

    sync_db.migrations.replace_one({"_id": "control"}, FAILED)  # stuck below this build
    stuck = cli("wait")
    assert stuck.returncode == 5, stuck.stderr
    assert "bootmigrate unlock" in stuck.stderr
