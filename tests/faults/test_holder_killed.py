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

from tests.databases import run_database
from tests.faults.conftest import double_applies, record, scale
from tests.migration_files import recording_migrations
from tests.processes import Replicas, boot, start_blocked_holder, start_paused_holder

LEASE = 1.0

# Where the holder is killed: the log line it is paused at, or None for inside migration 2,
# where RECORDING_MIGRATION blocks it. A migration is said applied once its history record is
# written, before the write that records its version (and names the next step): a holder
# killed there has finished the migration, and the taker goes on from the next one.
KILL_POINTS = {
    "before the first migration": "took the migration lock",
    "between two migrations": "applied migration 0001",
    "inside a migration": None,
    "after the last migration": "applied migration 0003",
    "after releasing": "migrations done",
}


def kill_holder(replicas: Replicas, point: str) -> int:
    """Start a holder, SIGKILL it at ``point``, and return its pid."""
    pause_on = KILL_POINTS[point]
    if pause_on is None:
        holder = start_blocked_holder(replicas, 2, lease=LEASE)
    else:
        holder = start_paused_holder(replicas, pause_on, lease=LEASE)
    os.kill(holder.pid, signal.SIGKILL)
    holder.kill()
    return holder.pid


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_next_process_resumes_after_a_kill(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, point: str
) -> None:
    migrations = recording_migrations(tmp_path, 3)  # not idempotent
    for run in range(scale(1, 4)):
        with run_database(sync_db, run) as db:
            check_resume(Replicas(mongo_uri, db, driver, migrations), point)


def check_resume(replicas: Replicas, point: str) -> None:
    db = replicas.db
    dead = kill_holder(replicas, point)
    record("2 holder killed", runs=1, processes=2, faults=1)
    if point == "inside a migration":
        result = boot(replicas, lease=LEASE, wait_timeout=30)
        assert (result["exit_code"], result["error"]) == (1, "ControlLocked"), result
        assert "was interrupted" in result["message"]
        control = db.migrations.find_one({"_id": "control"})
        assert (control["locked"], control["version"]) == (True, 1)
        assert (control["failure"]["kind"], control["failure"]["version"]) == ("interrupted", 2)
        assert Counter(d["version"] for d in db.ran.find()) == {1: 1, 2: 1}
        return

    result = boot(replicas, lease=LEASE, wait_timeout=30)
    taker_pid = result["pid"]

    assert result["exit_code"] == 0, result
    ran = list(db.ran.find())
    record("2 holder killed", double_applies=double_applies([d["version"] for d in ran]))
    assert Counter(d["version"] for d in ran) == {1: 1, 2: 1, 3: 1}  # zero double applies
    expected_by_taker = {
        "before the first migration": [1, 2, 3],
        "between two migrations": [2, 3],
        "after the last migration": [],
        "after releasing": [],
    }[point]
    assert result["applied"] == expected_by_taker
    assert sorted(d["version"] for d in ran if d["pid"] == taker_pid) == expected_by_taker
    assert all(d["pid"] in (dead, taker_pid) for d in ran)
    control = db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (False, 3)
    assert "running" not in control and "unfinished" not in control
    history = Counter((h["version"], h["outcome"]) for h in db.migrations_history.find())
    assert history == {(1, "applied"): 1, (2, "applied"): 1, (3, "applied"): 1}


def test_an_idempotent_migration_interrupted_inside_is_rerun(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    migrations = recording_migrations(tmp_path, 3, idempotent=True)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    dead = kill_holder(replicas, "inside a migration")

    result = boot(replicas, lease=LEASE, wait_timeout=30)

    assert (result["exit_code"], result["applied"]) == (0, [2, 3]), result
    by = [(d["version"], d["pid"]) for d in sync_db.ran.find()]
    assert by == [(1, dead), (2, dead), (2, result["pid"]), (3, result["pid"])]
    history = Counter((h["version"], h["outcome"]) for h in sync_db.migrations_history.find())
    assert history == {(1, "applied"): 1, (2, "applied"): 1, (3, "applied"): 1}
