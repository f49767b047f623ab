"""bootmigrate's lines under real uvicorn and gunicorn processes: visible, with time and
level, under their default logging (which leaves the root logger alone), and written once,
in the application's format, when the application configures logging itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.migration_files import STEP, write_migrations
from tests.polling import wait_until

pytestmark = pytest.mark.multiprocess

APP = '''
"""An app that migrates in its lifespan, for the logging tests."""
import logging.config
import json
import os
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from bootmigrate.integrations.starlette import migrate_lifespan

if os.environ.get("BM_APP_LOGGING"):
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"app": {"format": "APPLOG %(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "app",
                "stream": "ext://sys.stderr",
            },
        },
        "root": {"handlers": ["stderr"], "level": "INFO"},
    })


def make_client():
    if os.environ["BM_DRIVER"] == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient
        return AsyncIOMotorClient(os.environ["BM_URI"])
    from pymongo import AsyncMongoClient
    return AsyncMongoClient(os.environ["BM_URI"])


@asynccontextmanager
async def connect(app):
    app.state.client = make_client()
    yield
    result = app.state.client.close()
    if hasattr(result, "__await__"):
        await result


app = Starlette(
    lifespan=migrate_lifespan(
        lambda app: app.state.client[os.environ["BM_DB"]],
        os.environ["BM_MIGRATIONS"],
        lifespan=connect,
    )
)
'''

STARTED = "Application startup complete."
# The fallback's format: time, level, logger and pid.
FALLBACK_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) bootmigrate\[\d+\]: (.+)$"
)
APP_LINE = re.compile(r"^APPLOG (INFO|WARNING|ERROR) bootmigrate (.+)$")
# A bootmigrate message, however it is formatted.
MESSAGES = ("took the migration lock", "applied migration", "migrations done", "database ")


@dataclass
class Server:
    """A server process whose stderr is read line by line as it comes."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> list[str]:
        """SIGTERM, then its whole stderr once it has exited."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=5)
        return self.lines


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "bmapp.py").write_text(APP)
    write_migrations(
        tmp_path / "migrations", {f"000{v}_step_{v}.py": STEP.format(v=v) for v in (1, 2)}
    )
    return tmp_path


def command(server: str, app_dir: Path) -> tuple[list[str], int]:
    """The command line, and how many workers report their startup."""
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "bmapp:app", "--app-dir", str(app_dir),
            "--host", "127.0.0.1", "--port", "0",
        ], 1  # fmt: skip
    return [
        sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "2",
        "-b", "127.0.0.1:0", "--no-control-socket", "--chdir", str(app_dir), "bmapp:app",
    ], 2  # fmt: skip


@pytest.fixture
def run(app_dir: Path, mongo_uri: str, driver: str, sync_db: Any) -> Iterator[Any]:
    started: list[Server] = []

    def run_server(server: str, app_logging: bool) -> list[str]:
        args, workers = command(server, app_dir)
        env = {
            **os.environ,
            "BM_URI": mongo_uri,
            "BM_DB": sync_db.name,
            "BM_DRIVER": driver,
            "BM_MIGRATIONS": str(app_dir / "migrations"),
        }
        if app_logging:
            env["BM_APP_LOGGING"] = "1"
        process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=app_dir,
        )
        running = Server(process)
        started.append(running)
        wait_until(
            lambda: (
                sum(STARTED in line for line in running.lines) >= workers
                or running.process.poll() is not None
            ),
            60,
            f"{server} to start",
        )
        lines = running.stop()
        assert sum(STARTED in line for line in lines) == workers, "\n".join(lines)
        return lines

    yield run_server
    for server in started:
        server.stop()


def bootmigrate_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if any(m in line for m in MESSAGES)]


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_default_logging_shows_the_lines_once_with_time_and_level(
    run: Any, server: str, sync_db: Any
) -> None:
    lines = run(server, app_logging=False)

    ours = bootmigrate_lines(lines)
    text = "\n".join(lines)
    assert all(FALLBACK_LINE.match(line) for line in ours), text  # no bare line
    messages = [FALLBACK_LINE.match(line).group(2) for line in ours]  # type: ignore[union-attr]
    assert sum(m.startswith("took the migration lock") for m in messages) == 1, text
    assert sum(m.startswith("applied migration 0001") for m in messages) == 1, text
    assert sum(m.startswith("applied migration 0002") for m in messages) == 1, text
    assert sum(m.startswith("migrations done: database at version 2") for m in messages) == 1
    assert len(ours) == len(set(ours)), text  # each record written once
    assert sync_db.migrations.find_one({"_id": "control"})["version"] == 2
    if server == "gunicorn":  # the other worker says it waited, or found nothing to do
        assert (
            sum(("database reached version 2" in m or "nothing to migrate" in m) for m in messages)
            == 1
        ), text


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_logging_configured_by_the_app_takes_over_with_no_duplicate(run: Any, server: str) -> None:
    lines = run(server, app_logging=True)

    ours = bootmigrate_lines(lines)
    text = "\n".join(lines)
    assert ours and all(APP_LINE.match(line) for line in ours), text  # the app's format only
    assert not any(FALLBACK_LINE.match(line) for line in lines), text
    assert sum("took the migration lock" in line for line in ours) == 1, text
    assert sum("applied migration" in line for line in ours) == 2, text
    assert sum("migrations done" in line for line in ours) == 1, text


README = Path(__file__).resolve().parent.parent / "README.md"

MIGRATE = """
import asyncio, os, sys
from bootmigrate import migrate
from tests.clients import close_client, make_client

async def main():
    client = make_client(os.environ["BM_DRIVER"], os.environ["BM_URI"])
    try:
        await migrate(client[os.environ["BM_DB"]], os.environ["BM_MIGRATIONS"])
    finally:
        await close_client(client)

asyncio.run(main())
"""


def migrate_env(app_dir: Path, mongo_uri: str, driver: str, sync_db: Any) -> dict[str, str]:
    """The environment MIGRATE reads: which server, database, driver and migrations."""
    return {
        **os.environ,
        "BM_URI": mongo_uri,
        "BM_DB": sync_db.name,
        "BM_DRIVER": driver,
        "BM_MIGRATIONS": str(app_dir / "migrations"),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }


def test_the_readme_json_formatter_writes_the_event_fields(
    app_dir: Path, mongo_uri: str, driver: str, sync_db: Any
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [snippet] = [b for b in blocks if "class JsonFormatter" in b]
    env = migrate_env(app_dir, mongo_uri, driver, sync_db)

    done = subprocess.run(
        [sys.executable, "-c", snippet + MIGRATE],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    applied = [line for line in lines if line.get("event") == "migration_applied"]
    assert [(a["migration_version"], a["direction"]) for a in applied] == [(1, "up"), (2, "up")]
    assert all(a["level"] == "INFO" and a["duration_s"] >= 0 for a in applied)
    assert len({line["call_id"] for line in lines if "event" in line}) == 1


@pytest.mark.parametrize(
    "setting, shown",
    [
        ('logging.getLogger("bootmigrate").setLevel(logging.WARNING)', "WARNING"),
        ("logging.disable(logging.CRITICAL)", None),
    ],
    ids=["level_on_the_logger", "logging_disabled"],
)
def test_a_level_chosen_for_the_library_is_obeyed_by_the_fallback(
    app_dir: Path, mongo_uri: str, driver: str, sync_db: Any, setting: str, shown: str | None
) -> None:
    env = migrate_env(app_dir, mongo_uri, driver, sync_db)
    sync_db.migrations.insert_one({"_id": "control", "locked": False, "version": 5})  # ahead

    done = subprocess.run(
        [sys.executable, "-c", f"import logging\n{setting}\n{MIGRATE}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if FALLBACK_LINE.match(line)]
    assert not any(" INFO " in line for line in ours), done.stderr  # INFO is below the level
    if shown is None:
        assert ours == [], done.stderr
    else:  # the database-ahead warning still shows
        assert any(f" {shown} " in line and "ahead" in line for line in ours), done.stderr
