"""Fixtures: a real MongoDB-wire server (SecantusDB, or MONGODB_URI) and both async drivers."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pymongo import MongoClient
from pymongo.uri_parser import parse_uri

from tests.clients import DRIVERS, open_client
from tests.databases import new_db_name, sync_database
from tests.fail_points import all_fail_points_off, on_real_mongodb
from tests.migration_files import STEP, write_migrations
from tests.operator_cli import Cli
from tests.server import SecantusDaemon
from tests.wire_proxy import WireProxy


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # motor runs on asyncio only


@pytest.fixture(autouse=True)
def _operator_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests say what they want; an operator's variables in the shell must not leak in."""
    for name in (
        "MIGRATION_VERSION",
        "BOOTMIGRATE_BUILD",
        "BOOTMIGRATE_DB",
        "BOOTMIGRATE_MIGRATIONS",
        "BOOTMIGRATE_COLLECTION",
        "BOOTMIGRATE_HISTORY_COLLECTION",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server per test module: SecantusDB slows down after many writes in one life."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    with SecantusDaemon(tmp_path_factory.mktemp("secantus")) as server:
        yield server.uri


@pytest.fixture(scope="module")
def standalone_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that presents itself as standalone, so it refuses change streams."""
    if os.environ.get("MONGODB_URI"):
        pytest.skip("needs a standalone server of its own")
    with SecantusDaemon(tmp_path_factory.mktemp("standalone"), None, "--standalone") as server:
        yield server.uri


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_name() -> str:
    return new_db_name()


@pytest.fixture
async def client(driver: str, mongo_uri: str) -> AsyncIterator[Any]:
    async with open_client(driver, mongo_uri, serverSelectionTimeoutMS=5000) as client:
        yield client


@pytest.fixture
async def db(client: Any, db_name: str) -> AsyncIterator[Any]:
    yield client[db_name]
    await client.drop_database(db_name)


@pytest.fixture
def sync_db(mongo_uri: str, db_name: str) -> Iterator[Any]:
    """The same database through the synchronous driver, for a test's own reads and writes."""
    with sync_database(mongo_uri, db_name) as db:
        yield db


class LogRecorder(logging.Handler):
    """Keeps bootmigrate's log records, and lets a test await one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._waiters: list[tuple[str, anyio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for fragment, event in self._waiters:
            if fragment in record.getMessage():
                event.set()

    async def wait_for(self, fragment: str, seconds: float = 20.0) -> None:
        if self.has(fragment):
            return
        event = anyio.Event()
        self._waiters.append((fragment, event))
        with anyio.fail_after(seconds):
            await event.wait()

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def has(self, fragment: str) -> bool:
        return any(fragment in m for m in self.messages())


@pytest.fixture
def bootmigrate_log() -> Iterator[LogRecorder]:
    recorder = LogRecorder()
    logger = logging.getLogger("bootmigrate")
    previous = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    yield recorder
    logger.removeHandler(recorder)
    logger.setLevel(previous)


@pytest.fixture
def cli(mongo_uri: str, sync_db: Any, driver: str, tmp_path: Path) -> Cli:
    """The operator CLI as a subprocess, on a database and migrations of its own."""
    migrations = write_migrations(
        tmp_path / "migrations", {f"000{v}_step_{v}.py": STEP.format(v=v) for v in (1, 2, 3)}
    )
    env = {
        **os.environ,
        "MONGODB_URI": mongo_uri,
        "BOOTMIGRATE_DB": sync_db.name,
        "BOOTMIGRATE_MIGRATIONS": str(migrations),
        "BOOTMIGRATE_DRIVER": driver,
    }
    return Cli(env, sync_db, migrations)


# The fault instrument: a wire proxy answering configureFailPoint in front of SecantusDB, or
# the real MongoDB itself (see tests/fail_points.py and docs/reliability.md).


@pytest.fixture(scope="module")
def fault_proxy(mongo_uri: str) -> Iterator[WireProxy]:
    """The module's server behind a wire proxy with fail points; skipped on a real MongoDB,
    whose own fail points tests use instead."""
    if on_real_mongodb():
        pytest.skip("the wire proxy stands in for fail points SecantusDB lacks")
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    with WireProxy(f"{host}:{port}") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def fault_uri(request: pytest.FixtureRequest) -> str:
    """Where a test connects to be able to inject faults: the proxy, or MONGODB_URI."""
    if on_real_mongodb():
        return os.environ["MONGODB_URI"]
    proxy: WireProxy = request.getfixturevalue("fault_proxy")
    return proxy.uri


@pytest.fixture(autouse=True)
def fail_points_off(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every fail point is off after each test that can set one, whatever it did."""
    if not {"fault_uri", "fault_proxy"} & set(request.fixturenames):
        yield
        return
    if on_real_mongodb():
        uri: str = request.getfixturevalue("fault_uri")
        yield
        with MongoClient(uri, serverSelectionTimeoutMS=5000) as admin_client:
            all_fail_points_off(admin_client)
    else:
        proxy: WireProxy = request.getfixturevalue("fault_proxy")
        yield
        proxy.fail_points.all_off()
