"""One configuration: `[tool.bootmigrate]` in the project's pyproject.toml, read by the CLI from
anywhere in the project, below the environment and the flags; `bootmigrate config` says where
each value came from; `init` and `new` start a project from nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bootmigrate import migrate, pyproject_options


def bootmigrate(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI in ``cwd``, with none of the developer's own BOOTMIGRATE_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BOOTMIGRATE_", "MONGODB_"))}
    return subprocess.run(
        [sys.executable, "-m", "bootmigrate", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def sources(done: subprocess.CompletedProcess[str]) -> dict[str, tuple[Any, str]]:
    assert done.returncode == 0, done.stderr
    return {r["setting"]: (r["value"], r["from"]) for r in json.loads(done.stdout)["settings"]}


@pytest.fixture
def project(tmp_path: Path, sync_db: Any) -> Path:
    """A new project, started with `bootmigrate init` and one migration from `new`."""
    root = tmp_path / "service"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "service"\n')
    done = bootmigrate(root, "init", "--db", sync_db.name)
    assert done.returncode == 0, done.stderr
    assert bootmigrate(root, "new", "add email index").returncode == 0
    return root


def test_init_writes_the_section_and_the_package_and_new_a_typed_migration(
    project: Path, sync_db: Any
) -> None:
    text = (project / "pyproject.toml").read_text()
    assert text.startswith('[project]\nname = "service"\n')  # kept as it was
    assert f'[tool.bootmigrate]\nmigrations = "migrations"\ndb = "{sync_db.name}"\n' in text
    assert (project / "migrations" / "__init__.py").is_file()
    written = (project / "migrations" / "0001_add_email_index.py").read_text()
    assert "async def up(db: Any, ctx: MigrationContext) -> None:" in written

    again = bootmigrate(project / "migrations", "init")
    assert again.returncode == 1
    assert "already has a [tool.bootmigrate] section" in again.stderr
    as_json = bootmigrate(project, "init", "--json")
    assert (as_json.returncode, as_json.stderr) == (1, "")
    assert "already has" in json.loads(as_json.stdout)["error"]["message"]


def test_the_cli_works_from_anywhere_in_the_project(
    project: Path, mongo_uri: str, sync_db: Any
) -> None:
    """The section names the database and the migrations, relative to the project: a
    command run from a subdirectory finds both."""
    deeper = project / "src" / "service"
    deeper.mkdir(parents=True)
    (project / "migrations" / "0001_add_email_index.py").write_text(
        "async def up(db):\n    await db.users.create_index('email', unique=True)\n"
    )

    done = bootmigrate(deeper, "up", "--yes", "--uri", mongo_uri, "--json")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["applied"] == [1]
    assert sync_db.migrations.find_one({"_id": "control"})["version"] == 1


def test_flags_beat_the_environment_which_beats_the_section(
    project: Path, mongo_uri: str, sync_db: Any
) -> None:
    with (project / "pyproject.toml").open("a") as file:
        file.write('collection = "from_file"\nlease = 12\n')
    uri = mongo_uri.replace("://", "://user:secret@", 1)

    found = sources(
        bootmigrate(
            project,
            "config",
            "--json",
            "--uri",
            uri,
            "--collection",
            "from_flag",
            BOOTMIGRATE_DB="from_env",
        )
    )

    pyproject = str(project / "pyproject.toml")
    assert found["collection"] == ("from_flag", "flag")
    assert found["db"] == ("from_env", "environment")
    assert found["migrations"] == (str((project / "migrations").resolve()), pyproject)
    assert found["lease"] == (12, pyproject)
    assert found["driver"] == ("pymongo", "default")
    assert found["wait-timeout (up)"] == (300.0, "default")
    assert found["uri"][0] == mongo_uri.replace("://", "://user:***@", 1)  # no secret shown
    assert sources(bootmigrate(project, "config", "--json"))["db"] == (sync_db.name, pyproject)


@pytest.mark.parametrize(
    "section, fragment",
    [
        ('databse = "shop"\n', "has no setting 'databse'; the settings are: db, migrations"),
        ("lease = 'long'\n", "lease"),
    ],
    ids=["unknown key", "bad value"],
)
def test_a_bad_section_is_one_clear_error(project: Path, section: str, fragment: str) -> None:
    with (project / "pyproject.toml").open("a") as file:
        file.write(section)

    done = bootmigrate(project, "status", "--uri", "mongodb://127.0.0.1:1")

    assert done.returncode != 0
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_new_creates_the_directory_it_writes_into(tmp_path: Path) -> None:
    done = bootmigrate(tmp_path, "new", "first", "--migrations", "db/migrations")

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "db" / "migrations" / "0001_first.py").is_file()


@pytest.mark.anyio
async def test_the_library_reads_the_same_section_when_asked(project: Path, db: Any) -> None:
    with (project / "pyproject.toml").open("a") as file:
        file.write('collection = "schema"\nlease = 12\n')
    (project / "migrations" / "0001_add_email_index.py").write_text(
        "async def up(db):\n    await db.users.create_index('email', unique=True)\n"
    )

    options = pyproject_options(project / "migrations")  # found from below, too

    assert options == {
        "migrations": str((project / "migrations").resolve()),
        "collection": "schema",
        "lease": 12,
    }  # `db` is the CLI's: a service passes its own database
    events: list[Any] = []
    report = await migrate(db, **options, on_event=events.append)
    assert report.applied == [1]
    assert await db.schema.find_one({"_id": "control"}) is not None
    assert await db.schema_history.count_documents({"version": 1}) == 1
    [acquired] = [e for e in events if e.name == "acquired"]
    assert acquired.holder["lease"] == 12
