"""A lock stuck by a failure is retried by a different build only when the operator opts in
(retry_failed_on_new_build=True); never by the same build, never when interrupted, and a live
lock is never taken over either way."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import ControlLocked, migrate
from tests.in_process import control, dead_holder_lock, history, ran, recorders

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
    retry = (await history(db))[0]
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
