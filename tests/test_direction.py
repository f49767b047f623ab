"""Direction is part of the state: a `down` or `rerun` that did not finish (it failed, its
holder was killed or cancelled, and an operator may have unlocked since) is finished in its own
direction or stays in the way; a later `up` never steps over it."""

from __future__ import annotations

import os
import shlex
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from bootmigrate import ControlLocked, Migration, MigrationFailed, migrate
from bootmigrate.commands import set_version, unlock
from tests.in_process import control, ran, recorder
from tests.migration_files import write_migrations
from tests.operator_cli import Cli
from tests.polling import wait_until
from tests.processes import Replicas, Worker, boot
from tests.test_runbook import follow, runbook

LEASE = 1.0
COMMANDS = {"status", "plan", "up", "down", "rerun", "unlock", "set-version", "history", "new"}

# A migration for process tests whose `up` and `down` record which process ran them, and
# block forever when BM_BLOCK_UP_AT / BM_BLOCK_DOWN_AT names its version (to be killed there).
TWO_WAY_MIGRATION = """
import asyncio, os

idempotent = {idempotent}

async def _record(db, direction):
    await db.ran.insert_one({{"version": {v}, "direction": direction, "pid": os.getpid()}})
    if os.environ.get("BM_BLOCK_" + direction.upper() + "_AT") == "{v}":
        while True:
            await asyncio.sleep(0.05)

async def up(db):
    await _record(db, "up")

async def down(db):
    await _record(db, "down")
"""


def two_way_migrations(directory: Path, versions: range, idempotent: bool = False) -> Path:
    return write_migrations(
        directory,
        {
            f"{v:04d}_step_{v}.py": TWO_WAY_MIGRATION.format(v=v, idempotent=idempotent)
            for v in versions
        },
    )


def killed_inside(replicas: Replicas, version: int, direction: str, **options: Any) -> int:
    """Start a replica that blocks inside ``direction`` of migration ``version``, SIGKILL it
    there, and return its pid."""
    env = {f"BM_BLOCK_{'UP' if direction == 'rerun' else direction.upper()}_AT": str(version)}
    worker: Worker = replicas.start(env=env, lease=LEASE, **options)
    try:
        wait_until(
            lambda: replicas.db.ran.find_one(
                {
                    "version": version,
                    "direction": "up" if direction == "rerun" else direction,
                    "pid": worker.pid,
                }
            ),
            30,
            f"the holder to enter the {direction} of migration {version}",
        )
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
    return worker.pid


def runs(db: Any) -> Counter[tuple[int, str]]:
    return Counter((d["version"], d["direction"]) for d in db.ran.find())


@pytest.mark.multiprocess
@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
def test_a_down_killed_inside_is_never_stepped_over_by_a_later_up(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, idempotent: bool
) -> None:
    replicas = Replicas(
        mongo_uri, sync_db, driver, two_way_migrations(tmp_path, range(1, 4), idempotent)
    )
    assert boot(replicas, lease=LEASE)["exit_code"] == 0
    killed_inside(replicas, 2, "down", target=1)
    before = runs(sync_db)

    result = boot(replicas, lease=LEASE, wait_timeout=30)  # a replica of the build at 3

    assert (result["exit_code"], result.get("error")) == (1, "ControlLocked"), result
    # A down is not safe to repeat even when the migration declares `idempotent` (which
    # speaks of its `up`): stuck as interrupted. The operator unlocks (it takes --force); the
    # step stays unfinished, so the next boot still refuses.
    assert "was interrupted" in result["message"]
    forced = Cli.for_replicas(replicas)("unlock", "--force")
    assert forced.returncode == 0, forced.stderr
    result = boot(replicas, lease=LEASE, wait_timeout=30)
    assert (result["exit_code"], result.get("error")) == (1, "ControlLocked"), result
    assert "migration 2 step_2 (down) is still unfinished" in forced.stdout
    message = result["message"]
    assert "migration 2 step_2 (down) did not finish" in message
    assert "`bootmigrate down --to 1`" in message and "bootmigrate set-version" in message
    doc = sync_db.migrations.find_one({"_id": "control"})
    assert doc["version"] == 2
    assert runs(sync_db) == before  # migration 3 was not applied over the half-run down

    # Finished in its own direction, then the newer build may go up again.
    assert boot(replicas, lease=LEASE, target=1, wait_timeout=30)["exit_code"] == 0
    assert sync_db.migrations.find_one({"_id": "control"})["version"] == 1
    again = boot(replicas, lease=LEASE, wait_timeout=30)
    assert (again["exit_code"], again.get("applied")) == (0, [2, 3]), again
    assert runs(sync_db) - before == Counter({(2, "down"): 1, (2, "up"): 1, (3, "up"): 1})


@pytest.mark.multiprocess
@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
def test_a_rerun_killed_inside_is_never_stepped_over_by_a_later_up(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, idempotent: bool
) -> None:
    migrations = two_way_migrations(tmp_path, range(1, 4), idempotent)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    assert boot(replicas, lease=LEASE)["exit_code"] == 0
    killed_inside(replicas, 2, "rerun", rerun=2)
    two_way_migrations(tmp_path, range(4, 5))  # the next release adds migration 4
    before = runs(sync_db)

    result = boot(replicas, lease=LEASE, wait_timeout=30)

    assert (result["exit_code"], result.get("error")) == (1, "ControlLocked"), result
    if not idempotent:
        assert "was interrupted" in result["message"]
        assert Cli.for_replicas(replicas)("unlock", "--force").returncode == 0
        result = boot(replicas, lease=LEASE, wait_timeout=30)
        assert (result["exit_code"], result.get("error")) == (1, "ControlLocked"), result
    assert "migration 2 step_2 (rerun) did not finish" in result["message"]
    assert "`bootmigrate rerun 2`" in result["message"]
    assert sync_db.migrations.find_one({"_id": "control"})["version"] == 3
    assert runs(sync_db) == before  # migration 4 did not run

    rerun = Cli.for_replicas(replicas)("rerun", "2", "--yes")
    assert rerun.returncode == 0, rerun.stderr
    after = boot(replicas, lease=LEASE, wait_timeout=30)
    assert (after["exit_code"], after.get("applied")) == (0, [4]), after


def failing_down(version: int, broken: dict[str, bool]) -> Migration:
    """A migration whose `down` raises while ``broken["value"]``."""

    async def up(db: Any) -> None:
        await db.ran.insert_one({"version": version, "direction": "up"})

    async def down(db: Any) -> None:
        if broken["value"]:
            raise RuntimeError("cannot drop the index: it is in use")
        await db.ran.insert_one({"version": version, "direction": "down"})

    return Migration(version=version, up=up, down=down, name=f"step_{version}")


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["bootmigrate unlock", "by hand"])
async def test_a_failed_down_unlocked_is_never_stepped_over_by_a_later_up(
    db: Any, how: str
) -> None:
    broken = {"value": True}
    migrations = [recorder(1), failing_down(2, broken), recorder(3)]
    await migrate(db, migrations)
    with pytest.raises(MigrationFailed) as failed:
        await migrate(db, migrations, target=1)
    if how == "by hand":  # as the message also says
        await db.migrations.update_one({"_id": "control"}, {"$set": {"locked": False}})
    else:
        assert (await unlock(db)).changed

    with pytest.raises(ControlLocked) as refused:
        await migrate(db, migrations)

    assert refused.value.reason == "unfinished"
    message = str(refused.value)
    assert "migration 2 step_2 (down) did not finish" in message
    assert "which would run migration 3 (up)" in message
    assert "`bootmigrate down --to 1`" in message
    assert "`bootmigrate set-version 1` if the revert is complete" in message
    assert (await control(db) or {})["version"] == 2
    assert await ran(db) == [(1, "up"), (2, "up"), (3, "up"), (3, "down")]
    # The failure's own message said so, rather than "the next boot resumes".
    assert "finish it in its own direction: `bootmigrate down --to" in str(failed.value)

    broken["value"] = False
    assert (await migrate(db, migrations, target=1)).reverted == [2]
    assert (await migrate(db, migrations)).applied == [2, 3]
    assert "unfinished" not in (await control(db) or {})


@pytest.mark.anyio
@pytest.mark.parametrize("transactional", [False, True], ids=["idempotent", "transactional"])
async def test_a_down_cancelled_inside_is_not_stepped_over(db: Any, transactional: bool) -> None:
    """Cancelled inside a transactional down (safe to repeat), the holder releases the lock
    rather than sticking it; the step stays unfinished, so only a down resumes it. Inside the
    down of a migration declared idempotent (which speaks of its `up`), it sticks the lock as
    interrupted."""
    entered, gate = anyio.Event(), anyio.Event()

    async def down(db: Any, ctx: Any) -> None:
        entered.set()
        await gate.wait()

    slow = Migration(
        version=2,
        up=recorder(2).up,
        down=down,
        name="step_2",
        idempotent=not transactional,
        transactional=transactional,
    )
    migrations = [recorder(1), slow, recorder(3)]
    await migrate(db, migrations)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: migrate(db, migrations, target=1, shutdown_grace=0))
            await entered.wait()
            scope.cancel()
    doc = await control(db)
    if not transactional:
        assert doc is not None and (doc["locked"], doc["version"]) == (True, 2)
        assert (doc["failure"]["kind"], doc["failure"]["direction"]) == ("interrupted", "down")
        return
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 2)

    with pytest.raises(ControlLocked, match=r"migration 2 step_2 \(down\) did not finish"):
        await migrate(db, migrations)

    assert (await control(db) or {})["version"] == 2
    gate.set()
    assert (await migrate(db, migrations, target=1)).reverted == [2]


@pytest.mark.anyio
@pytest.mark.parametrize(("recorded", "then_applied"), [(1, [2, 3]), (2, [3])])
async def test_set_version_records_that_nothing_is_left_to_finish(
    db: Any, recorded: int, then_applied: list[int]
) -> None:
    """The operator checked the database: the revert completed (1) or was undone (2)."""
    broken = {"value": True}
    migrations = [recorder(1), failing_down(2, broken), recorder(3)]
    await migrate(db, migrations)
    with pytest.raises(MigrationFailed):
        await migrate(db, migrations, target=1)
    await unlock(db)

    await set_version(db, recorded, migrations)

    assert (await migrate(db, migrations)).applied == then_applied


@pytest.mark.anyio
async def test_rocket_chats_hand_skip_of_a_failed_up_still_works(db: Any) -> None:
    async def up(db: Any) -> None:
        raise RuntimeError("broken")

    migrations = [recorder(1), Migration(version=2, up=up, name="step_2"), recorder(3)]
    with pytest.raises(MigrationFailed):
        await migrate(db, migrations)

    # db.migrations.updateOne({_id: "control"}, {$set: {version: 2, locked: false}})
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 2, "locked": False}})

    assert (await migrate(db, migrations)).applied == [3]


def test_status_shows_the_unfinished_down_and_the_way_out(cli: Cli) -> None:
    assert cli("up", "--yes").returncode == 0
    (cli.migrations / "0002_step_2.py").write_text(
        "async def up(db):\n    pass\n\nasync def down(db):\n    raise RuntimeError('in use')\n"
    )
    assert cli("down", "--to", "1", "--yes").returncode == 1
    unlocked = cli("unlock")
    assert unlocked.returncode == 0, unlocked.stderr

    done = cli("status")

    assert done.returncode == 5, done.stdout  # stuck: a boot to latest would refuse
    assert "unfinished  migration 2 step_2 (down), started at version 2" in done.stdout
    assert "finish it: bootmigrate down --to 1" in done.stdout
    status = cli.json("status")
    assert status["state"] == "stuck"
    assert "migration 2 step_2 (down) did not finish" in status["problem"]
    assert "migration 2 step_2 (down) is still unfinished" in unlocked.stdout


def test_runbook_unfinished_down(cli: Cli) -> None:
    assert cli("up", "--yes").returncode == 0
    step_2 = cli.migrations / "0002_step_2.py"
    fixed = step_2.read_text()
    step_2.write_text(fixed.replace("await db.items.delete_one", "raise RuntimeError('in use') #"))
    assert cli("down", "--to", "1", "--yes").returncode == 1
    assert cli("unlock").returncode == 0

    def fix(line: str) -> None:
        if line.startswith("# fix the cause"):
            step_2.write_text(fixed)

    follow(cli, "unfinished-down", fix)

    assert sorted(d["v"] for d in cli.db.items.find()) == [1]
    assert cli.control()["version"] == 1  # type: ignore[index]
    assert all(
        shlex.split(line)[1] in COMMANDS for line in runbook("unfinished-down") if line[0] != "#"
    )
