"""Scenario 4: the server process is killed and started again on the same data while a holder
is inside a migration and others wait. No double apply, a clear outcome, and the waiters
recover within their deadline."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.databases import sync_database
from tests.faults.conftest import double_applies, record, scale
from tests.migration_files import recording_migrations
from tests.polling import wait_until
from tests.processes import Replicas
from tests.server import SecantusDaemon

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("MONGODB_URI")), reason="kills and restarts its own test server"
)

DOWN_FOR = 1.0  # seconds the server stays dead


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SecantusDaemon]:
    # Acknowledged writes must survive SIGKILL, as they do on a real server with a journal.
    with SecantusDaemon(tmp_path / "data", None, "--sync-on-commit") as daemon:
        yield daemon


def restart(server: SecantusDaemon) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    time.sleep(DOWN_FOR)  # the fault: nothing listens on the port for this long
    server.start()


def test_restart_while_migrating_and_waiting(
    server: SecantusDaemon, driver: str, tmp_path: Path
) -> None:
    for run in range(scale(1, 5)):
        check_restart(server, driver, tmp_path / str(run), f"restart_{run}")


def check_restart(server: SecantusDaemon, driver: str, tmp: Path, name: str) -> None:
    lease = 6.0
    migrations = recording_migrations(tmp, 3, seconds=[3.0, 0.0, 0.0])
    with sync_database(server.uri, name, serverSelectionTimeoutMS=20000) as db:
        replicas = Replicas(server.uri, db, driver, migrations)
        holder = replicas.start(lease=lease, wait_timeout=60)
        wait_until(lambda: db.ran.find_one({"version": 1}), 30, "the holder to enter migration 1")
        waiters = [replicas.start(lease=lease, wait_timeout=60) for _ in range(2)]
        for waiter in waiters:
            assert waiter.read_event()["event"] == "ready"

        restart(server)

        held = holder.result()
        results = [waiter.result() for waiter in waiters]
        assert held["exit_code"] == 0 and held["holder"] and held["applied"] == [1, 2, 3], held
        assert all(r["exit_code"] == 0 and not r["holder"] for r in results), results
        versions = [d["version"] for d in db.ran.find()]
        applied = db.migrations_history.count_documents({"outcome": "applied"})
        record(
            "4 server restarted",
            runs=1,
            processes=3,
            faults=1,
            double_applies=double_applies(versions),
            lost_records=3 - applied,
        )
        assert Counter(versions) == {1: 1, 2: 1, 3: 1}
        control = db.migrations.find_one({"_id": "control"})
        assert (control["locked"], control["version"], control["token"]) == (False, 3, 1)
        outcomes = Counter((h["version"], h["outcome"]) for h in db.migrations_history.find())
        assert outcomes == {(1, "applied"): 1, (2, "applied"): 1, (3, "applied"): 1}
