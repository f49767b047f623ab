"""Scenario 3: a holder paused past its lease, then resumed. Another process takes over and
finishes; the resumed holder is fenced: it raises LockLost and writes nothing more."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.databases import run_database
from tests.faults.conftest import record, scale
from tests.migration_files import recording_migrations
from tests.processes import Replicas, boot, start_blocked_holder, start_paused_holder

LEASE = 1.0


def snapshot(db: Any) -> tuple[Any, ...]:
    return (
        db.migrations.find_one({"_id": "control"}),
        list(db.migrations_history.find()),
        list(db.ran.find()),
    )


@pytest.mark.parametrize("where", ["inside a migration", "between two migrations"])
def test_paused_holder_is_fenced(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, where: str
) -> None:
    migrations = recording_migrations(tmp_path, 3, idempotent=True)
    for run in range(scale(1, 5)):
        with run_database(sync_db, run) as db:
            check_fenced(Replicas(mongo_uri, db, driver, migrations), where)


def check_fenced(replicas: Replicas, where: str) -> None:
    db = replicas.db
    if where == "inside a migration":
        holder = start_blocked_holder(replicas, 2, lease=LEASE)
        os.kill(holder.pid, signal.SIGSTOP)
    else:
        holder = start_paused_holder(replicas, "applied migration 0001", lease=LEASE)
    try:
        taken = boot(replicas, lease=LEASE, wait_timeout=60)
        assert taken["exit_code"] == 0 and taken["holder"], taken
        settled = snapshot(db)

        if where == "inside a migration":
            os.kill(holder.pid, signal.SIGCONT)
        else:
            holder.go()
        resumed = holder.result()
    finally:
        holder.kill()

    wrote_after_resume = int(snapshot(db) != settled)
    record("3 holder paused", runs=1, processes=2, faults=1, stale_writes=wrote_after_resume)
    assert (resumed["exit_code"], resumed["error"]) == (1, "LockLost"), resumed
    assert snapshot(db) == settled  # the fenced holder wrote nothing at all
    control = settled[0]
    assert (control["locked"], control["version"], control["token"]) == (False, 3, 2)
    assert db.migrations_history.count_documents({"pid": holder.pid, "version": {"$gt": 1}}) == 0
