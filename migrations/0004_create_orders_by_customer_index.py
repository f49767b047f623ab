"""Index orders by customer and date, for a customer's order history."""

from typing import Any

from bootmigrate import MigrationContext

idempotent = True


async def up(db: Any, ctx: MigrationContext) -> None:
    await db.orders.create_index(
        [("customer_email", 1), ("created_at", -1)], name="customer_recent_orders"
    )


async def down(db: Any, ctx: MigrationContext) -> None:
    await db.orders.drop_index("customer_recent_orders")
