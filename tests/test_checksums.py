"""Checksums of applied migrations: validate() and migrate(validate=True) find code that
changed or disappeared after it ran, and run nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bootmigrate import InvalidMigrations, Migration, migrate
from bootmigrate.commands import validate
from tests.migration_files import write_migrations

pytestmark = pytest.mark.anyio

STEP = "async def up(db):\n    await db.ran.insert_one({{'v': {v}}})\n"


def three(tmp_path: Path) -> Path:
    return write_migrations(tmp_path, {f"000{v}_step_{v}.py": STEP.format(v=v) for v in (1, 2, 3)})


async def test_history_records_a_checksum_of_each_applied_migration(
    db: Any, tmp_path: Path
) -> None:
    await migrate(db, three(tmp_path))

    records = await db.migrations_history.find({}, sort=[("version", 1)]).to_list(None)
    assert all(len(r["checksum"]) == 64 for r in records)
    assert len({r["checksum"] for r in records}) == 3
    assert await validate(db, tmp_path) == []


async def test_a_changed_and_a_vanished_migration_are_reported(db: Any, tmp_path: Path) -> None:
    folder = three(tmp_path)
    await migrate(db, folder)
    (folder / "0002_step_2.py").write_text(STEP.format(v=22))
    (folder / "0003_step_3.py").unlink()
    write_migrations(folder, {"0004_step_4.py": STEP.format(v=4)})

    drift = await validate(db, folder)

    assert [(d.version, d.problem) for d in drift] == [(2, "changed"), (3, "missing")]
    assert drift[0].current and drift[0].current != drift[0].recorded


async def test_migrations_dropped_below_the_floor_are_not_reported(db: Any, tmp_path: Path) -> None:
    folder = three(tmp_path)
    await migrate(db, folder)
    (folder / "0001_step_1.py").unlink()

    assert await validate(db, folder) == []


async def test_migrate_with_validate_refuses_and_writes_nothing(db: Any, tmp_path: Path) -> None:
    folder = three(tmp_path)
    await migrate(db, folder, target=2)
    (folder / "0001_step_1.py").write_text(STEP.format(v=11))
    before = await db.migrations.find_one({"_id": "control"})

    with pytest.raises(InvalidMigrations, match="migration 1 step_1 changed since it was applied"):
        await migrate(db, folder, validate=True)

    assert await db.migrations.find_one({"_id": "control"}) == before
    assert await db.ran.count_documents({"v": 3}) == 0


async def test_migrations_made_in_code_have_checksums_too(db: Any) -> None:
    async def up(db: Any) -> None:
        await db.ran.insert_one({})

    migration = Migration(version=1, up=up, name="in_code")
    await migrate(db, [migration])

    record = await db.migrations_history.find_one({"version": 1})
    assert record["checksum"] == migration.checksum and len(migration.checksum) == 64
