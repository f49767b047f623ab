"""Backfill customers.display_name from first and last names, in batches."""

import asyncio
import os
from typing import Any

from pymongo import UpdateOne

from bootmigrate import MigrationContext

# Only documents still missing display_name are touched, so a re-run finishes the job.
idempotent = True

BATCH = 500
# Pause between batches so a large backfill does not starve the live traffic.
PAUSE_S = float(os.environ.get("BACKFILL_PAUSE_S", "0.05"))


async def up(db: Any, ctx: MigrationContext) -> None:
    missing = {"display_name": {"$exists": False}}
    total = await db.customers.count_documents(missing)
    done = 0
    while True:
        batch = (
            await db.customers.find(missing, {"first_name": 1, "last_name": 1})
            .limit(BATCH)
            .to_list(None)
        )
        if not batch:
            break
        await db.customers.bulk_write(
            [
                UpdateOne(
                    {"_id": customer["_id"], **missing},
                    {"$set": {"display_name": _display_name(customer)}},
                )
                for customer in batch
            ],
            ordered=False,
        )
        done += len(batch)
        ctx.log.info("display_name backfill: %d/%d customers", done, total)
        await asyncio.sleep(PAUSE_S)


def _display_name(customer: dict[str, Any]) -> str:
    parts = (customer.get("first_name"), customer.get("last_name"))
    return " ".join(part for part in parts if part)


async def down(db: Any, ctx: MigrationContext) -> None:
    await db.customers.update_many({}, {"$unset": {"display_name": ""}})
