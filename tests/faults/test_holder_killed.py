"""Scenario 2: the holder is SIGKILLed at each point of its work; the next process resumes
correctly once the lease has expired, and re-runs an interrupted migration only if it is
idempotent."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import double_applies, record, scale
from tests.migration_files import recording_migrations
from tests.polling import wait_until
from tests.processes import Worker

LEASE = 1.0

# (where the holder is killed, how it is made to stop there)
KILL_POINTS = {
    "before the first migration": {"pause_on": "took the migration lock"},
    "between two migrations": {"pause_on": "applied migration 0001"},
    "inside a migration": {"env": {"BM_BLOCK_AT": "2"}},
    "before releasing": {"pause_on": "applied migration 0003"},
    "after releasing": {"pause_on": "migrations done"},
}


def kill_holder(sync_db: Any, mongo_uri: str, driver: str, migrations: Path, point: str) -> int:
    how = KILL_POINTS[point]
    holder = Worker.start(
        uri=mongo_uri, db=sync_db.name, driver=driver, migrations=migrations, lease=LEASE, **how
    )
    try:
        assert holder.read_event()["event"] == "ready"
        if "pause_on" in how:
            assert holder.read_event()["event"] == "paused"
        else:
            wait_until(
                lambda: sync_db.ran.find_one({"version": 2, "pid": holder.pid}),
                30,
                "the holder to enter migration 2",
            )
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.kill()
    return holder.pid


def boot(sync_db: Any, mongo_uri: str, driver: str, migrations: Path) -> tuple[int, dict[str, Any]]:
    taker = Worker.start(
        uri=mongo_uri,
        db=sync_db.name,
        driver=driver,
        migrations=migrations,
        lease=LEASE,
        wait_timeout=30,
    )
    return taker.pid, taker.result()


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_next_process_resumes_after_a_kill(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, point: str
) -> None:
    for run in range(scale(1, 4)):
        db = sync_db.client[f"{sync_db.name}_{run}"]
        try:
            check_resume(db, mongo_uri, driver, tmp_path / str(run), point)
        finally:
            sync_db.client.drop_database(db.name)


def check_resume(db: Any, mongo_uri: str, driver: str, tmp: Path, point: str) -> None:
    migrations = recording_migrations(tmp, 3)  # not idempotent
    dead = kill_holder(db, mongo_uri, driver, migrations, point)
    record("2 holder killed", runs=1, processes=2, faults=1)
    if point == "inside a migration":
        taker_pid, result = boot(db, mongo_uri, driver, migrations)
        assert (result["exit_code"], result["error"]) == (1, "ControlLocked"), result
        assert "was interrupted" in result["message"]
        control = db.migrations.find_one({"_id": "control"})
        assert (control["locked"], control["version"]) == (True, 1)
        assert (control["failure"]["kind"], control["failure"]["version"]) == ("interrupted", 2)
        assert Counter(d["version"] for d in db.ran.find()) == {1: 1, 2: 1}
        return

    taker_pid, result = boot(db, mongo_uri, driver, migrations)

    assert result["exit_code"] == 0, result
    ran = list(db.ran.find())
    record("2 holder killed", double_applies=double_applies([d["version"] for d in ran]))
    assert Counter(d["version"] for d in ran) == {1: 1, 2: 1, 3: 1}  # zero double applies
    expected_by_taker = {
        "before the first migration": [1, 2, 3],
        "between two migrations": [2, 3],
        "before releasing": [],
        "after releasing": [],
    }[point]
    assert result["applied"] == expected_by_taker
    assert sorted(d["version"] for d in ran if d["pid"] == taker_pid) == expected_by_taker
    assert all(d["pid"] in (dead, taker_pid) for d in ran)
    if point == "before releasing":
        # Nothing was pending, so that boot did not wait; the first boot after the dead
        # holder's lease expired releases its lock.
        left = db.migrations.find_one({"_id": "control"})
        wait_until(
            lambda: (db.command("hello")["localTime"] - left["heartbeat"]).total_seconds() > LEASE,
            30,
            "the dead holder's lease to expire",
        )
        assert boot(db, mongo_uri, driver, migrations)[1]["exit_code"] == 0
    control = db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (False, 3)
    history = Counter((h["version"], h["outcome"]) for h in db.migrations_history.find())
    assert history == {(1, "applied"): 1, (2, "applied"): 1, (3, "applied"): 1}


def test_an_idempotent_migration_interrupted_inside_is_rerun(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    migrations = recording_migrations(tmp_path, 3, idempotent=True)
    dead = kill_holder(sync_db, mongo_uri, driver, migrations, "inside a migration")

    taker_pid, result = boot(sync_db, mongo_uri, driver, migrations)

    assert (result["exit_code"], result["applied"]) == (0, [2, 3]), result
    by = [(d["version"], d["pid"]) for d in sync_db.ran.find()]
    assert by == [(1, dead), (2, dead), (2, taker_pid), (3, taker_pid)]
    history = Counter((h["version"], h["outcome"]) for h in sync_db.migrations_history.find())
    assert history == {(1, "applied"): 1, (2, "applied"): 1, (3, "applied"): 1}
