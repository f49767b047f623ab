"""Real OS processes against the real server: the boot race, a killed holder, a paused one."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.migration_files import recording_migrations
from tests.polling import wait_past_lease
from tests.processes import Replicas, boot, race, start_blocked_holder

pytestmark = pytest.mark.multiprocess

RACERS = 16


def test_boot_race_runs_each_migration_exactly_once(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    migrations = recording_migrations(tmp_path / "m", 3, seconds=0.3)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)

    results = race(replicas, RACERS, wait_timeout=60, lease=5)

    assert [r["exit_code"] for r in results] == [0] * RACERS, results
    holders = [r for r in results if r["holder"]]
    assert len(holders) == 1, results
    holder = holders[0]
    assert holder["applied"] == [1, 2, 3]
    assert all(r["applied"] == [] and r["to_version"] == 3 for r in results if not r["holder"])
    ran = list(sync_db.ran.find({}, {"_id": 0, "version": 1, "pid": 1}))
    assert Counter(d["version"] for d in ran) == {1: 1, 2: 1, 3: 1}
    assert {d["pid"] for d in ran} == {holder["pid"]}
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"], control["token"]) == (False, 3, 1)
    outcomes = [(h["version"], h["outcome"]) for h in sync_db.migrations_history.find()]
    assert outcomes == [(1, "applied"), (2, "applied"), (3, "applied")]


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "plain"])
def test_killed_holder_is_taken_over_only_after_its_lease(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, idempotent: bool
) -> None:
    lease = 1.5
    migrations = recording_migrations(tmp_path / "m", 3, idempotent=idempotent)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    holder = start_blocked_holder(replicas, 1, lease=lease)
    os.kill(holder.pid, signal.SIGKILL)
    holder.kill()
    dead = sync_db.migrations.find_one({"_id": "control"})
    assert dead["locked"] and dead["running"]["version"] == 1

    result = boot(replicas, lease=lease, wait_timeout=30)

    if not idempotent:
        assert (result["exit_code"], result["error"]) == (1, "ControlLocked")
        assert "was interrupted" in result["message"]
        stuck = sync_db.migrations.find_one({"_id": "control"})
        assert stuck["locked"] and stuck["failure"]["kind"] == "interrupted"
        assert stuck["version"] == 0
        return
    assert result["exit_code"] == 0, result
    assert (result["holder"], result["applied"]) == (True, [1, 2, 3])
    rerun = sync_db.ran.find_one({"version": 1, "pid": result["pid"]})
    # Both instants are the server's: the takeover came a full lease after the last beat.
    # Whether the taker had to wait depends on how long it took to start, so only the
    # server's clock decides this test.
    taken_at = rerun["control"]["locked_at"]
    assert (taken_at - dead["heartbeat"]).total_seconds() >= lease
    assert rerun["control"]["token"] == dead["token"] + 1
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (False, 3)


def test_paused_holder_is_fenced_and_writes_nothing_when_resumed(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    lease = 1.5
    migrations = recording_migrations(tmp_path / "m", 2, idempotent=True)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    holder = start_blocked_holder(replicas, 1, lease=lease)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        paused = sync_db.migrations.find_one({"_id": "control"})
        wait_past_lease(sync_db, paused["heartbeat"], lease, "the paused holder's")

        taken = boot(replicas, lease=lease, wait_timeout=30)
        assert taken["exit_code"] == 0, taken
        assert (taken["holder"], taken["applied"]) == (True, [1, 2])
        settled = sync_db.migrations.find_one({"_id": "control"})
        history_count = sync_db.migrations_history.count_documents({})
        ran_count = sync_db.ran.count_documents({})

        os.kill(holder.pid, signal.SIGCONT)
        resumed = holder.result()
    finally:
        holder.kill()

    assert (resumed["exit_code"], resumed["error"]) == (1, "LockLost")
    assert sync_db.migrations.find_one({"_id": "control"}) == settled
    assert sync_db.migrations_history.count_documents({}) == history_count
    assert sync_db.migrations_history.count_documents({"pid": holder.pid}) == 0
    assert sync_db.ran.count_documents({}) == ran_count
    assert (settled["locked"], settled["version"]) == (False, 2)


def test_a_migration_merged_late_runs_once_however_many_replicas_allow_it(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    migrations = recording_migrations(tmp_path / "m", 4, seconds=0.2)
    (migrations / "0002_step_2.py").rename(tmp_path / "late.py")
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    assert boot(replicas, wait_timeout=30)["applied"] == [1, 3, 4]
    (tmp_path / "late.py").rename(migrations / "0002_step_2.py")

    refused = boot(replicas, wait_timeout=30)
    results = race(replicas, RACERS, wait_timeout=60, lease=5, allow_out_of_order=True)

    assert refused["error"] == "OutOfOrder", refused
    assert [r["exit_code"] for r in results] == [0] * RACERS, results
    assert sorted(r["applied"] for r in results) == [[]] * (RACERS - 1) + [[2]]
    assert Counter(d["version"] for d in sync_db.ran.find()) == {1: 1, 2: 1, 3: 1, 4: 1}
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"], control["applied"]["count"]) == (False, 4, 4)
