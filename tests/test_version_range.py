"""Semantic 9: too old refuses with the way through; ahead boots (or refuses) and never
migrates down on its own."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import DatabaseAhead, InvalidMigrations, UnsupportedUpgrade, migrate
from bootmigrate.migrations import declared_floor
from tests.in_process import control, ran, recorders
from tests.migration_files import write_migrations

pytestmark = pytest.mark.anyio


async def test_database_older_than_the_floor_is_refused(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 5})

    with pytest.raises(UnsupportedUpgrade) as caught:
        await migrate(db, recorders(20, 21, 22))

    message = str(caught.value)
    assert "at version 5" in message and "version 19" in message
    assert "bootmigrate set-version 19" in message
    assert await ran(db) == []
    assert await control(db) == {"_id": "control", "locked": False, "version": 5}


async def test_an_explicit_floor_allows_an_older_database(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 5})

    report = await migrate(db, recorders(20, 21), floor=5)

    assert report.applied == [20, 21]


async def test_fresh_database_is_never_below_the_floor(db: Any) -> None:
    report = await migrate(db, recorders(20, 21))

    assert report.applied == [20, 21]


async def test_database_ahead_boots_with_a_warning_and_migrates_nothing(
    db: Any, bootmigrate_log: Any
) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 9})

    report = await migrate(db, recorders(1, 2, 3))

    assert (report.ahead, report.from_version, report.to_version) == (True, 9, 9)
    assert bootmigrate_log.has("ahead of this build's latest migration (3)")
    assert await ran(db) == []
    assert (await control(db) or {})["version"] == 9


async def test_database_ahead_is_refused_when_asked(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 9})

    with pytest.raises(DatabaseAhead, match="on_ahead='error'"):
        await migrate(db, recorders(1, 2, 3), on_ahead="error")


async def test_a_lower_target_from_an_unknown_version_is_refused(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 9})

    with pytest.raises(DatabaseAhead, match="cannot migrate down"):
        await migrate(db, recorders(1, 2, 3), target=2)


async def test_down_without_down_steps_is_refused_before_locking(db: Any) -> None:
    await migrate(db, recorders(1, 2, down=False))
    before = await control(db)

    with pytest.raises(InvalidMigrations, match="no `down` in 0002 step_2, 0001 step_1"):
        await migrate(db, recorders(1, 2, down=False), target=0)

    assert await control(db) == before


async def test_a_floor_declared_in_the_package_names_the_release_to_pass_through(
    db: Any, tmp_path: Any
) -> None:
    folder = write_migrations(
        tmp_path,
        {
            "__init__.py": 'FLOOR = 233\nFLOOR_RELEASE = "6.0"\n',
            "0234_add_index.py": "async def up(db):\n    await db.ran.insert_one({'v': 234})\n",
        },
    )
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 200})

    with pytest.raises(UnsupportedUpgrade) as caught:
        await migrate(db, folder)

    assert "at version 200, older than version 233" in str(caught.value)
    assert "Upgrade through release 6.0 first" in str(caught.value)
    assert await ran(db) == []
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 233}})
    assert (await migrate(db, folder)).applied == [234]


async def test_an_explicit_floor_overrides_the_declared_one(db: Any, tmp_path: Any) -> None:
    folder = write_migrations(
        tmp_path,
        {
            "__init__.py": "FLOOR = 233\n",
            "0234_add_index.py": "async def up(db):\n    pass\n",
        },
    )
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 200})

    assert (await migrate(db, folder, floor=200)).applied == [234]


def test_a_malformed_declared_floor_is_refused(tmp_path: Any) -> None:
    write_migrations(tmp_path, {"__init__.py": 'FLOOR = "233"\n'})

    with pytest.raises(InvalidMigrations, match=r"FLOOR in .* must be a non-negative version"):
        declared_floor(tmp_path)
