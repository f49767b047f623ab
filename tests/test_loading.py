"""Loading migrations from a directory, a package, or objects; bad sets are refused whole."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from bootmigrate import InvalidMigrations, Migration, load_migrations, migrate
from tests.migration_files import write_migrations

GOOD = "async def up(db):\n    await db.ran.insert_one({'ok': 1})\n"


def test_directory_is_loaded_in_version_order_with_names(tmp_path: Path) -> None:
    write_migrations(
        tmp_path,
        {
            "0002_add_index.py": '"""Add the email index."""\n' + GOOD,
            "0001_create_users.py": GOOD + "async def down(db):\n    pass\n",
            "__init__.py": "",
            "_helpers.py": "",
        },
    )

    loaded = load_migrations(tmp_path)

    assert [(m.version, m.name) for m in loaded] == [(1, "create_users"), (2, "add_index")]
    assert loaded[0].down is not None and loaded[1].down is None
    assert loaded[1].description == "Add the email index."
    assert loaded[0].description == "create users"


def test_idempotent_module_attribute_is_read(tmp_path: Path) -> None:
    write_migrations(tmp_path, {"0001_x.py": "idempotent = True\n" + GOOD})

    assert load_migrations(tmp_path)[0].idempotent is True


def test_package_by_dotted_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_migrations(
        tmp_path / "shop_migrations",
        {"__init__.py": "", "0001_first.py": GOOD, "0003_third.py": GOOD},
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    loaded = load_migrations("shop_migrations")

    assert [m.version for m in loaded] == [1, 3]
    sys.modules.pop("shop_migrations", None)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0001_a.py": GOOD, "001_b.py": GOOD}, "version 1 is declared twice"),
        ({"create_users.py": GOOD}, "has no version prefix; name it like 0001_create_users.py"),
        ({"0001_a.py": "x = 1\n"}, "defines no `async def up(db)`"),
        ({"0001_a.py": "def up(db):\n    pass\n"}, "must be declared `async def up(db)`"),
        ({"0001_a.py": GOOD + "def down(db):\n    pass\n"}, "`down` must be declared"),
        ({"0001_a.py": "async def up(db, ctx, extra):\n    pass\n"}, "takes 3 positional"),
        ({"0001_a.py": "import no_such_module_here\n" + GOOD}, "0001_a.py failed to import"),
        ({"0000_a.py": GOOD}, "version must be a positive int"),
    ],
)
def test_bad_migration_files_are_refused_naming_the_file(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    write_migrations(tmp_path, files)

    with pytest.raises(InvalidMigrations, match=re.escape(message)):
        load_migrations(tmp_path)


def test_a_source_that_is_neither_directory_nor_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidMigrations, match="neither a directory nor an importable package"):
        load_migrations(str(tmp_path / "missing" / "dir"))


def test_duplicate_migration_objects_are_refused() -> None:
    async def up(db: Any) -> None:
        pass

    with pytest.raises(InvalidMigrations, match="version 4 is declared twice"):
        load_migrations([Migration(4, up, name="a"), Migration(4, up, name="b")])


def test_sync_up_in_a_migration_object_is_refused() -> None:
    def up(db: Any) -> None:
        pass

    with pytest.raises(InvalidMigrations, match="async def up"):
        load_migrations([Migration(1, up)])


@pytest.mark.anyio
async def test_nothing_is_written_when_loading_fails(db: Any, tmp_path: Path) -> None:
    write_migrations(tmp_path, {"0001_a.py": GOOD, "0002_b.py": "raise RuntimeError('bad')\n"})

    with pytest.raises(InvalidMigrations, match=r"0002_b\.py failed to import"):
        await migrate(db, tmp_path)

    assert await db.list_collection_names() == []


@pytest.mark.anyio
async def test_a_synchronous_database_is_refused_with_the_fix() -> None:
    from pymongo import MongoClient

    client: Any = MongoClient("mongodb://127.0.0.1:1/", connect=False)
    with pytest.raises(TypeError, match=r"use pymongo\.AsyncMongoClient instead"):
        await migrate(client["x"], [])
    client.close()
