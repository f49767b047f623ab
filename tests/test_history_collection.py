"""Where history goes: a history collection named once reaches migrate(), the CLI's commands
and the integrations alike."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from bootmigrate import Settings, migrate
from bootmigrate.integrations.starlette import migrate_lifespan
from tests.clients import close_client, make_client
from tests.in_process import recorders
from tests.operator_cli import Cli


@pytest.mark.anyio
async def test_migrate_records_history_in_the_collection_named(db: Any) -> None:
    await migrate(db, recorders(1, 2), history_collection="audit")

    assert await db.audit.count_documents({"outcome": "applied"}) == 2
    assert "migrations_history" not in await db.list_collection_names()


def test_cli_commands_take_the_history_collection_from_a_flag(cli: Cli) -> None:
    assert cli("up", "--yes", "--history-collection", "audit").returncode == 0

    records = cli.json("history", "--history-collection", "audit")
    assert [r["version"] for r in records] == [3, 2, 1]
    assert cli.json("history") == []  # the default collection holds nothing
    assert "migrations_history" not in cli.db.list_collection_names()


def test_cli_commands_take_the_history_collection_from_the_environment(cli: Cli) -> None:
    env = {"BOOTMIGRATE_HISTORY_COLLECTION": "audit"}
    assert cli("up", "--yes", "--to", "1", **env).returncode == 0
    assert cli("set-version", "3", "--yes", **env).returncode == 0

    # Sorted by version: ObjectIds made by two processes within a second do not order.
    outcomes = sorted((r["version"], r["outcome"]) for r in cli.db.audit.find())
    assert outcomes == [(1, "applied"), (3, "skipped")]


def test_cli_refuses_an_unusable_collection_name_in_one_line(cli: Cli) -> None:
    done = cli("status", "--history-collection", "system.audit")

    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: history_collection 'system.audit' is not a usable collection name "
        "(no '$', no NUL, not 'system.*')"
    )


def test_an_integration_takes_a_settings_object(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    clients: list[Any] = []

    def database(app: Any) -> Any:
        clients.append(make_client(driver, mongo_uri))
        return clients[0][db_name]

    settings = Settings(collection="schema", history_collection="audit")
    app = Starlette(lifespan=migrate_lifespan(database, recorders(1, 2), settings=settings))

    with TestClient(app) as client:
        assert app.state.migrations.applied == [1, 2]
        client.portal.call(close_client, clients[0])  # type: ignore[union-attr]

    assert sync_db.schema.find_one({"_id": "control"})["version"] == 2
    assert sync_db.audit.count_documents({}) == 2
    assert "migrations" not in sync_db.list_collection_names()
