"""Scenario 7: the holder's and the waiters' clocks disagree by minutes (libfaketime shifts
each process's wall clock). Leases are never measured on a wall clock, so there is no early
takeover of a live holder, and a dead holder is taken over a full lease after its last beat."""

from __future__ import annotations

import glob
import os
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import double_applies, record
from tests.migration_files import recording_migrations
from tests.polling import wait_until
from tests.processes import Replicas, boot, race, start_blocked_holder

# Where Debian and others install the multi-threaded preload library, whatever the arch.
FOUND = sorted(
    glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")
    + glob.glob("/usr/lib/faketime/libfaketimeMT.so.1")
)
LIBFAKETIME = FOUND[0] if FOUND else ""

pytestmark = pytest.mark.skipif(
    not (shutil.which("faketime") and LIBFAKETIME),
    reason="libfaketime is not installed (Debian package faketime)",
)


def skewed(offset: str) -> dict[str, str]:
    """Environment that shifts a process's wall clock (not its monotonic clock)."""
    return {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


def test_skewed_waiters_never_take_over_a_live_holder(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    # A lease long enough that a loaded CI machine (three waiters importing their drivers at
    # once) never starves the holder's heartbeat: the clocks are 15 minutes apart, so a lease
    # measured on them would fail at any length.
    lease = 4.0
    # Migration 1 runs for two leases while waiters whose clocks run 10 minutes ahead poll.
    migrations = recording_migrations(tmp_path, 2, seconds=[2 * lease, 0.0])
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    holder = replicas.start(env=skewed("-5m"), lease=lease)
    wait_until(lambda: sync_db.ran.find_one({"version": 1}), 30, "the holder to start")
    results = race(replicas, 3, env=skewed("+10m"), lease=lease, wait_timeout=60)
    held = holder.result()

    record(
        "7 clock skew",
        runs=1,
        processes=4,
        faults=4,
        double_applies=double_applies([d["version"] for d in sync_db.ran.find()]),
    )
    assert held["exit_code"] == 0 and held["holder"] and held["applied"] == [1, 2], held
    assert all(r["exit_code"] == 0 and not r["holder"] for r in results), results
    assert Counter(d["version"] for d in sync_db.ran.find()) == {1: 1, 2: 1}
    assert sync_db.migrations.find_one({"_id": "control"})["token"] == 1  # never taken over


def test_skewed_taker_waits_a_full_lease_of_server_time(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    lease = 1.5
    migrations = recording_migrations(tmp_path, 2, idempotent=True)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    holder = start_blocked_holder(replicas, 1, env=skewed("-10m"), lease=lease)
    os.kill(holder.pid, signal.SIGKILL)
    holder.kill()
    dead = sync_db.migrations.find_one({"_id": "control"})

    result = boot(replicas, env=skewed("+10m"), lease=lease, wait_timeout=60)

    record("7 clock skew", runs=1, processes=2, faults=3)
    assert result["exit_code"] == 0 and result["applied"] == [1, 2], result
    rerun = sync_db.ran.find_one({"version": 1, "pid": result["pid"]})
    taken_at = rerun["control"]["locked_at"]  # the server's clock, as is the heartbeat
    assert (taken_at - dead["heartbeat"]).total_seconds() >= lease
    # The skew was real: the taker's own clock, which stamps its history, ran 10 min ahead.
    entry = sync_db.migrations_history.find_one({"pid": result["pid"]})
    ahead = (entry["finished_at"] - sync_db.command("hello")["localTime"]).total_seconds()
    assert 540 < ahead < 660, ahead
