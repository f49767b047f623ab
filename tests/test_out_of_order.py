"""No silent skips: a known migration below the database's version that never ran (merged
after a higher one had run) is refused, or run once when allowed; skips are recorded, so a
skip is never mistaken for one; an up-to-date boot checks all this from its file names, with
no read beyond the control document."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bootmigrate import (
    ControlLocked,
    InvalidControlDocument,
    Migration,
    MigrationFailed,
    OutOfOrder,
    migrate,
)
from bootmigrate.commands import set_version, skip, status, unlock, validate
from tests.clients import open_client
from tests.command_monitor import CommandLog
from tests.in_process import (
    control,
    dead_holder_lock,
    failing,
    history,
    ran,
    recorder,
    recorders,
)
from tests.migration_files import STEP, write_migrations
from tests.test_lock import lock_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def watched(
    driver: str, mongo_uri: str, db_name: str
) -> AsyncIterator[tuple[Any, CommandLog]]:
    """The test's database on a client whose commands are logged."""
    commands = CommandLog()
    async with open_client(driver, mongo_uri, event_listeners=[commands]) as client:
        db = client[db_name]
        try:
            yield db, commands
        finally:
            await client.drop_database(db_name)


async def commands_of_a_boot(db: Any, commands: CommandLog, migrations: Any) -> list[str]:
    """The commands one ``migrate()`` sends, with the database up to date."""
    commands.clear()
    report = await migrate(db, migrations)
    assert report.applied == []
    return commands.names()


async def test_a_migration_merged_late_is_refused_and_nothing_is_written(db: Any) -> None:
    await migrate(db, recorders(1, 2, 4))
    before = (await control(db), await history(db))

    with pytest.raises(OutOfOrder) as refused:
        await migrate(db, recorders(1, 2, 3, 4, 5))

    assert refused.value.missing.keys() == {3}
    message = str(refused.value)
    assert "migration 3" in message and "below the database's version 4" in message
    assert "bootmigrate up --out-of-order" in message and "bootmigrate skip 3" in message
    assert (await control(db), await history(db)) == before
    assert await ran(db) == [(1, "up"), (2, "up"), (4, "up")]


async def test_the_refusal_names_the_file(db: Any, tmp_path: Path) -> None:
    steps = {f"000{v}_step_{v}.py": STEP.format(v=v) for v in (1, 2, 4)}
    folder = write_migrations(tmp_path / "migrations", steps)
    await migrate(db, str(folder))
    write_migrations(folder, {"0003_backfill.py": STEP.format(v=3)})

    with pytest.raises(OutOfOrder, match=r"migration 3 \(.*0003_backfill\.py\)"):
        await migrate(db, str(folder))


async def test_an_up_to_date_boot_checks_from_the_file_names_with_one_read(
    watched: tuple[Any, CommandLog],
) -> None:
    db, commands = watched
    await migrate(db, recorders(1, 2, 4))

    assert await commands_of_a_boot(db, commands, recorders(1, 2, 4)) == ["find"]
    commands.clear()
    with pytest.raises(OutOfOrder):
        await migrate(db, recorders(1, 2, 3, 4))
    # The ledger disagrees with the file names: the history is read, once.
    assert commands.names() == ["find", "find"]


async def test_allowed_it_runs_once_first_and_leaves_the_version(
    watched: tuple[Any, CommandLog],
) -> None:
    db, commands = watched
    await migrate(db, recorders(1, 2, 4))

    report = await migrate(db, recorders(1, 2, 3, 4, 5), allow_out_of_order=True)

    assert report.applied == [3, 5]
    assert await ran(db) == [(1, "up"), (2, "up"), (4, "up"), (3, "up"), (5, "up")]
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 5)
    late = [r for r in await history(db) if r["version"] == 3]
    assert [(r["outcome"], r["direction"]) for r in late] == [("applied", "up")]
    assert late[0]["note"] == "out of order: the database was at version 4"
    # Counted in the ledger: the next boot, allowed or not, runs nothing and reads once.
    assert await commands_of_a_boot(db, commands, recorders(1, 2, 3, 4, 5)) == ["find"]


async def test_allowed_with_nothing_else_pending(db: Any) -> None:
    await migrate(db, recorders(1, 2, 4))

    report = await migrate(db, recorders(1, 2, 3, 4), allow_out_of_order=True)

    assert (report.applied, report.from_version, report.to_version) == ([3], 4, 4)
    assert await migrate(db, recorders(1, 2, 3, 4)) is not None


async def test_a_transactional_migration_merged_late_is_counted_in_its_transaction(
    watched: tuple[Any, CommandLog],
) -> None:
    db, commands = watched
    await migrate(db, recorders(1, 3))
    late = Migration(version=2, up=recorder(2).up, name="step_2", transactional=True)

    report = await migrate(db, [recorder(1), late, recorder(3)], allow_out_of_order=True)

    assert report.applied == [2]
    assert await commands_of_a_boot(db, commands, [recorder(1), late, recorder(3)]) == ["find"]


async def test_a_rocket_chat_database_with_no_history_raises_no_alarm(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 20})

    report = await migrate(db, recorders(10, 20, 30))

    assert report.applied == [30]
    baseline = [r for r in await history(db) if r.get("action") == "baseline"]
    assert [(r["outcome"], r["versions"]) for r in baseline] == [("skipped", [10, 20])]
    # From here on the ledger knows the files of that day: one merged late is caught.
    with pytest.raises(OutOfOrder) as refused:
        await migrate(db, recorders(10, 15, 20, 30))
    assert refused.value.missing.keys() == {15}


async def test_a_database_from_before_the_ledger_gets_one_at_its_next_boot(
    watched: tuple[Any, CommandLog], bootmigrate_log: Any
) -> None:
    """Written by a bootmigrate that kept no ledger, with 3 never recorded (a hand skip, or a
    gap: nothing tells them apart): taken as it stands, never refused; the first boot reads
    the history once and writes the ledger, the next ones read only the control document."""
    db, commands = watched
    await migrate(db, recorders(1, 2, 4))
    await db.migrations.update_one({"_id": "control"}, {"$unset": {"applied": ""}})
    known = recorders(1, 2, 3, 4)

    first = await commands_of_a_boot(db, commands, known)

    assert first[:2] == ["find", "find"] and first.count("update") == 1, first
    baseline = [r for r in await history(db) if r.get("action") == "baseline"]
    assert [(r["outcome"], r["versions"]) for r in baseline] == [("skipped", [3])]
    assert bootmigrate_log.has("brought the ledger of applied migrations up to date")
    assert await commands_of_a_boot(db, commands, known) == ["find"]
    assert (await status(db, known)).state == "up-to-date"


async def test_a_build_that_dropped_old_files_and_adds_none_reads_the_history_once(
    watched: tuple[Any, CommandLog],
) -> None:
    db, commands = watched
    await migrate(db, recorders(1, 2, 3))

    first = await commands_of_a_boot(db, commands, recorders(2, 3))

    assert first == ["find", "find", "update"], first
    assert await commands_of_a_boot(db, commands, recorders(2, 3)) == ["find"]
    # The build that still ships them agrees with the ledger too.
    assert await commands_of_a_boot(db, commands, recorders(1, 2, 3)) == ["find"]


async def test_a_failed_out_of_order_migration_stays_its_own_problem(db: Any) -> None:
    await migrate(db, recorders(1, 2, 4))
    known = [*recorders(1, 2), failing(3), *recorders(4)]

    with pytest.raises(MigrationFailed, match=r"bootmigrate up --out-of-order"):
        await migrate(db, known, allow_out_of_order=True)
    # A boot that does not allow it names the stuck lock, not a migration never tried.
    with pytest.raises(ControlLocked) as stuck:
        await migrate(db, known)
    assert stuck.value.reason == "stuck"

    await unlock(db)
    with pytest.raises(ControlLocked, match=r"bootmigrate skip 3` if it is complete"):
        await migrate(db, known)
    report = await migrate(db, recorders(1, 2, 3, 4), allow_out_of_order=True)
    assert (report.applied, report.to_version) == ([3], 4)


async def test_records_stamped_by_skewed_clocks_still_count(db: Any) -> None:
    """Applied, reverted from a laptop whose clock runs ahead, applied again: in effect."""
    await migrate(db, recorders(1))
    stamps = [datetime(2026, 1, 1, 12, m) for m in (0, 20, 10)]
    for direction, at in zip(("up", "down", "up"), stamps, strict=True):
        await db.migrations_history.insert_one(
            {"version": 2, "direction": direction, "outcome": "applied", "finished_at": at}
        )

    history_says = await lock_for(db, "reader").history.in_effect(0, 5)

    assert history_says.done == {1, 2}


async def test_set_version_records_each_skipped_version(db: Any) -> None:
    await migrate(db, recorders(1))

    await set_version(db, 3, recorders(1, 2, 3, 4))

    record = (await history(db))[-1]
    assert (record["action"], record["outcome"]) == ("set-version", "skipped")
    assert (record["from_version"], record["versions"]) == (1, [2, 3])
    assert (await migrate(db, recorders(1, 2, 3, 4))).applied == [4]
    assert await ran(db) == [(1, "up"), (4, "up")]


async def test_a_version_set_by_hand_is_a_skip_not_a_gap(
    watched: tuple[Any, CommandLog],
) -> None:
    """Rocket.Chat's documented skip: `version` raised by hand in the shell. The first boot
    after it reads the history, records the skip, and brings the ledger up to date."""
    db, commands = watched
    await migrate(db, recorders(1, 2))
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 3}})

    first = await commands_of_a_boot(db, commands, recorders(1, 2, 3))
    report = await migrate(db, recorders(1, 2, 3, 4))

    assert first == ["find", "find", "insert", "update"], first
    assert report.applied == [4]
    by_hand = [r for r in await history(db) if r.get("action") == "set-by-hand"]
    assert [(r["outcome"], r["versions"]) for r in by_hand] == [("skipped", [3])]
    assert await commands_of_a_boot(db, commands, recorders(1, 2, 3, 4)) == ["find"]


async def test_a_version_moved_by_a_bootmigrate_that_keeps_no_ledger_is_checked(db: Any) -> None:
    """An older bootmigrate applied 4 (during a rolling upgrade, or an old CLI): the ledger
    stayed at 2. A late 3 below 4 is no hand skip: the history shows 4 ran."""
    await migrate(db, recorders(1, 2))
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 4}})
    await db.migrations_history.insert_one(
        {"version": 4, "direction": "up", "outcome": "applied", "name": "step_4"}
    )

    with pytest.raises(OutOfOrder) as refused:
        await migrate(db, recorders(1, 2, 3, 4))

    assert refused.value.missing.keys() == {3}
    assert (await status(db, recorders(1, 2, 3, 4))).state == "out-of-order"


async def test_a_second_hand_skip_of_other_versions_is_recorded_too(db: Any) -> None:
    await migrate(db, recorders(1, 2))
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 4}})
    await migrate(db, recorders(1, 2, 3, 4))  # records 3 and 4 as set by hand
    await migrate(db, recorders(1, 2, 3, 4), target=2)  # their downs run
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 4}})

    await migrate(db, recorders(1, 2, 3, 4, 5))

    by_hand = [r["versions"] for r in await history(db) if r.get("action") == "set-by-hand"]
    assert by_hand == [[3, 4], [3, 4]]
    assert (await status(db, recorders(1, 2, 3, 4, 5))).state == "up-to-date"


async def test_a_dead_holder_inside_an_out_of_order_migration_is_named_within_a_lease(
    db: Any,
) -> None:
    """A replica that does not run out-of-order migrations does not wait out its timeout on
    a dead holder that did: once it has watched it silent for its lease, it says so."""
    await migrate(db, recorders(1, 2, 4))
    ledger = (await control(db) or {})["applied"]
    await dead_holder_lock(db, version=4, running=3, acquisition="a1")
    await db.migrations.update_one(
        {"_id": "control"}, {"$set": {"unfinished.to_version": 4, "applied": ledger}}
    )

    with pytest.raises(ControlLocked, match="bootmigrate up --out-of-order") as refused:
        await migrate(db, recorders(1, 2, 3, 4), wait_timeout=60)

    assert refused.value.reason == "unfinished"
    assert "bootmigrate skip 3" in str(refused.value)


async def test_a_fresh_skip_records_what_it_skipped(db: Any) -> None:
    await migrate(db, recorders(1, 2, 4), fresh="skip")

    record = (await history(db))[-1]
    assert (record["outcome"], record["versions"]) == ("skipped", [1, 2, 4])
    with pytest.raises(OutOfOrder) as refused:
        await migrate(db, recorders(1, 2, 3, 4))
    assert refused.value.missing.keys() == {3}


async def test_skip_records_a_late_migration_that_must_not_run(db: Any) -> None:
    await migrate(db, recorders(1, 2, 4))
    known = recorders(1, 2, 3, 4)

    assert await skip(db, known, [3]) == [3]

    assert (await migrate(db, known)).applied == []
    assert await ran(db) == [(1, "up"), (2, "up"), (4, "up")]
    assert (await status(db, known)).state == "up-to-date"
    assert await validate(db, known) == []


async def test_status_and_validate_report_it(db: Any) -> None:
    await migrate(db, recorders(1, 2, 4))
    known = recorders(1, 2, 3, 4)

    found = await status(db, known)
    drift = await validate(db, known)

    assert found.state == "out-of-order"
    assert [m.version for m in found.out_of_order] == [3]
    assert found.as_json()["out_of_order"][0]["version"] == 3
    assert [(d.version, d.problem) for d in drift] == [(3, "out_of_order")]


async def test_a_build_that_dropped_old_files_refuses_nothing(
    watched: tuple[Any, CommandLog],
) -> None:
    db, commands = watched
    await migrate(db, recorders(1, 2, 3))

    report = await migrate(db, recorders(2, 3, 4))

    assert report.applied == [4]
    # The run that migrated moved the ledger's start: boots no longer read the history.
    assert await commands_of_a_boot(db, commands, recorders(2, 3, 4)) == ["find"]


async def test_a_malformed_ledger_is_refused_with_its_fix(db: Any) -> None:
    await migrate(db, recorders(1))
    await db.migrations.update_one({"_id": "control"}, {"$set": {"applied.count": "three"}})

    with pytest.raises(InvalidControlDocument, match=r"\$unset: \{applied: 1\}"):
        await migrate(db, recorders(1, 2))


async def test_a_wait_only_call_leaves_a_stale_ledger_as_it_is(db: Any) -> None:
    """Wait-only replicas never write: the ledger waits for a call that may."""
    await migrate(db, recorders(1, 2))
    await db.migrations.update_one({"_id": "control"}, {"$unset": {"applied": ""}})
    before = (await control(db), await history(db))

    report = await migrate(db, recorders(1, 2), apply=False)

    assert report.to_version == 2
    assert (await control(db), await history(db)) == before
