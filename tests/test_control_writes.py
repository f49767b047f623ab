"""What applying a migration costs in commands: the next step's name rides on the previous
step's version write, so a migration costs two (its history record and that write)."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import Migration, migrate
from tests.clients import open_client
from tests.command_monitor import CommandLog
from tests.in_process import control, history

pytestmark = pytest.mark.anyio


def nothing(version: int) -> Migration:
    async def up(db: Any) -> None:
        return None

    return Migration(version=version, name=f"m{version}", up=up)


async def commands_to_apply(driver: str, mongo_uri: str, db_name: str, count: int) -> list[str]:
    """The commands on the control and history collections of one call applying ``count``
    migrations to a fresh database, after checking what it left behind."""
    commands = CommandLog()
    async with open_client(driver, mongo_uri, event_listeners=[commands]) as client:
        db = client[db_name]
        try:
            await db.command("ping")
            commands.clear()
            report = await migrate(db, [nothing(v) for v in range(1, count + 1)])
            ours = commands.on("migrations") + commands.on("migrations_history")
            doc = await control(db)
            records = await history(db)
        finally:
            await client.drop_database(db_name)
    assert report.applied == list(range(1, count + 1))
    assert doc is not None and (doc["locked"], doc["version"]) == (False, count)
    assert "running" not in doc and "unfinished" not in doc
    assert [(r["version"], r["outcome"]) for r in records] == [
        (v, "applied") for v in range(1, count + 1)
    ]
    return [name for name, _ in ours]


async def test_each_applied_migration_costs_two_commands(
    driver: str, mongo_uri: str, db_name: str
) -> None:
    """Its history record, and the write of its version that names the next step; the rest
    (the first read, the acquisition, the first step's name, the release) is paid once."""
    ten = await commands_to_apply(driver, mongo_uri, db_name, 10)
    twenty = await commands_to_apply(driver, mongo_uri, db_name, 20)

    assert len(twenty) - len(ten) == 2 * 10, (ten, twenty)
    assert len(ten) - 2 * 10 <= 4, ten


@pytest.mark.parametrize("transactional", [False, True], ids=["plain", "transactional"])
async def test_each_step_is_named_before_it_runs(
    driver: str, mongo_uri: str, db_name: str, transactional: bool
) -> None:
    """Every step sees itself named (running and unfinished) on the control document while it
    runs, and the version of the step before it recorded: what a taker reads after a crash.
    Also when the step before ran in a transaction, which committed the name with it."""
    seen: list[tuple[int, Any, Any]] = []

    def looking(version: int) -> Migration:
        async def up(db: Any, ctx: Any) -> None:
            doc = await db.migrations.find_one({"_id": "control"}, session=ctx.session)
            seen.append((doc["version"], doc["running"], doc["unfinished"]))

        return Migration(version=version, name=f"m{version}", up=up, transactional=transactional)

    async with open_client(driver, mongo_uri) as client:
        db = client[db_name]
        try:
            await migrate(db, [looking(v) for v in (1, 2, 3)])
        finally:
            await client.drop_database(db_name)

    for version, (at, running, unfinished) in zip((1, 2, 3), seen, strict=True):
        assert at == version - 1
        assert running == {"version": version, "name": f"m{version}", "direction": "up"}
        assert unfinished == {**running, "from_version": version - 1, "to_version": version}
