"""The framework helpers, driven by each framework's own test client, on both drivers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient as AiohttpClient
from aiohttp.test_utils import TestServer
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from bootmigrate import ControlLocked, MigrationReport
from bootmigrate.integrations.aiohttp import REPORT, migrate_context
from bootmigrate.integrations.fastapi import migrate_lifespan
from tests.clients import close_client, make_client
from tests.in_process import recorders


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

    with pytest.raises(ControlLocked, match="boom"), TestClient(app):
        pass

    assert sync_db.ran.count_documents({}) == 0


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


@pytest.mark.anyio
async def test_aiohttp_cleanup_ctx_migrates_before_serving(
    driver: str, mongo_uri: str, db_name: str, sync_db: Any
) -> None:
    client_key = web.AppKey("client", object)

    async def own_client(app: web.Application) -> AsyncIterator[None]:
        app[client_key] = make_client(driver, mongo_uri)
        yield
        await close_client(app[client_key])

    async def report(request: web.Request) -> web.Response:
        found = request.app[REPORT]
        return web.json_response({"applied": found.applied, "holder": found.holder})

    app = web.Application()
    app.cleanup_ctx.append(own_client)
    app.cleanup_ctx.append(
        migrate_context(lambda app: app[client_key][db_name], recorders(1, 2, 3))
    )  # type: ignore[index]
    app.router.add_get("/report", report)

    async with AiohttpClient(TestServer(app)) as client:
        assert sync_db.ran.count_documents({}) == 3
        response = await client.get("/report")
        assert await response.json() == {"applied": [1, 2, 3], "holder": True}
