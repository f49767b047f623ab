"""The example service, on FastAPI: customers over MongoDB, migrated at boot by bootmigrate.

Run one replica with ``PORT=8001 python -m examples.fastapi_app`` (or ``uvicorn --factory
examples.fastapi_app:main``); ``make demo`` runs several.
Configured by the environment: MONGODB_URI, BOOTMIGRATE_DB (as the CLI reads it; MONGODB_DB
also works), MONGODB_DRIVER (pymongo or motor),
BOOTMIGRATE_BUILD, REPLICA, PORT, and MIGRATE_AT_BOOT: ``apply`` (the default: migrate in the
lifespan, listen once migrated), ``wait`` (only wait for a Job or hook to migrate) or
``background`` (listen at once, migrate in a background task; ``/readyz`` says when done).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from pymongo.errors import DuplicateKeyError

from bootmigrate.integrations.fastapi import migrate_lifespan, readiness
from examples import settings

router = APIRouter()


class NewCustomer(BaseModel):
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    first_name: str
    last_name: str
    phone_number: str | None = None


def create_app(config: settings.Settings) -> FastAPI:
    """The service; its lifespan connects, then migrates (before any request is served, or
    meanwhile with MIGRATE_AT_BOOT=background)."""

    @asynccontextmanager
    async def connect(app: FastAPI) -> AsyncIterator[None]:
        client = config.client()
        app.state.db = client[config.database]
        yield
        await settings.close(client)

    app = FastAPI(
        title="bootmigrate example: customers",
        lifespan=migrate_lifespan(
            lambda app: app.state.db, config.migrations, lifespan=connect, **config.boot_options
        ),
    )
    app.state.config = config
    app.include_router(router)
    # 200 with the migration report once migrated; 503 with the state and reason before.
    app.add_route("/readyz", readiness)
    return app


@router.post("/customers", status_code=201)
async def create_customer(customer: NewCustomer, request: Request) -> dict[str, Any]:
    doc = customer.model_dump()
    doc["display_name"] = f"{customer.first_name} {customer.last_name}"
    try:
        await request.app.state.db.customers.insert_one(doc)
    except DuplicateKeyError:
        raise HTTPException(409, f"a customer with email {customer.email} exists") from None
    doc.pop("_id", None)
    return doc


@router.get("/customers/{email}")
async def get_customer(email: str, request: Request) -> dict[str, Any]:
    found = await request.app.state.db.customers.find_one({"email": email}, {"_id": 0})
    if found is None:
        raise HTTPException(404, f"no customer with email {email}")
    return dict(found)


@router.get("/customers")
async def list_customers(request: Request, limit: int = 20) -> list[dict[str, Any]]:
    cursor = request.app.state.db.customers.find({}, {"_id": 0}).limit(min(limit, 100))
    return list(await cursor.to_list(None))


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    """The process is up (a liveness probe), whether or not it is migrated."""
    return {"status": "ok", "replica": request.app.state.config.replica, "pid": os.getpid()}


def main() -> FastAPI:
    """The app as configured by the environment: ``uvicorn --factory examples.fastapi_app:main``."""
    config = settings.load()
    settings.configure_logging(config.replica)
    return create_app(config)


if __name__ == "__main__":
    uvicorn.run(main(), host="127.0.0.1", port=settings.load().port, log_config=None)
