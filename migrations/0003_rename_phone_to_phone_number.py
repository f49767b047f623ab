"""Rename customers.phone to phone_number."""

from typing import Any

from bootmigrate import MigrationContext

# $rename only matches documents that still have the old field.
idempotent = True


async def up(db: Any, ctx: MigrationContext) -> None:
    result = await db.customers.update_many(
        {"phone": {"$exists": True}}, {"$rename": {"phone": "phone_number"}}
    )
    ctx.log.info("renamed phone to phone_number on %d customers", result.modified_count)


async def down(db: Any, ctx: MigrationContext) -> None:
    await db.customers.update_many(
        {"phone_number": {"$exists": True}}, {"$rename": {"phone_number": "phone"}}
    )
