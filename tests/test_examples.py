"""The example services and the top-level migrations they boot with, on both drivers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient as AiohttpClient
from aiohttp.test_utils import TestServer
from starlette.testclient import TestClient

from bootmigrate import migrate
from examples import aiohttp_app, fastapi_app
from examples.settings import MIGRATIONS, Settings, load
from tests.clients import open_client
from tests.polling import wait_for, wait_until

OLD_SHAPE = [
    {
        "email": f"c{i}@example.com",
        "first_name": f"Ada{i}",
        "last_name": "Byron",
        "phone": f"+44 {i}",
    }
    for i in range(1200)  # more than one backfill batch
]


@pytest.fixture
def sync_db(sync_db: Any) -> Any:
    """The shared fixture's database, holding customers in the previous release's shape."""
    sync_db.customers.insert_many([dict(doc) for doc in OLD_SHAPE])
    return sync_db


@pytest.fixture
def config(mongo_uri: str, db_name: str, driver: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("BACKFILL_PAUSE_S", "0")
    return Settings(
        mongodb_uri=mongo_uri,
        database=db_name,
        migrations=str(MIGRATIONS),
        replica="test-1",
        port=0,
        driver=driver,
    )


def assert_migrated(sync_db: Any) -> None:
    sample = sync_db.customers.find_one({"email": "c7@example.com"})
    assert sample["display_name"] == "Ada7 Byron"
    assert sample["phone_number"] == "+44 7" and "phone" not in sample
    assert sync_db.customers.count_documents({"display_name": {"$exists": False}}) == 0
    assert "email_unique" in sync_db.customers.index_information()
    assert "customer_recent_orders" in sync_db.orders.index_information()


def test_fastapi_example_migrates_then_serves(config: Settings, sync_db: Any) -> None:
    with TestClient(fastapi_app.create_app(config)) as client:
        ready = client.get("/readyz").json()
        created = client.post(
            "/customers",
            json={"email": "new@example.com", "first_name": "Grace", "last_name": "Hopper"},
        )
        duplicate = client.post(
            "/customers", json={"email": "new@example.com", "first_name": "G", "last_name": "H"}
        )
        found = client.get("/customers/new@example.com")
        missing = client.get("/customers/nobody@example.com")
        health = client.get("/healthz").json()

    assert ready["report"]["applied"] == [1, 2, 3, 4]
    assert (ready["ready"], ready["state"]) == (True, "ready")
    assert (health["status"], health["replica"]) == ("ok", "test-1")
    assert created.status_code == 201 and created.json()["display_name"] == "Grace Hopper"
    assert duplicate.status_code == 409  # the unique index from migration 1
    assert found.json()["first_name"] == "Grace"
    assert missing.status_code == 404
    assert_migrated(sync_db)


@pytest.mark.anyio
async def test_aiohttp_example_migrates_then_serves(config: Settings, sync_db: Any) -> None:
    async with AiohttpClient(TestServer(aiohttp_app.create_app(config))) as client:
        ready = await (await client.get("/readyz")).json()
        created = await client.post(
            "/customers",
            json={"email": "new@example.com", "first_name": "Grace", "last_name": "Hopper"},
        )
        duplicate = await client.post(
            "/customers", json={"email": "new@example.com", "first_name": "G", "last_name": "H"}
        )
        found = await (await client.get("/customers/new@example.com")).json()

    assert ready["report"]["applied"] == [1, 2, 3, 4]
    assert created.status == 201 and duplicate.status == 409
    assert found["display_name"] == "Grace Hopper"
    assert_migrated(sync_db)


@pytest.mark.anyio
async def test_example_migrations_go_down_to_the_old_shape(
    config: Settings, sync_db: Any, driver: str
) -> None:
    async with open_client(driver, config.mongodb_uri) as client:
        db = client[config.database]
        await migrate(db, Path(config.migrations))
        report = await migrate(db, Path(config.migrations), target=0)

    assert report.reverted == [4, 3, 2, 1]
    sample = sync_db.customers.find_one({"email": "c7@example.com"}, {"_id": 0})
    assert sample == OLD_SHAPE[7]
    assert "email_unique" not in sync_db.customers.index_information()
    assert "customer_recent_orders" not in sync_db.orders.index_information()


@pytest.mark.anyio
async def test_the_backfill_is_safe_to_rerun(config: Settings, sync_db: Any, driver: str) -> None:
    async with open_client(driver, config.mongodb_uri) as client:
        db = client[config.database]
        await migrate(db, Path(config.migrations))
        sync_db.customers.update_one({"email": "c3@example.com"}, {"$unset": {"display_name": ""}})
        report = await migrate(db, Path(config.migrations), rerun=2)

    assert report.applied == [2]
    assert sync_db.customers.find_one({"email": "c3@example.com"})["display_name"] == "Ada3 Byron"


def test_migrate_at_boot_background_serves_at_once_and_is_ready_once_migrated(
    config: Settings, sync_db: Any
) -> None:
    app = fastapi_app.create_app(replace(config, migrate_at_boot="background"))

    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
        ready = client.get("/readyz").json()

    assert ready["report"]["applied"] == [1, 2, 3, 4]
    assert_migrated(sync_db)


@pytest.mark.anyio
async def test_migrate_at_boot_wait_only_waits_for_a_database_migrated_elsewhere(
    config: Settings, sync_db: Any, driver: str
) -> None:
    async with open_client(driver, config.mongodb_uri) as client:  # the Job or the Helm hook
        await migrate(client[config.database], Path(config.migrations))
    before = sync_db.migrations.find_one({"_id": "control"})
    app = aiohttp_app.create_app(replace(config, migrate_at_boot="wait"))

    async with AiohttpClient(TestServer(app)) as client:
        answer = await client.get("/readyz")
        ready = await answer.json()

    assert answer.status == 200
    assert (ready["report"]["applied"], ready["report"]["holder"]) == ([], False)
    assert sync_db.migrations.find_one({"_id": "control"}) == before  # nothing written


@pytest.mark.anyio
async def test_migrate_at_boot_background_on_aiohttp(config: Settings, sync_db: Any) -> None:
    app = aiohttp_app.create_app(replace(config, migrate_at_boot="background"))

    async with AiohttpClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await wait_for(ready, within=60, what="readiness")

    assert_migrated(sync_db)


def test_migrate_at_boot_is_read_from_the_environment_and_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MIGRATE_AT_BOOT", "background")
    assert load().boot_options == {"serve_while_migrating": True}
    monkeypatch.setenv("MIGRATE_AT_BOOT", "wait")
    assert load().boot_options == {"apply": False}
    monkeypatch.delenv("MIGRATE_AT_BOOT")
    assert load().boot_options == {}
    monkeypatch.setenv("MIGRATE_AT_BOOT", "later")
    with pytest.raises(ValueError, match="MIGRATE_AT_BOOT must be one of apply, wait, background"):
        load()


@pytest.mark.parametrize(
    "env, database",
    [
        ({"BOOTMIGRATE_DB": "orders"}, "orders"),
        ({"BOOTMIGRATE_DB": "orders", "MONGODB_DB": "legacy"}, "orders"),
        ({"MONGODB_DB": "legacy"}, "legacy"),
        ({}, "shop"),
    ],
)
def test_the_example_names_its_database_as_the_cli_does(
    env: dict[str, str], database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("BOOTMIGRATE_DB", "MONGODB_DB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert load().database == database
