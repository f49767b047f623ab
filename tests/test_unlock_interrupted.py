"""`unlock` does not bypass "never re-run blindly": a lock whose holder died inside a migration
that is not safe to repeat, or one stuck as interrupted, is unlocked only with --force, and
that is recorded in history; `status` says what the next boot will really do."""

from __future__ import annotations

import os
import shlex
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from bootmigrate import ControlLocked, Migration, MigrationFailed, migrate
from bootmigrate.commands import set_version, unlock
from tests.in_process import control, dead_holder_lock, history, recorder, recorders
from tests.migration_files import recording_migrations
from tests.operator_cli import Cli
from tests.polling import wait_past_lease
from tests.processes import Replicas, boot, start_blocked_holder
from tests.test_runbook import follow, runbook

LEASE = 1.0


@pytest.mark.multiprocess
def test_a_holder_killed_inside_a_plain_migration_is_unlocked_only_with_force(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3))
    holder = start_blocked_holder(replicas, 2, lease=LEASE)
    os.kill(holder.pid, signal.SIGKILL)
    holder.kill()
    dead = sync_db.migrations.find_one({"_id": "control"})
    wait_past_lease(sync_db, dead["heartbeat"], LEASE, "the killed holder's")
    cli = Cli.for_replicas(replicas)

    status = cli("status")  # no replica booted meanwhile: nothing has marked it yet

    assert status.returncode == 4, status.stdout
    assert "takes it over" not in status.stdout
    assert "the next boot that needs the lock marks migration 2 step_2 (up) interrupted" in (
        status.stdout
    )

    refused = cli("unlock")

    assert refused.returncode == 1, refused.stdout
    assert "refusing to unlock: migration 2 step_2 (up) was interrupted" in refused.stderr
    assert "bootmigrate history" in refused.stderr and "--force" in refused.stderr
    assert sync_db.migrations.find_one({"_id": "control"})["locked"] is True

    forced = cli("unlock", "--force")

    assert forced.returncode == 0, forced.stderr
    records = [
        (h["version"], h["outcome"], h.get("action")) for h in sync_db.migrations_history.find()
    ]
    assert records == [(1, "applied", None), (2, "interrupted", None), (1, "manual", "unlock")]
    # The operator chose to let it run again; it does, once, with the interruption on record.
    result = boot(replicas, lease=LEASE)
    assert (result["exit_code"], result["applied"]) == (0, [2, 3]), result


@pytest.mark.anyio
async def test_a_lock_stuck_as_interrupted_is_unlocked_only_with_force(db: Any) -> None:
    migrations = recorders(1, 2, 3)
    await dead_holder_lock(db, version=1, running=2)
    with pytest.raises(ControlLocked, match="was interrupted"):
        await migrate(db, migrations)  # marks it interrupted

    with pytest.raises(ControlLocked) as refused:
        await unlock(db)

    assert refused.value.reason == "interrupted"
    assert (await control(db) or {})["locked"] is True
    done = await unlock(db, force=True)
    assert done.changed
    outcomes = [(r["version"], r["outcome"], r.get("action")) for r in await history(db)]
    assert outcomes == [(2, "interrupted", None), (1, "manual", "unlock")]  # one interruption


@pytest.mark.anyio
async def test_set_version_first_settles_an_interrupted_migration(db: Any) -> None:
    """The operator found that migration 2 had completed: recorded, it unlocks without
    --force, and the next boot goes on from there."""
    migrations = recorders(1, 2, 3)
    await dead_holder_lock(db, version=1, running=2)
    with pytest.raises(ControlLocked):
        await migrate(db, migrations)

    await set_version(db, 2, migrations)
    assert (await unlock(db, migrations=migrations)).changed

    assert (await migrate(db, migrations)).applied == [3]


@pytest.mark.anyio
async def test_a_holder_killed_inside_an_idempotent_migration_unlocks_without_force(
    db: Any,
) -> None:
    migrations = [recorder(1), recorder(2, idempotent=True), recorder(3)]
    await dead_holder_lock(db, version=1, running=2)

    done = await unlock(db, migrations=migrations)

    assert done.changed and done.unfinished is not None
    outcomes = [(r["version"], r["outcome"], r.get("action")) for r in await history(db)]
    assert outcomes == [(2, "interrupted", None), (1, "manual", "unlock")]
    assert (await migrate(db, migrations)).applied == [2, 3]


@pytest.mark.anyio
async def test_a_holder_killed_after_recording_its_migration_applied_unlocks_without_force(
    db: Any,
) -> None:
    """It died between the history record of migration 2 and its version write: 2 is not
    half applied but finished, so the unlock records version 2 and needs no --force."""
    await dead_holder_lock(db, version=1, running=2, acquisition="a1")
    record = {"version": 2, "direction": "up", "outcome": "applied", "token": 7}
    await db.migrations_history.insert_one({**record, "acquisition": "a1"})

    done = await unlock(db, migrations=recorders(1, 2, 3))

    assert done.changed
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 2)
    assert "unfinished" not in doc and "running" not in doc
    unlocked = (await history(db))[-1]
    assert (unlocked["action"], unlocked["version"]) == ("unlock", 2)  # the version it recorded
    assert "migration 2 had finished" in unlocked["note"]
    assert [r["outcome"] for r in await history(db)] == ["applied", "manual"]  # no interruption
    assert (done.recorded, done.version, done.unfinished) == (2, 2, None)
    assert (await migrate(db, recorders(1, 2, 3))).applied == [3]


def test_status_and_unlock_say_a_finished_migrations_version_is_recorded(cli: Cli) -> None:
    beat = datetime.now(timezone.utc) - timedelta(hours=1)
    running = {"version": 2, "name": "step_2", "direction": "up"}
    cli.db.migrations.insert_one(
        {
            "_id": "control",
            "locked": True,
            "version": 1,
            "token": 7,
            "acquisition": "a1",
            "beats": 3,
            "heartbeat": beat,
            "owner": {"host": "deadhost", "pid": 4242, "lease": 1.0, "id": "x"},
            "running": running,
            "unfinished": {**running, "from_version": 1, "to_version": 2},
        }
    )
    cli.db.migrations_history.insert_one(
        {"version": 2, "direction": "up", "outcome": "applied", "token": 7, "acquisition": "a1"}
    )

    said = cli.json("status")["lock"]["on_expiry"]
    assert "died after migration 2 step_2 (up) finished (history records it applied)" in said
    assert "takes it over at version 2" in said

    done = cli("unlock")

    assert done.returncode == 0, done.stderr
    assert "version 2 was recorded; the next boot resumes from there" in done.stdout
    assert (cli.json("status")["version"], cli.control()["locked"]) == (2, False)


@pytest.mark.anyio
async def test_without_the_migrations_no_migration_counts_as_safe_to_repeat(db: Any) -> None:
    await dead_holder_lock(db, version=1, running=2)

    with pytest.raises(ControlLocked, match="not known to be safe to run again"):
        await unlock(db)

    # Migrations that do not load: unlock still works, knowing none of them.
    with pytest.raises(ControlLocked, match="not known to be safe to run again"):
        await unlock(db, migrations="no/such/migrations/directory")


@pytest.mark.anyio
async def test_a_failed_migration_still_unlocks_without_force(db: Any) -> None:
    async def broken(db: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(MigrationFailed):
        await migrate(db, [recorder(1), Migration(version=2, up=broken, name="step_2")])

    assert (await unlock(db)).changed


def holder_died_inside_2(cli: Cli) -> None:
    """The control document a holder killed inside migration 2 (not idempotent) leaves."""
    assert cli("up", "--yes", "--to", "1").returncode == 0
    beat = cli.db.command("hello")["localTime"] - timedelta(hours=1)
    step = {"version": 2, "name": "step_2", "direction": "up"}
    cli.db.migrations.update_one(
        {"_id": "control"},
        {
            "$set": {
                "locked": True,
                "token": 5,
                "beats": 3,
                "heartbeat": beat,
                "locked_at": beat,
                "owner": {"host": "app-3", "pid": 4242, "build": "b", "lease": 1.0, "id": "x"},
                "running": step,
                "unfinished": {**step, "from_version": 1, "to_version": 2},
            }
        },
    )


@pytest.mark.parametrize(
    ("name", "runs_of_2"), [("interrupted-rerun", 1), ("interrupted-completed", 0)]
)
def test_runbooks_for_a_holder_that_died_inside(cli: Cli, name: str, runs_of_2: int) -> None:
    holder_died_inside_2(cli)

    follow(cli, name)

    assert cli.control()["version"] == 3  # type: ignore[index]
    assert sorted(d["v"] for d in cli.db.items.find()) == sorted([1, 3] + [2] * runs_of_2)
    commands = {"status", "plan", "up", "down", "rerun", "unlock", "set-version", "history", "new"}
    assert all(shlex.split(line)[1] in commands for line in runbook(name) if line[0] != "#")
