"""The framework helpers, driven by each framework's own test client, on both drivers: the
blocking startup, serving while migrating, the readiness handlers. Real server processes
stopped by real signals are in test_shutdown.py."""

from __future__ import annotations

import os
import signal
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient as AiohttpClient
from aiohttp.test_utils import TestServer
from fastapi import FastAPI, Request
from pymongo import MongoClient
from starlette.testclient import TestClient

from bootmigrate import (
    ControlLocked,
    DatabaseUnavailable,
    Migration,
    MigrationFailed,
    MigrationReport,
    NotMigrated,
)
from bootmigrate.integrations import boot, starlette
from bootmigrate.integrations.aiohttp import BOOT, REPORT, migrate_context
from bootmigrate.integrations.aiohttp import readiness as aiohttp_readiness
from bootmigrate.integrations.fastapi import migrate_lifespan, readiness
from tests.clients import close_client, make_client
from tests.fail_points import fail_point
from tests.in_process import recorder, recorders
from tests.polling import wait_for, wait_until


def fastapi_app(driver: str, uri: str, db_name: str, **options: Any) -> FastAPI:
    events: list[str] = []

    @asynccontextmanager
    async def own_lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The app's own startup creates the client, in the loop the app runs in.
        app.state.client = make_client(driver, uri)
        events.append("own startup")
        yield
        events.append("own shutdown")
        await close_client(app.state.client)

    app = FastAPI(
        lifespan=migrate_lifespan(
            lambda app: app.state.client[db_name], recorders(1, 2), lifespan=own_lifespan, **options
        )
    )
    app.state.events = events

    @app.get("/report")
    async def report(request: Request) -> dict[str, Any]:
        found: MigrationReport = request.app.state.migrations
        return {"applied": found.applied, "to_version": found.to_version}

    return app


def test_fastapi_lifespan_migrates_before_serving(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    app = fastapi_app(driver, mongo_uri, db_name)

    with TestClient(app) as client:
        assert sync_db.ran.count_documents({}) == 2  # done before the first request
        response = client.get("/report")

    assert response.json() == {"applied": [1, 2], "to_version": 2}
    assert app.state.events == ["own startup", "own shutdown"]


def test_fastapi_lifespan_failure_stops_the_app_from_starting(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    sync_db.migrations.insert_one(
        {"_id": "control", "locked": True, "version": 0, "failure": {"version": 1, "error": "boom"}}
    )
    app = fastapi_app(driver, mongo_uri, db_name)

    with pytest.raises(ControlLocked, match="boom") as refused, TestClient(app):
        pass

    assert sync_db.ran.count_documents({}) == 0
    # What the server prints for each replica: the message, not bootmigrate's own frames.
    frames = traceback.extract_tb(refused.value.__traceback__)
    ours = {Path(f.filename) for f in frames if f"bootmigrate{os.sep}" in f.filename}
    assert ours == {Path(boot.__file__), Path(starlette.__file__)}, ours


def test_starlette_lifespan_alone_with_a_database(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    from starlette.applications import Starlette

    holder: dict[str, Any] = {}

    def database(app: Any) -> Any:
        holder["client"] = make_client(driver, mongo_uri)
        return holder["client"][db_name]

    app = Starlette(lifespan=migrate_lifespan(database, recorders(1), state_name="schema"))

    with TestClient(app) as client:
        assert app.state.schema.applied == [1]
        client.portal.call(close_client, holder["client"])  # type: ignore[union-attr]


def aiohttp_app(
    driver: str, uri: str, db_name: str, migrations: Any, **options: Any
) -> web.Application:
    """An aiohttp app whose own cleanup_ctx creates the client, then migrates with it."""
    client_key = web.AppKey("client", object)

    async def own_client(app: web.Application) -> AsyncIterator[None]:
        app[client_key] = make_client(driver, uri)
        yield
        await close_client(app[client_key])

    app = web.Application()
    app.cleanup_ctx.append(own_client)
    app.cleanup_ctx.append(
        migrate_context(lambda app: app[client_key][db_name], migrations, **options)  # type: ignore[index]
    )
    return app


@pytest.mark.anyio
async def test_aiohttp_cleanup_ctx_migrates_before_serving(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    async def report(request: web.Request) -> web.Response:
        found = request.app[REPORT]
        return web.json_response({"applied": found.applied, "holder": found.holder})

    app = aiohttp_app(driver, mongo_uri, db_name, recorders(1, 2, 3))
    app.router.add_get("/report", report)

    async with AiohttpClient(TestServer(app)) as client:
        assert sync_db.ran.count_documents({}) == 3
        response = await client.get("/report")
        assert await response.json() == {"applied": [1, 2, 3], "holder": True}


# Serving while migrating, readiness, and the options' checks.


def gate() -> tuple[threading.Event, threading.Event, Callable[[], Awaitable[None]]]:
    """A migration's ``before`` hook that says it started and waits for the test's release.
    Thread events: a test client runs the app's loop in a thread of its own."""
    started, release = threading.Event(), threading.Event()

    async def hook() -> None:
        started.set()
        await anyio.to_thread.run_sync(release.wait, abandon_on_cancel=True)

    return started, release, hook


def serving_app(driver: str, uri: str, db_name: str, migrations: Any, **options: Any) -> FastAPI:
    @asynccontextmanager
    async def own_lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = make_client(driver, uri)
        yield
        await close_client(app.state.client)

    app = FastAPI(
        lifespan=migrate_lifespan(
            lambda app: app.state.client[db_name], migrations, lifespan=own_lifespan, **options
        )
    )
    app.add_route("/readyz", readiness)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def test_fastapi_serves_while_migrating_and_is_ready_once_migrated(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    started, release, hook = gate()
    migrations = [recorder(1), recorder(2, before=hook)]
    app = serving_app(driver, mongo_uri, db_name, migrations, serve_while_migrating=True)

    with TestClient(app) as client:
        wait_until(started.is_set, 20, "migration 2 to start")
        live, unready = client.get("/healthz"), client.get("/readyz")
        release.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, 20, "readiness")
        ready = client.get("/readyz").json()

    assert live.status_code == 200  # served while the migration ran
    assert unready.status_code == 503
    assert unready.json()["state"] == "migrating" and unready.json()["ready"] is False
    assert "migrating at startup for" in unready.json()["reason"]
    assert ready["ready"] is True and ready["report"]["applied"] == [1, 2]
    assert app.state.migrations.applied == [1, 2]  # the report, as in the blocking mode
    assert app.state.bootmigrate.state == "ready"


def test_a_failure_while_serving_fails_readiness_with_an_operators_reason(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    async def broken(db: Any) -> None:
        raise RuntimeError("index build failed: duplicate key")

    migrations = [recorder(1), Migration(version=2, up=broken, name="unique_email")]
    app = serving_app(driver, mongo_uri, db_name, migrations, serve_while_migrating=True)

    with TestClient(app) as client:
        wait_until(lambda: app.state.bootmigrate.state == "failed", 20, "the failure")
        answer = client.get("/readyz")
        live = client.get("/healthz")

    body = answer.json()
    assert (answer.status_code, body["ready"], body["state"]) == (503, False, "failed")
    assert "0002 unique_email" in body["reason"] and "bootmigrate unlock" in body["reason"]
    assert "\n" not in body["reason"]
    assert live.status_code == 200
    assert isinstance(app.state.bootmigrate.error, MigrationFailed)


def test_exit_on_failure_signals_nothing_where_no_server_handles_sigterm(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any, bootmigrate_log: Any
) -> None:
    # A test client in a test run: stopping "the server" would mean killing the test runner.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    migrations = [Migration(version=1, up=failing, name="broken")]
    app = serving_app(
        driver, mongo_uri, db_name, migrations, serve_while_migrating=True, exit_on_failure=True
    )

    with TestClient(app):
        wait_until(lambda: app.state.bootmigrate.state == "failed", 20, "the failure")

    assert bootmigrate_log.has("exit_on_failure: not stopping this process")


def test_the_apps_shutdown_cancels_a_migration_still_running_in_the_background(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    started, release, hook = gate()
    migrations = [recorder(1), recorder(2, before=hook)]
    app = serving_app(
        driver, mongo_uri, db_name, migrations, serve_while_migrating=True, shutdown_grace=0.2
    )

    try:
        with TestClient(app):
            wait_until(started.is_set, 20, "migration 2 to start")
    finally:
        release.set()  # the abandoned thread may end

    found = sync_db.migrations.find_one({"_id": "control"})
    assert (found["locked"], found["version"]) == (True, 1)
    assert found["failure"]["kind"] == "interrupted"  # past its grace, not safe to re-run
    assert app.state.bootmigrate.state == "failed"
    assert "stopped: the app shut down" in app.state.bootmigrate.reason


def test_readiness_answers_200_in_the_blocking_mode_and_503_without_the_integration(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    app = serving_app(driver, mongo_uri, db_name, recorders(1))
    bare = FastAPI()
    bare.add_route("/readyz", readiness)

    with TestClient(app) as client:
        ready = client.get("/readyz")
    with TestClient(bare) as client:
        missing = client.get("/readyz")

    assert ready.status_code == 200
    assert ready.json()["report"]["applied"] == [1] and ready.json()["state"] == "ready"
    assert missing.status_code == 503 and "no bootmigrate integration" in missing.json()["reason"]


@pytest.mark.anyio
async def test_aiohttp_serves_while_migrating_and_is_ready_once_migrated(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    migrated = anyio.Event()

    async def wait_for_test() -> None:
        await migrated.wait()

    app = aiohttp_app(
        driver,
        mongo_uri,
        db_name,
        [recorder(1), recorder(2, before=wait_for_test)],
        serve_while_migrating=True,
    )
    app.router.add_get("/readyz", aiohttp_readiness)

    async with AiohttpClient(TestServer(app)) as client:
        unready = await client.get("/readyz")
        unready_body = await unready.json()
        migrated.set()
        await wait_for(
            lambda: app[BOOT].state == "ready", within=20, what="the background migration"
        )
        ready = await client.get("/readyz")
        ready_body = await ready.json()

    assert unready.status == 503 and unready_body["state"] == "migrating"
    assert ready.status == 200 and ready_body["report"]["applied"] == [1, 2]
    assert app[BOOT].report is not None and app[BOOT].report.applied == [1, 2]
    assert REPORT not in app  # a started app's items are frozen: the report is on app[BOOT]


@pytest.mark.anyio
async def test_aiohttp_readiness_in_the_blocking_mode(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    app = aiohttp_app(driver, mongo_uri, db_name, recorders(1))
    app.router.add_get("/readyz", aiohttp_readiness)

    async with AiohttpClient(TestServer(app)) as client:
        answer = await client.get("/readyz")
        body = await answer.json()

    assert answer.status == 200 and body["report"]["applied"] == [1]
    assert app[REPORT].applied == [1]


@pytest.mark.parametrize("flag", ["serve_while_migrating", "exit_on_failure"])
def test_the_integrations_switches_are_checked_when_the_app_is_built(flag: str) -> None:
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        migrate_lifespan(object(), recorders(1), **{flag: "false"})
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        migrate_context(object(), recorders(1), **{flag: 1})


async def failing(db: Any) -> None:
    raise RuntimeError("boom")


# Serving while migrating: a call that ended in what passes is made again.


def test_a_serving_wait_only_replica_that_gave_up_is_ready_once_the_database_is_migrated(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    waiter = serving_app(
        driver,
        mongo_uri,
        db_name,
        recorders(1),
        serve_while_migrating=True,
        apply=False,
        wait_timeout=1,
    )

    with TestClient(waiter) as client:
        wait_until(lambda: waiter.state.bootmigrate.attempts >= 1, 20, "the wait to give up")
        unready = client.get("/readyz").json()
        with TestClient(serving_app(driver, mongo_uri, db_name, recorders(1))):
            pass  # the replica that migrates, at last
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "readiness")

    assert unready["state"] == "migrating", unready
    assert "apply=False" in unready["reason"] and "trying again" in unready["reason"]
    assert isinstance(waiter.state.bootmigrate.last_error, NotMigrated)
    assert waiter.state.migrations.applied == []


def test_a_serving_replica_that_could_not_reach_the_server_is_ready_once_it_can(
    driver: str, fault_uri: str, db_name: str, sync_db: Any, bootmigrate_log: Any
) -> None:
    app = serving_app(
        driver, fault_uri, db_name, recorders(1), serve_while_migrating=True, wait_timeout=1
    )

    with (
        MongoClient(fault_uri, serverSelectionTimeoutMS=5000) as admin,
        TestClient(app) as client,
    ):
        with fail_point(admin, "alwaysOn", failCommands=["find"], errorCode=16500):
            wait_until(lambda: app.state.bootmigrate.attempts >= 2, 30, "two attempts")
            unready = client.get("/readyz").json()
        ready = wait_for_ready(client)

    assert unready["state"] == "migrating", unready
    assert "could not reach MongoDB" in unready["reason"], unready
    assert isinstance(app.state.bootmigrate.last_error, DatabaseUnavailable)
    assert ready["report"]["applied"] == [1]
    retries = [
        r for r in bootmigrate_log.records if getattr(r, "event", "") == "background_retrying"
    ]
    assert [r.attempt for r in retries[:2]] == [1, 2]
    assert all(r.levelname == "WARNING" for r in retries)


def wait_for_ready(client: TestClient) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        answer = client.get("/readyz")
        return answer.json() if answer.status_code == 200 else None

    found: dict[str, Any] = wait_until(ready, 30, "readiness")
    return found


def test_an_unexpected_error_while_serving_is_logged_with_its_traceback(
    sync_db: Any, bootmigrate_log: Any
) -> None:
    # A bug rather than a MigrationError: a synchronous PyMongo database given to the helper.
    app = FastAPI(
        lifespan=migrate_lifespan(lambda app: sync_db, recorders(1), serve_while_migrating=True)
    )

    with TestClient(app):
        wait_until(lambda: app.state.bootmigrate.state == "failed", 20, "the failure")

    failed = [r for r in bootmigrate_log.records if r.__dict__.get("event") == "background_failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert failed[0].exc_info[0] is TypeError and "a synchronous PyMongo database" in str(
        failed[0].exc_info[1]
    )


def test_a_migration_error_while_serving_is_logged_without_a_traceback(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any, bootmigrate_log: Any
) -> None:
    migrations = [Migration(version=1, up=failing, name="broken")]
    app = serving_app(driver, mongo_uri, db_name, migrations, serve_while_migrating=True)

    with TestClient(app):
        wait_until(lambda: app.state.bootmigrate.state == "failed", 20, "the failure")

    failed = [r for r in bootmigrate_log.records if r.__dict__.get("event") == "background_failed"]
    assert len(failed) == 1 and failed[0].exc_info is None  # its message says it all


@pytest.mark.anyio
async def test_aiohttp_readiness_answers_on_a_sub_application(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    app = aiohttp_app(driver, mongo_uri, db_name, recorders(1))
    ops = web.Application()
    ops.router.add_get("/readyz", aiohttp_readiness)
    app.add_subapp("/ops", ops)  # the migration on the main app, the probe on the sub-app

    async with AiohttpClient(TestServer(app)) as client:
        answer = await client.get("/ops/readyz")
        body = await answer.json()

    assert answer.status == 200, body
    assert body["report"]["applied"] == [1]
