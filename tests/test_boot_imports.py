"""An up-to-date boot imports no migration module: versions come from the file names, and a
module is imported only when its step is about to run. A bad module that will not run blocks
nothing; one that will run is refused before the lock is taken."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from bootmigrate import (
    ControlLocked,
    InvalidMigrations,
    Migration,
    NotMigrated,
    UnsupportedUpgrade,
    migrate,
)
from bootmigrate.events import Event
from tests.in_process import dead_holder_lock
from tests.migration_files import write_migrations


async def noop(db: Any) -> None:
    """A step that does nothing: brings a database to a version without the files."""


def marking(marker: Path, version: int, tail: str) -> str:
    """A module that leaves ``marker/<version>`` behind the moment it is imported."""
    return (
        f"from pathlib import Path\nPath({str(marker)!r}, '{version}').touch()\n"
        + textwrap.dedent(tail)
    )


GOOD = "async def up(db):\n    await db.ran.insert_one({'ok': 1})\n"
RAISES = "raise RuntimeError('this module must not be imported')\n" + GOOD
SYNTAX_ERROR = "async def up(db:\n"


async def at_version(db: Any, version: int) -> None:
    """The database brought to ``version`` by in-code migrations (no file is read)."""
    await migrate(db, [Migration(v, noop, name=f"m{v}") for v in range(1, version + 1)])


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A directory where :func:`marking` modules leave a file when imported."""
    found = (tmp_path / "marker").resolve()
    found.mkdir()
    return found


def imported(marker: Path) -> list[str]:
    return sorted(p.name for p in marker.iterdir())


def our_modules(directory: Path) -> list[str]:
    """Step modules of ``directory`` in sys.modules (its package __init__ aside)."""
    stems = {p.stem for p in directory.glob("*.py") if not p.name.startswith("_")}
    return [name for name in sys.modules if any(name.endswith("_" + s) for s in stems)]


@pytest.mark.anyio
async def test_an_up_to_date_boot_imports_no_module_and_ignores_bad_ones(
    db: Any, tmp_path: Path, marker: Path
) -> None:
    migrations = write_migrations(
        tmp_path / "migrations",
        {
            "0001_fine.py": marking(marker, 1, GOOD),
            "0002_raises_at_import.py": marking(marker, 2, RAISES),
            "0003_syntax_error.py": SYNTAX_ERROR,
        },
    )
    await at_version(db, 3)
    seen: list[Event] = []

    report = await migrate(db, migrations, on_event=seen.append)

    assert (report.from_version, report.to_version, report.applied) == (3, 3, [])
    assert [e.name for e in seen if e.name == "up_to_date"] == ["up_to_date"]
    assert imported(marker) == []
    assert our_modules(migrations) == []


@pytest.mark.anyio
async def test_a_broken_module_that_will_run_is_refused_before_any_write(
    db: Any, tmp_path: Path, marker: Path
) -> None:
    migrations = write_migrations(
        tmp_path / "migrations",
        {
            "0001_applied_but_broken.py": marking(marker, 1, RAISES),
            "0002_fine.py": GOOD,
            "0003_broken.py": marking(marker, 3, RAISES),
        },
    )
    await at_version(db, 1)
    before = await db.migrations.find_one({"_id": "control"})
    history = await db.migrations_history.count_documents({})

    with pytest.raises(InvalidMigrations, match=r"0003_broken\.py failed to import"):
        await migrate(db, migrations)

    assert await db.migrations.find_one({"_id": "control"}) == before
    assert await db.migrations_history.count_documents({}) == history
    assert await db.ran.count_documents({}) == 0
    assert imported(marker) == ["3"]  # the applied one was never imported


@pytest.mark.anyio
async def test_only_the_modules_of_the_steps_to_run_are_imported(
    db: Any, tmp_path: Path, marker: Path
) -> None:
    migrations = write_migrations(
        tmp_path / "migrations",
        {f"000{v}_step.py": marking(marker, v, RAISES if v < 3 else GOOD) for v in (1, 2, 3, 4)},
    )
    await at_version(db, 2)

    report = await migrate(db, migrations)

    assert report.applied == [3, 4]
    assert imported(marker) == ["3", "4"]


@pytest.mark.anyio
@pytest.mark.parametrize("idempotent", [True, False])
async def test_a_takeover_reads_idempotent_from_the_dead_holders_module_only(
    db: Any, tmp_path: Path, marker: Path, idempotent: bool
) -> None:
    migrations = write_migrations(
        tmp_path / "migrations",
        {
            "0001_applied_but_broken.py": marking(marker, 1, RAISES),
            "0002_interrupted.py": marking(marker, 2, f"idempotent = {idempotent}\n" + GOOD),
        },
    )
    await dead_holder_lock(db, version=1, running=2)

    if idempotent:
        report = await migrate(db, migrations)
        assert (report.holder, report.applied) == (True, [2])
    else:
        with pytest.raises(ControlLocked, match="migration 2 step_2 was interrupted"):
            await migrate(db, migrations)
    assert imported(marker) == ["2"]


@pytest.mark.anyio
async def test_fresh_skip_runs_nothing_so_imports_nothing(
    db: Any, tmp_path: Path, marker: Path
) -> None:
    migrations = write_migrations(
        tmp_path / "migrations",
        {"0001_raises.py": marking(marker, 1, RAISES), "0002_syntax_error.py": SYNTAX_ERROR},
    )

    report = await migrate(db, migrations, fresh="skip")

    assert (report.to_version, report.applied) == (2, [])
    assert (await db.migrations.find_one({"_id": "control"}))["version"] == 2
    assert imported(marker) == []


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["directory", "package"])
async def test_floor_is_read_without_importing_the_steps(
    db: Any, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    package = f"floor_steps_{form}"
    migrations = write_migrations(
        tmp_path / package,
        {
            "__init__.py": "FLOOR = 5\nFLOOR_RELEASE = '2.0'\n",
            "0006_raises.py": marking(marker, 6, RAISES),
            "0007_syntax_error.py": SYNTAX_ERROR,
        },
    )
    source: Any = migrations
    if form == "package":
        monkeypatch.syspath_prepend(str(tmp_path))
        source = package
    await at_version(db, 2)

    with pytest.raises(UnsupportedUpgrade, match=r"2\.0"):
        await migrate(db, source)
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 7}})
    report = await migrate(db, source)

    assert report.to_version == 7
    assert imported(marker) == []
    assert not [m for m in sys.modules if m.startswith(f"{package}.")]
    sys.modules.pop(package, None)


BOOT = """
import asyncio, sys
from bootmigrate import migrate
from tests.clients import open_client

async def main(driver, uri, name, migrations):
    async with open_client(driver, uri) as client:
        report = await migrate(client[name], migrations)
    steps = [m for m in sys.modules if m.startswith("_bootmigrate_") and "package" not in m]
    print(report.to_version, len(steps))

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.anyio
async def test_a_fresh_process_boot_on_an_up_to_date_database_imports_no_module(
    db: Any, driver: str, mongo_uri: str, tmp_path: Path, marker: Path
) -> None:
    migrations = write_migrations(
        tmp_path / "migrations",
        {f"{v:04d}_step.py": marking(marker, v, GOOD) for v in range(1, 21)},
    )
    await at_version(db, 20)

    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-c", BOOT, driver, mongo_uri, db.name, str(migrations)],
            check=False,
            cwd=Path(__file__).parent.parent,
        )

    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["20", "0"]
    assert imported(marker) == []


@pytest.mark.anyio
async def test_a_wait_only_boot_with_work_pending_imports_nothing(
    db: Any, tmp_path: Path, marker: Path
) -> None:
    """A wait-only replica never runs a step, so it imports none, even a broken one."""
    migrations = write_migrations(
        tmp_path / "migrations",
        {
            "0001_fine.py": marking(marker, 1, GOOD),
            "0002_raises_at_import.py": marking(marker, 2, RAISES),
        },
    )
    await at_version(db, 1)

    with pytest.raises(NotMigrated):  # it waited, and nothing migrated the database
        await migrate(db, migrations, apply=False, wait_timeout=0.5)

    assert imported(marker) == []
    assert our_modules(migrations) == []
