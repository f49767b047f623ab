"""Semantics 1, 2, 6, 10 and targets: the fast path, acquiring, applying, fresh databases."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import monitoring

from bootmigrate import InvalidTarget, Migration, migrate
from tests.clients import open_client
from tests.in_process import control, history, ran, recorders

pytestmark = pytest.mark.anyio


async def test_fresh_database_runs_every_migration_in_order(db: Any) -> None:
    report = await migrate(db, recorders(3, 1, 2), build="b-1")

    assert report.applied == [1, 2, 3]
    assert (report.from_version, report.to_version, report.holder) == (0, 3, True)
    assert await ran(db) == [(1, "up"), (2, "up"), (3, "up")]
    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"], doc["token"]) == (False, 3, 1)
    assert not {"owner", "heartbeat", "running", "failure"} & set(doc)


async def test_each_migration_leaves_a_history_record(db: Any) -> None:
    await migrate(db, recorders(1, 2), build="b-7")

    records = await history(db)
    assert [(r["version"], r["outcome"], r["direction"]) for r in records] == [
        (1, "applied", "up"),
        (2, "applied", "up"),
    ]
    for record in records:
        assert record["name"].startswith("step_")
        assert record["build"] == "b-7"
        assert record["host"] and record["pid"]
        assert record["finished_at"] >= record["started_at"]
        assert record["duration_s"] >= 0
        assert record["error"] is None


async def test_history_lives_in_its_own_collection(db: Any) -> None:
    await migrate(db, recorders(1))

    assert await db.migrations.count_documents({}) == 1  # only the control document


async def test_build_defaults_to_the_environment(db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOTMIGRATE_BUILD", "env-build-9")
    await migrate(db, recorders(1))

    assert (await history(db))[0]["build"] == "env-build-9"


class CommandLog(monitoring.CommandListener):
    def __init__(self) -> None:
        self.events: list[monitoring.CommandStartedEvent] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.events.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def watched(driver: str, mongo_uri: str, db_name: str) -> Any:
    commands = CommandLog()
    async with open_client(driver, mongo_uri, event_listeners=[commands]) as client:
        yield client[db_name], commands


async def test_up_to_date_boot_costs_one_read_and_no_write(db: Any, watched: Any) -> None:
    await migrate(db, recorders(1, 2))
    watched_db, commands = watched
    await watched_db.command("ping")  # the connection handshake is not ours to count
    commands.events.clear()

    report = await migrate(watched_db, recorders(1, 2))

    assert [e.command_name for e in commands.events] == ["find"]
    assert commands.events[0].command["filter"] == {"_id": "control"}
    assert (report.applied, report.holder, report.waited) == ([], False, 0.0)


async def test_lock_writes_use_majority_write_concern(watched: Any) -> None:
    watched_db, commands = watched
    await migrate(watched_db, recorders(1))

    ours = ("migrations", "migrations_history")
    writes = [
        e.command
        for e in commands.events
        if e.command_name in ("findAndModify", "update", "insert")
        and e.command[e.command_name] in ours
    ]
    assert writes
    assert all(w.get("writeConcern", {}).get("w") == "majority" for w in writes)


async def test_rocketchat_control_document_applies_only_newer_migrations(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 19})

    report = await migrate(db, recorders(*range(1, 23)))

    assert report.applied == [20, 21, 22]
    assert [v for v, _ in await ran(db)] == [20, 21, 22]
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 22)


async def test_hand_set_version_skips_a_migration(db: Any) -> None:
    await migrate(db, recorders(1, 2))
    await db.migrations.update_one({"_id": "control"}, {"$set": {"version": 3}})

    report = await migrate(db, recorders(1, 2, 3, 4))

    assert report.applied == [4]
    assert 3 not in [v for v, _ in await ran(db)]


async def test_versions_may_have_gaps(db: Any) -> None:
    report = await migrate(db, recorders(10, 20, 35))

    assert report.applied == [10, 20, 35]
    assert (await control(db) or {})["version"] == 35


async def test_fresh_skip_records_latest_without_running(db: Any) -> None:
    report = await migrate(db, recorders(1, 2, 3), fresh="skip")

    assert (report.to_version, report.applied) == (3, [])
    assert report.holder is False  # the document was created unlocked: no lock was taken
    assert await ran(db) == []
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 3)
    assert [r["outcome"] for r in await history(db)] == ["skipped"]


async def test_fresh_skip_does_not_apply_to_an_existing_database(db: Any) -> None:
    await db.migrations.insert_one({"_id": "control", "locked": False, "version": 1})

    report = await migrate(db, recorders(1, 2, 3), fresh="skip")

    assert report.applied == [2, 3]


async def test_explicit_target_up_stops_there(db: Any) -> None:
    report = await migrate(db, recorders(1, 2, 3), target=2)

    assert (report.applied, report.to_version) == ([1, 2], 2)


async def test_explicit_lower_target_runs_down_migrations_newest_first(db: Any) -> None:
    await migrate(db, recorders(1, 2, 3))

    report = await migrate(db, recorders(1, 2, 3), target=1)

    assert (report.reverted, report.applied, report.to_version) == ([3, 2], [], 1)
    assert (await ran(db))[-2:] == [(3, "down"), (2, "down")]
    assert [r["direction"] for r in await history(db)][-2:] == ["down", "down"]
    assert (await control(db) or {})["version"] == 1


async def test_down_to_zero_reverts_everything(db: Any) -> None:
    await migrate(db, recorders(1, 2))

    report = await migrate(db, recorders(1, 2), target=0)

    assert (report.reverted, report.to_version) == ([2, 1], 0)


async def test_unknown_target_is_refused_before_any_write(db: Any) -> None:
    with pytest.raises(InvalidTarget, match="target 9 is not a version this build knows"):
        await migrate(db, recorders(1, 2), target=9)

    assert await db.list_collection_names() == []


async def test_rerun_runs_one_applied_migration_again_without_moving_the_version(db: Any) -> None:
    await migrate(db, recorders(1, 2, 3))

    report = await migrate(db, recorders(1, 2, 3), rerun=2)

    assert (report.applied, report.from_version, report.to_version) == ([2], 3, 3)
    assert (await ran(db))[-1] == (2, "up")
    assert (await control(db) or {})["version"] == 3
    assert (await history(db))[-1]["direction"] == "rerun"


async def test_rerun_of_a_migration_not_yet_applied_is_refused(db: Any) -> None:
    await migrate(db, recorders(1), target=1)

    with pytest.raises(InvalidTarget, match="not been applied yet"):
        await migrate(db, recorders(1, 2), rerun=2)


async def test_migration_with_context_parameter_gets_version_and_log(db: Any) -> None:
    seen: dict[str, Any] = {}

    async def up(db: Any, ctx: Any) -> None:
        seen.update(version=ctx.version, name=ctx.name, direction=ctx.direction)
        ctx.log.info("inside")

    await migrate(db, [Migration(version=5, up=up, name="with_ctx")])

    assert seen == {"version": 5, "name": "with_ctx", "direction": "up"}


async def test_no_migrations_and_no_document_writes_nothing(db: Any) -> None:
    report = await migrate(db, [])

    assert (report.from_version, report.to_version) == (0, 0)
    assert await db.list_collection_names() == []


async def test_log_records_carry_structured_fields(db: Any, bootmigrate_log: Any) -> None:
    await migrate(db, recorders(1, 2))
    await migrate(db, recorders(1, 2))

    def events(name: str) -> list[Any]:
        return [r for r in bootmigrate_log.records if getattr(r, "event", None) == name]

    applied = events("migration_applied")
    assert [(r.migration_version, r.migration_name) for r in applied] == [
        (1, "step_1"),
        (2, "step_2"),
    ]
    assert all(r.duration_s >= 0 and r.direction == "up" for r in applied)
    assert [r.db_version for r in events("migrations_done")] == [2]
    assert [r.db_version for r in events("up_to_date")] == [2]
    assert events("acquired")[0].target_version == 2
