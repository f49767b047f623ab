"""The example service, on aiohttp: the same customers API, migrated at boot by bootmigrate.

Run one replica with ``PORT=8001 python -m examples.aiohttp_app`` (same environment as the
FastAPI variant, MIGRATE_AT_BOOT included).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pymongo.errors import DuplicateKeyError

from bootmigrate.integrations.aiohttp import migrate_context, readiness
from examples import settings

DB = web.AppKey("db", object)
CONFIG = web.AppKey("config", settings.Settings)
routes = web.RouteTableDef()


def create_app(config: settings.Settings) -> web.Application:
    """The service; its startup connects, then migrates (before any request is served, or
    meanwhile with MIGRATE_AT_BOOT=background)."""

    async def connect(app: web.Application) -> AsyncIterator[None]:
        client = config.client()
        app[DB] = client[config.database]
        yield
        await settings.close(client)

    app = web.Application()
    app[CONFIG] = config
    app.cleanup_ctx.append(connect)
    app.cleanup_ctx.append(
        migrate_context(lambda app: app[DB], config.migrations, **config.boot_options)
    )
    app.add_routes(routes)
    # 200 with the migration report once migrated; 503 with the state and reason before.
    app.router.add_get("/readyz", readiness)
    return app


def _db(request: web.Request) -> Any:
    return request.app[DB]


@routes.post("/customers")
async def create_customer(request: web.Request) -> web.Response:
    body = await request.json()
    missing = [f for f in ("email", "first_name", "last_name") if not body.get(f)]
    if missing:
        raise web.HTTPUnprocessableEntity(text=f"missing fields: {', '.join(missing)}")
    doc = {k: body.get(k) for k in ("email", "first_name", "last_name", "phone_number")}
    doc["display_name"] = f"{doc['first_name']} {doc['last_name']}"
    try:
        await _db(request).customers.insert_one(doc)
    except DuplicateKeyError:
        raise web.HTTPConflict(text=f"a customer with email {doc['email']} exists") from None
    doc.pop("_id", None)
    return web.json_response(doc, status=201)


@routes.get("/customers/{email}")
async def get_customer(request: web.Request) -> web.Response:
    email = request.match_info["email"]
    found = await _db(request).customers.find_one({"email": email}, {"_id": 0})
    if found is None:
        raise web.HTTPNotFound(text=f"no customer with email {email}")
    return web.json_response(found)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up (a liveness probe), whether or not it is migrated."""
    return web.json_response(
        {"status": "ok", "replica": request.app[CONFIG].replica, "pid": os.getpid()}
    )


if __name__ == "__main__":
    config = settings.load()
    settings.configure_logging(config.replica)
    web.run_app(create_app(config), host="127.0.0.1", port=config.port)
