"""Async clients for both drivers bootmigrate supports, made and closed the same way."""

from __future__ import annotations

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
