"""The Rocket.Chat (meteor-migrations) algorithm as its documentation describes it, written
here only to be measured beside bootmigrate on the same workloads: one control document, a
lock taken by an update on ``locked: false``, a fixed 10 s retry while it is held, the version
written after each migration; no lease, heartbeat or fencing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

RETRY_S = 10.0

Step = tuple[int, Callable[[Any], Awaitable[None]]]


async def migrate(db: Any, steps: list[Step]) -> bool:
    """Returns whether this call ran the migrations (held the lock)."""
    control = db.migrations
    latest = steps[-1][0] if steps else 0
    while True:
        doc = await control.find_one({"_id": "control"})
        if doc is None:
            await control.update_one(
                {"_id": "control"}, {"$setOnInsert": {"locked": False, "version": 0}}, upsert=True
            )
            continue
        if doc["version"] >= latest:
            return False
        taken = await control.find_one_and_update(
            {"_id": "control", "locked": False}, {"$set": {"locked": True}}
        )
        if taken is None:
            await asyncio.sleep(RETRY_S)  # "control is locked": try again later
            continue
        for version, up in steps:
            if version > taken["version"]:
                await up(db)
                await control.update_one({"_id": "control"}, {"$set": {"version": version}})
        await control.update_one({"_id": "control"}, {"$set": {"locked": False}})
        return True
