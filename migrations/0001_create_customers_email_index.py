"""Unique index on customers.email: one account per address."""

from typing import Any

from bootmigrate import MigrationContext

# Creating an index that already exists with the same options is a no-op.
idempotent = True


async def up(db: Any, ctx: MigrationContext) -> None:
    await db.customers.create_index("email", unique=True, name="email_unique")
    ctx.log.info("created unique index email_unique on customers")


async def down(db: Any, ctx: MigrationContext) -> None:
    await db.customers.drop_index("email_unique")
