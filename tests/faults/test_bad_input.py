"""Scenario 8: bad input. Each case gets its exact error, and nothing is written: every
collection of the database is the same before and after."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from bootmigrate import (
    DatabaseAhead,
    InvalidControlDocument,
    InvalidMigrations,
    Migration,
    MigrationFailed,
    UnsupportedUpgrade,
    migrate,
)
from tests.faults.conftest import record
from tests.in_process import recorders
from tests.migration_files import write_migrations

pytestmark = pytest.mark.anyio

CONTROL_SHAPES = [
    ({}, "`locked` must be true or false, got None"),
    ({"version": 3}, "`locked` must be true or false, got None"),
    ({"locked": False}, "`version` must be a non-negative integer, got None"),
    ({"locked": "false", "version": 3}, "`locked` must be true or false, got 'false'"),
    ({"locked": 0, "version": 3}, "`locked` must be true or false, got 0"),
    ({"locked": None, "version": 3}, "`locked` must be true or false, got None"),
    ({"locked": False, "version": "3"}, "non-negative integer, got '3'"),
    ({"locked": False, "version": 3.0}, "non-negative integer, got 3.0"),
    ({"locked": False, "version": 3.5}, "non-negative integer, got 3.5"),
    ({"locked": False, "version": -1}, "non-negative integer, got -1"),
    ({"locked": False, "version": True}, "non-negative integer, got True"),
    ({"locked": False, "version": [3]}, "non-negative integer, got [3]"),
    ({"locked": True, "version": 3, "token": "x"}, "`token` must be an integer, got 'x'"),
    ({"locked": True, "version": 3, "beats": 1.5}, "`beats` must be an integer, got 1.5"),
    ({"locked": True, "version": 3, "heartbeat": "now"}, "`heartbeat` must be a date"),
    ({"locked": True, "version": 3, "locked_at": 12}, "`locked_at` must be a date"),
    ({"locked": True, "version": 3, "owner": "me"}, "`owner` must be a sub-document"),
    ({"locked": True, "version": 3, "running": 4}, "`running` must be a sub-document"),
    ({"locked": True, "version": 3, "failure": "boom"}, "`failure` must be a sub-document"),
]


# Held by a holder silent for years, so that a waiter would judge its lease at once.
LONG_AGO = datetime(2020, 1, 1)
OWNER = {"host": "h", "pid": 1, "build": None, "lease": 30.0, "id": "someone"}
HELD = {"locked": True, "version": 3, "token": 5, "beats": 2, "heartbeat": LONG_AGO}

# Shapes whose fields a decision reads: each was once a raw KeyError or ValueError, a takeover
# on a lease of 0, or a wait on a lease that is not a number.
HELD_SHAPES = [
    (
        {**HELD, "owner": OWNER, "running": {"name": "step_4", "direction": "up"}},
        "`running.version` must be the integer version of the migration in progress, got None",
    ),
    (
        {**HELD, "owner": OWNER, "running": {"version": "4", "name": "step_4"}},
        "`running.version` must be the integer version of the migration in progress, got '4'",
    ),
    (
        {**HELD, "owner": {**OWNER, "lease": "abc"}},
        "`owner.lease` must be a positive number of seconds, got 'abc'",
    ),
    ({**HELD, "owner": {**OWNER, "lease": 0}}, "`owner.lease` must be a positive number"),
    ({**HELD, "owner": {**OWNER, "lease": -30}}, "`owner.lease` must be a positive number"),
    ({**HELD, "owner": {**OWNER, "lease": True}}, "`owner.lease` must be a positive number"),
    (
        {**HELD, "owner": {**OWNER, "lease": float("inf")}},
        "`owner.lease` must be a positive number",
    ),
    (
        {**HELD, "failure": {"kind": "failed", "version": "x", "build": "b1"}},
        "`failure.version` must be the integer version of the migration that failed, got 'x'",
    ),
]


async def everything(db: Any) -> dict[str, list[dict[str, Any]]]:
    names = sorted(await db.list_collection_names())
    return {name: await db[name].find({}, sort=[("_id", 1)]).to_list(None) for name in names}


@pytest.mark.parametrize(("shape", "message"), CONTROL_SHAPES)
async def test_malformed_control_documents(db: Any, shape: dict[str, Any], message: str) -> None:
    await db.migrations.insert_one({"_id": "control", **shape})
    before = await everything(db)

    with pytest.raises(InvalidControlDocument, match=re.escape(message)):
        await migrate(db, recorders(1, 2, 3, 4))

    record("8 bad input", cases=1, changed=int(await everything(db) != before))
    assert await everything(db) == before


@pytest.mark.parametrize(("shape", "message"), HELD_SHAPES)
async def test_malformed_lock_fields(db: Any, shape: dict[str, Any], message: str) -> None:
    await db.migrations.insert_one({"_id": "control", **shape})
    before = await everything(db)

    with anyio.fail_after(10), pytest.raises(InvalidControlDocument, match=re.escape(message)):
        await migrate(
            db, recorders(1, 2, 3, 4), wait_timeout=2, build="b2", retry_failed_on_new_build=True
        )

    record("8 bad input", cases=1, changed=int(await everything(db) != before))
    assert await everything(db) == before


async def test_unknown_extra_fields_are_tolerated(db: Any) -> None:
    await db.migrations.insert_one(
        {"_id": "control", "locked": False, "version": 1, "app": "chat", "notes": ["by hand"]}
    )

    report = await migrate(db, recorders(1, 2))

    assert report.applied == [2]
    doc = await db.migrations.find_one({"_id": "control"})
    assert (doc["app"], doc["notes"]) == ("chat", ["by hand"])


async def test_gapped_versions_are_fine(db: Any) -> None:
    assert (await migrate(db, recorders(2, 7, 30))).applied == [2, 7, 30]


GOOD = "async def up(db):\n    await db.ran.insert_one({})\n"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0001_a.py": GOOD, "0001_b.py": GOOD}, "version 1 is declared twice"),
        (
            {"0001_a.py": GOOD, "0002_b.py": "import missing_module_xyz\n" + GOOD},
            "0002_b.py failed to import: ModuleNotFoundError",
        ),
        (
            {"0001_a.py": GOOD, "0002_b.py": "def up(db):\n    pass\n"},
            "`up` must be declared `async def up(db)`",
        ),
        ({"0001_a.py": GOOD, "0002_b.py": "up = 3\n"}, "`up` is not callable"),
        ({"0001_a.py": GOOD, "0002_b.py": "x = 1\n"}, "defines no `async def up(db)`"),
        ({"0001_a.py": GOOD, "notes.py": GOOD}, "notes.py has no version prefix"),
        (
            {"0001_a.py": GOOD, "0002_b.py": "timeout = -1\n" + GOOD},
            "timeout must be a positive number",
        ),
        ({"0001_a.py": GOOD, "0002_b.py": "syntax error here\n"}, "0002_b.py failed to import"),
    ],
)
async def test_bad_migration_sets(
    db: Any, tmp_path: Path, files: dict[str, str], message: str
) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 0})
    before = await everything(db)

    with pytest.raises(InvalidMigrations, match=re.escape(message)):
        await migrate(db, write_migrations(tmp_path, files))

    record("8 bad input", cases=1, changed=int(await everything(db) != before))
    assert await everything(db) == before


async def test_database_below_the_floor(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 4})
    before = await everything(db)

    with pytest.raises(UnsupportedUpgrade, match="at version 4, older than version 9"):
        await migrate(db, recorders(10, 11))

    record("8 bad input", cases=1, changed=int(await everything(db) != before))
    assert await everything(db) == before


async def test_database_ahead_refused(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 12})
    before = await everything(db)

    with pytest.raises(DatabaseAhead, match=r"at version 12, ahead of this build's latest"):
        await migrate(db, recorders(10, 11), on_ahead="error")

    record("8 bad input", cases=1, changed=int(await everything(db) != before))
    assert await everything(db) == before


async def only_the_failure_was_written(db: Any, before: dict[str, Any], version: int) -> None:
    after = await everything(db)
    control = after["migrations"][0]
    assert (control["locked"], control["version"], control["failure"]["version"]) == (
        True,
        0,
        version,
    )
    assert [(h["version"], h["outcome"]) for h in after["migrations_history"]] == [
        (version, "failed")
    ]
    assert {k: v for k, v in after.items() if not k.startswith("migrations")} == {
        k: v for k, v in before.items() if not k.startswith("migrations")
    }


async def test_up_that_returns_a_value(db: Any) -> None:
    async def returns(db: Any) -> int:
        return 42

    before = await everything(db)
    with pytest.raises(MigrationFailed, match="up returned 42; a migration step must return None"):
        await migrate(db, [Migration(1, returns, name="returns")])

    await only_the_failure_was_written(db, before, 1)


async def test_a_huge_error_message_is_stored_capped(db: Any) -> None:
    async def shouts(db: Any) -> None:
        raise RuntimeError("x" * 1_000_000)

    before = await everything(db)
    with pytest.raises(MigrationFailed) as caught:
        await migrate(db, [Migration(1, shouts, name="shouts")])

    await only_the_failure_was_written(db, before, 1)
    failure = (await db.migrations.find_one({"_id": "control"}))["failure"]
    (record_,) = await db.migrations_history.find().to_list(None)
    for stored in (failure, record_):
        assert stored["error"].startswith("RuntimeError: xxx")
        assert len(stored["error"]) <= 1100
        assert "more characters not kept" in stored["error"]
        # The tail still locates the failure: the message's line is cut, not the frames.
        assert len(stored["traceback"]) <= 2000
        assert "in shouts" in stored["traceback"]
    assert len(caught.value.error) <= 1100


async def test_a_migration_that_hangs(db: Any) -> None:
    async def hangs(db: Any) -> None:
        await anyio.sleep_forever()

    before = await everything(db)
    with anyio.fail_after(10), pytest.raises(MigrationFailed, match=r"timeout of 0\.5 s"):
        await migrate(db, [Migration(1, hangs, name="hangs")], migration_timeout=0.5)

    await only_the_failure_was_written(db, before, 1)
