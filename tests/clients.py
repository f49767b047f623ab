"""Async clients for both drivers bootmigrate supports, made and closed the same way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

DRIVERS = ("motor", "pymongo")


def make_client(driver: str, uri: str, **options: Any) -> Any:
    """A Motor or PyMongo async client for ``uri``."""
    if driver == "motor":
        from motor.motor_asyncio import AsyncIOMotorClient

        return AsyncIOMotorClient(uri, **options)
    from pymongo import AsyncMongoClient

    return AsyncMongoClient(uri, **options)


async def close_client(client: Any) -> None:
    """Close either driver's client: PyMongo's close is a coroutine, Motor's is not."""
    result = client.close()
    if hasattr(result, "__await__"):
        await result


@asynccontextmanager
async def open_client(driver: str, uri: str, **options: Any) -> AsyncIterator[Any]:
    """A client from :func:`make_client`, closed when the block ends."""
    client = make_client(driver, uri, **options)
    try:
        yield client
    finally:
        await close_client(client)
