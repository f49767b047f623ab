"""Scenario 6: SIGTERM while waiting and while migrating, with the cancellation semantics:
a waiter writes nothing; a holder between migrations releases at the version reached; one
inside a migration gives it ``shutdown_grace`` to finish, then leaves it stuck as interrupted,
unless the migration is idempotent."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.faults.conftest import record
from tests.migration_files import recording_migrations
from tests.processes import Replicas, Worker, boot, start_blocked_holder

STABLE = ("_id", "locked", "version", "token", "owner", "locked_at", "running", "failure")


def blocked_in_2(replicas: Replicas, **options: Any) -> Worker:
    """A holder that took the lock and stays inside migration 2 (past a short grace)."""
    return start_blocked_holder(replicas, 2, **{"lease": 5, "shutdown_grace": 0.5, **options})


def test_sigterm_while_waiting_writes_nothing(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3))
    holder = blocked_in_2(replicas)
    try:
        before = sync_db.migrations.find_one({"_id": "control"})
        history = sync_db.migrations_history.count_documents({})
        waiter = replicas.start(wait_timeout=60, sigterm_on="waiting for")
        result = waiter.result()
        after = sync_db.migrations.find_one({"_id": "control"})
    finally:
        holder.kill()

    assert [e["event"] for e in waiter.lines] == ["ready", "signalled", "result"]
    record("6 SIGTERM", runs=1, faults=1)
    assert (result["exit_code"], result["error"]) == (143, "Cancelled"), result
    assert {k: after.get(k) for k in STABLE} == {k: before.get(k) for k in STABLE}
    assert sync_db.migrations_history.count_documents({}) == history


def test_sigterm_between_migrations_releases_at_the_version_reached(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3))
    result = boot(replicas, sigterm_on="applied migration 0001")

    record("6 SIGTERM", runs=1, faults=1)
    assert (result["exit_code"], result["error"]) == (143, "Cancelled"), result
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (False, 1)
    # Migration 2, named by the write that recorded 1, never ran: its name is taken back.
    assert not {"running", "unfinished", "failure"} & set(control), control
    assert [d["version"] for d in sync_db.ran.find()] == [1]


def test_sigterm_inside_a_migration_leaves_it_stuck_as_interrupted(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    holder = blocked_in_2(Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path, 3)))
    holder.process.send_signal(signal.SIGTERM)
    result = holder.result()

    record("6 SIGTERM", runs=1, faults=1)
    assert (result["exit_code"], result["error"]) == (143, "Cancelled")
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (True, 1)
    assert (control["failure"]["kind"], control["failure"]["version"]) == ("interrupted", 2)
    assert control["failure"]["pid"] == holder.pid
    assert sync_db.migrations_history.find_one({"version": 2})["outcome"] == "interrupted"


def test_sigterm_inside_an_idempotent_migration_releases_for_a_rerun(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    migrations = recording_migrations(tmp_path, 3, idempotent=True)
    replicas = Replicas(mongo_uri, sync_db, driver, migrations)
    holder = blocked_in_2(replicas)
    holder.process.send_signal(signal.SIGTERM)
    result = holder.result()

    record("6 SIGTERM", runs=1, faults=1)
    assert result["exit_code"] == 143
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (False, 1)
    assert "failure" not in control
    assert boot(replicas)["applied"] == [2, 3]


def test_sigterm_inside_a_migration_that_finishes_within_the_grace_counts_it_applied(
    sync_db: Any, mongo_uri: str, driver: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    replicas = Replicas(mongo_uri, sync_db, driver, recording_migrations(tmp_path / "m", 3))
    holder = start_blocked_holder(
        replicas,
        2,
        env={"BM_RELEASE_FILE": str(release)},
        lease=5,
        shutdown_grace=60,
        announce="asked to stop while a migration runs",
    )
    try:
        holder.process.send_signal(signal.SIGTERM)
        # "ready" came first; then the stop is in and the grace runs.
        assert [holder.read_event()["event"] for _ in range(2)] == ["ready", "announced"]
        release.touch()  # the migration finishes within its grace
        result = holder.result()
    finally:
        holder.kill()

    record("6 SIGTERM", runs=1, faults=1)
    assert (result["exit_code"], result["error"]) == (143, "Cancelled"), result
    control = sync_db.migrations.find_one({"_id": "control"})
    assert (control["locked"], control["version"]) == (False, 2)
    assert "running" not in control and "failure" not in control
    assert [d["version"] for d in sync_db.ran.find()] == [1, 2]  # 3 did not start
    assert [r["outcome"] for r in sync_db.migrations_history.find()] == ["applied", "applied"]
