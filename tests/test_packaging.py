"""The distributions as a user gets them: the wheel and the sdist are built from this tree and
checked (`twine check`, the licence, `py.typed`, the metadata), and the wheel, installed
without extras in an empty virtual environment, imports, type-checks under `mypy --strict`,
and migrates a real database with PyMongo alone (motor is an extra)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=500
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from this tree as a release would be (no isolation: the
    build backend comes from the development environment, so no download is needed)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT)
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("bootmigrate-*.whl")
    return found


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return HeaderParser().parsestr(archive.read(name).decode())


@pytest.fixture(scope="module")
def user_env(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """An empty virtual environment with the wheel installed, no extras: its python."""
    env = tmp_path_factory.mktemp("user") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env)
    python = env / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel)
    return python


def test_twine_accepts_both_distributions(dist: Path) -> None:
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"], files

    run(sys.executable, "-m", "twine", "check", "--strict", *files)


def test_the_wheel_carries_the_licence_and_the_type_marker(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        text = archive.read(licence).decode()

    assert "bootmigrate/py.typed" in names
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_the_sdist_carries_the_licence_and_the_type_marker(dist: Path) -> None:
    (sdist,) = dist.glob("bootmigrate-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}

    assert {"LICENSE", "pyproject.toml", "src/bootmigrate/py.typed"} <= names


def test_the_metadata_says_what_a_user_looks_for(metadata: Message) -> None:
    classifiers = metadata.get_all("Classifier") or []
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    requires = metadata.get_all("Requires-Dist") or []

    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["License-File"] == "LICENSE"
    assert {f"Programming Language :: Python :: 3.{minor}" for minor in (10, 11, 12, 13)} <= set(
        classifiers
    )
    assert {"Framework :: AsyncIO", "Typing :: Typed"} <= set(classifiers)
    assert {"Homepage", "Documentation", "Repository", "Issues"} <= set(urls)
    # motor only with its extra; nothing for working on bootmigrate is published.
    assert [r for r in requires if r.startswith("motor")] == ["motor<4,>=3.6; extra == 'motor'"]
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert extras == {"motor", "fastapi", "aiohttp", "prometheus", "opentelemetry"}


def test_the_wheel_alone_migrates_with_pymongo(
    user_env: Path, mongo_uri: str, sync_db: Any
) -> None:
    script = textwrap.dedent(
        """
        import asyncio, importlib.util, json, sys
        from pymongo import AsyncMongoClient
        import bootmigrate

        async def up(db):
            await db.items.insert_one({"v": 1})

        async def main(uri, name):
            client = AsyncMongoClient(uri)
            try:
                report = await bootmigrate.migrate(
                    client[name], [bootmigrate.Migration(version=1, name="first", up=up)]
                )
            finally:
                await client.close()
            print(json.dumps({
                "motor": importlib.util.find_spec("motor") is not None,
                "applied": report.applied,
                "from": bootmigrate.__file__,
            }))

        asyncio.run(main(sys.argv[1], sys.argv[2]))
        """
    )

    done = run(user_env, "-c", script, mongo_uri, sync_db.name, cwd=user_env.parent)

    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert (said["motor"], said["applied"]) == (False, [1])
    assert "site-packages" in said["from"]  # the installed wheel, not this tree
    assert sync_db.items.count_documents({}) == 1


def test_the_cli_without_motor_names_the_extra(user_env: Path, mongo_uri: str) -> None:
    cli = user_env.parent / "bootmigrate"

    done = subprocess.run(
        [cli, "status", "--uri", mongo_uri, "--db", "x", "--driver", "motor"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    assert "pip install 'bootmigrate[motor]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_strict_mypy_accepts_code_that_uses_the_installed_library(
    user_env: Path, tmp_path: Path
) -> None:
    user = tmp_path / "service.py"
    user.write_text(
        textwrap.dedent(
            """
            from typing import Any

            import bootmigrate


            async def boot(db: Any) -> int:
                report: bootmigrate.MigrationReport = await bootmigrate.migrate(db, "migrations")
                return report.to_version
            """
        )
    )

    run(
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--no-incremental",
        "--python-executable",
        user_env,
        user,
        cwd=tmp_path,
    )
