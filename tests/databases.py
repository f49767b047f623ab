"""Databases a test makes for itself, each dropped when the test (or one run of it) ends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from pymongo import MongoClient

from tests.clients import open_client


def new_db_name() -> str:
    """A database name no other test uses, so tests can share one server."""
    return f"bm_{uuid.uuid4().hex[:12]}"


@contextmanager
def sync_database(uri: str, name: str, **options: Any) -> Iterator[Any]:
    """Database ``name`` through a synchronous client of its own; dropped, and the client
    closed, when the block ends."""
    client: MongoClient[dict[str, Any]] = MongoClient(uri, **options)
    try:
        yield client[name]
    finally:
        try:
            client.drop_database(name)
        finally:
            client.close()


@asynccontextmanager
async def async_database(driver: str, uri: str, **options: Any) -> AsyncIterator[Any]:
    """A new database through a ``driver`` client of its own; dropped, and the client
    closed, when the block ends."""
    name = new_db_name()
    async with open_client(driver, uri, **options) as client:
        try:
            yield client[name]
        finally:
            await client.drop_database(name)


@contextmanager
def run_database(sync_db: Any, run: int) -> Iterator[Any]:
    """A database for run ``run`` of a scenario repeated in one test, named after the test's
    own ``sync_db`` and on its client; dropped when the run ends, pass or fail."""
    db = sync_db.client[f"{sync_db.name}_{run}"]
    try:
        yield db
    finally:
        sync_db.client.drop_database(db.name)
