"""A lock stuck by a failure is retried by a different build only when the operator opts in
(retry_failed_on_new_build=True); never by the same build, nor by any build that already failed
it, never when interrupted, never by a plan that does not start with the failed step, and a
live lock is never taken over either way."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import ControlLocked, Migration, MigrationFailed, migrate
from tests.in_process import control, dead_holder_lock, history, ran, recorder, recorders

pytestmark = pytest.mark.anyio


async def stuck(db: Any, *, build: str | None, kind: str = "failed") -> None:
    await db.migrations.insert_one(
        {
            "_id": "control",
            "locked": True,
            "version": 1,
            "token": 4,
            "beats": 2,
            "failure": {
                "kind": kind,
                "version": 2,
                "name": "step_2",
                "build": build,
                "error": "RuntimeError: boom",
                "host": "app-1",
                "pid": 7,
            },
        }
    )


async def test_by_default_a_new_build_does_not_retry(db: Any) -> None:
    await stuck(db, build="1.0")

    with pytest.raises(ControlLocked, match="migration 2 step_2 failed"):
        await migrate(db, recorders(1, 2, 3), build="1.1")

    assert (await control(db) or {})["failure"]["build"] == "1.0"


async def test_a_different_build_retries_when_allowed(db: Any) -> None:
    await stuck(db, build="1.0")

    report = await migrate(db, recorders(1, 2, 3), build="1.1", retry_failed_on_new_build=True)

    assert (report.applied, report.holder) == ([2, 3], True)
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"], doc["token"]) == (False, 3, 5)
    assert "failure" not in doc
    retry = next(r for r in await history(db) if r.get("action") == "retry-on-new-build")
    assert (retry["outcome"], retry["action"], retry["version"]) == (
        "manual",
        "retry-on-new-build",
        2,
    )
    assert await ran(db) == [(2, "up"), (3, "up")]


async def test_the_same_build_never_retries(db: Any) -> None:
    await stuck(db, build="1.0")

    with pytest.raises(ControlLocked):
        await migrate(db, recorders(1, 2, 3), build="1.0", retry_failed_on_new_build=True)


async def test_an_interrupted_migration_is_never_retried_automatically(db: Any) -> None:
    await stuck(db, build="1.0", kind="interrupted")

    with pytest.raises(ControlLocked, match="was interrupted"):
        await migrate(db, recorders(1, 2, 3), build="1.1", retry_failed_on_new_build=True)


async def test_a_live_lock_is_never_taken_over_by_a_new_build(db: Any) -> None:
    await dead_holder_lock(db, version=1, running=2, silent_for=1, lease=3600)

    with pytest.raises(ControlLocked, match="held by deadhost"):
        await migrate(
            db, recorders(1, 2, 3), build="9.9", retry_failed_on_new_build=True, wait_timeout=0.3
        )

    assert (await control(db) or {})["token"] == 7


def always_failing(attempts: list[int]) -> Migration:
    """Migration 2, broken in every build; each attempt is counted."""

    async def up(db: Any) -> None:
        attempts.append(2)
        raise RuntimeError("still broken")

    return Migration(version=2, up=up, name="step_2")


async def test_a_build_that_already_failed_a_migration_never_retries_it(db: Any) -> None:
    """A rolling deploy alternates boots of the old and the new build: neither is the fix
    once it has failed, so the failed migration is not run again and again."""
    attempts: list[int] = []
    migrations = [recorder(1), always_failing(attempts), recorder(3)]
    with pytest.raises(MigrationFailed):
        await migrate(db, migrations, build="v1")
    with pytest.raises(MigrationFailed):  # v2 may be the fix: it retries, and fails too
        await migrate(db, migrations, build="v2", retry_failed_on_new_build=True)
    assert len(attempts) == 2

    for build in ("v1", "v2", "v1", "v2", "v1", "v2"):
        with pytest.raises(ControlLocked, match="migration 2 step_2 failed"):
            await migrate(db, migrations, build=build, retry_failed_on_new_build=True)

    assert len(attempts) == 2
    runs = [(r["build"], r["outcome"]) for r in await history(db) if r["version"] == 2]
    assert runs == [("v1", "failed"), ("v2", "manual"), ("v2", "failed")]  # manual: the retry
    assert (await control(db) or {})["failure"]["build"] == "v2"


async def test_a_failed_down_is_not_retried_by_a_build_that_goes_up(db: Any) -> None:
    async def broken_down(db: Any) -> None:
        raise RuntimeError("index in use")

    async def up(db: Any) -> None:
        await db.ran.insert_one({"version": 2, "direction": "up"})

    migrations = [
        recorder(1),
        Migration(version=2, up=up, down=broken_down, name="step_2"),
        recorder(3),
    ]
    await migrate(db, migrations, build="v1")
    with pytest.raises(MigrationFailed):
        await migrate(db, migrations, target=1, build="v1")

    with pytest.raises(ControlLocked, match=r"failed on .* during its `down`"):
        await migrate(db, migrations, build="v2", retry_failed_on_new_build=True)

    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (True, 2)
    assert await ran(db) == [(1, "up"), (2, "up"), (3, "up"), (3, "down")]
