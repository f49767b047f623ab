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
from tests.migration_files import recording_migrations, write_migrations
from tests.polling import wait_until
from tests.processes import Replicas, boot, start_blocked_holder, start_paused_holder

LEASE = 1.0


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (by a signal)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def snapshot(db: Any) -> tuple[Any, ...]:
    return (
        db.migrations.find_one({"_id": "control"}),
        list(db.migrations_history.find()),
        list(db.ran.find()),
    )


# Where the holder is paused: inside migration 2 (SIGSTOP), or at a line of its log. "about to
# run a migration": migration 2 is named on the control document, and the holder has not yet
# called it; on resuming it must not run it, since what a migration writes is not fenced.
PAUSE_AT = {
    "between two migrations": "applied migration 0001",
    "about to run a migration": "running migration 0002",
}


# Migrations whose first act is a write, and which can stop their own process as they end
# (BM_STOP_AT): a holder resuming into one, or out of one, goes straight on to a write, with no
# read during which its heartbeat could find the lock gone and cancel it first.
WRITING_AT_ONCE = """
import os, signal

idempotent = True

async def up(db):
    await db.ran.insert_one({{"version": {v}, "pid": os.getpid()}})
    if os.environ.get("BM_STOP_AT") == "{v}":
        os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.parametrize("where", ["inside a migration", "as a migration ends", *PAUSE_AT])
def test_paused_holder_is_fenced(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path, where: str
) -> None:
    if where in ("about to run a migration", "as a migration ends"):
        files = {f"{v:04d}_step_{v}.py": WRITING_AT_ONCE.format(v=v) for v in (1, 2, 3)}
        migrations = write_migrations(tmp_path, files)
    else:
        migrations = recording_migrations(tmp_path, 3, idempotent=True)
    for run in range(scale(1, 5)):
        with run_database(sync_db, run) as db:
            check_fenced(Replicas(mongo_uri, db, driver, migrations), where)


def check_fenced(replicas: Replicas, where: str) -> None:
    db = replicas.db
    if where == "inside a migration":
        holder = start_blocked_holder(replicas, 2, lease=LEASE)
        os.kill(holder.pid, signal.SIGSTOP)
    elif where == "as a migration ends":
        # Its next step is the history record of migration 2: not fenced by the server.
        holder = replicas.start(env={"BM_STOP_AT": "2"}, lease=LEASE)
        wait_until(lambda: stopped(holder.pid), 30, "the holder to stop itself in migration 2")
    else:
        holder = start_paused_holder(replicas, PAUSE_AT[where], lease=LEASE)
    try:
        taken = boot(replicas, lease=LEASE, wait_timeout=60)
        assert taken["exit_code"] == 0 and taken["holder"], taken
        settled = snapshot(db)

        if where in ("inside a migration", "as a migration ends"):
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
