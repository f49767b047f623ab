"""The example service's configuration, from the environment."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

# MIGRATE_AT_BOOT: how a replica deals with migrations at boot, as the integration's options.
MODES: dict[str, dict[str, Any]] = {
    # Migrate in the startup (or wait for the replica that does); listen once migrated.
    "apply": {},
    # Only wait until something else (a Job, a Helm hook) has migrated; never take the lock.
    "wait": {"apply": False},
    # Listen at once; migrate in a background task; /readyz answers 503 until done.
    "background": {"serve_while_migrating": True},
}


@dataclass(frozen=True)
class Settings:
    mongodb_uri: str
    database: str
    migrations: str
    replica: str
    port: int
    driver: str = "pymongo"
    migrate_at_boot: str = "apply"

    def __post_init__(self) -> None:
        if self.migrate_at_boot not in MODES:
            raise ValueError(
                f"MIGRATE_AT_BOOT must be one of {', '.join(MODES)}, got {self.migrate_at_boot!r}"
            )

    @property
    def boot_options(self) -> dict[str, Any]:
        """The integration's options for MIGRATE_AT_BOOT."""
        return dict(MODES[self.migrate_at_boot])

    def client(self) -> Any:
        """A client of the configured async driver: bootmigrate works with either."""
        if self.driver == "motor":
            from motor.motor_asyncio import AsyncIOMotorClient

            return AsyncIOMotorClient(self.mongodb_uri)
        from pymongo import AsyncMongoClient

        return AsyncMongoClient(self.mongodb_uri)


def load() -> Settings:
    return Settings(
        mongodb_uri=os.environ.get("MONGODB_URI", "mongodb://localhost:27017"),
        # The CLI's variable, so that the service and `bootmigrate` name the database alike;
        # MONGODB_DB is still read for deployments that set only that.
        database=os.environ.get("BOOTMIGRATE_DB") or os.environ.get("MONGODB_DB", "shop"),
        migrations=os.environ.get("BOOTMIGRATE_MIGRATIONS", str(MIGRATIONS)),
        replica=os.environ.get("REPLICA", socket.gethostname()),
        port=int(os.environ.get("PORT", "8000")),
        driver=os.environ.get("MONGODB_DRIVER", "pymongo"),
        migrate_at_boot=os.environ.get("MIGRATE_AT_BOOT", "apply"),
    )


async def close(client: Any) -> None:
    """Close a client of either driver (motor's close is synchronous)."""
    closing = client.close()
    if closing is not None:
        await closing


def configure_logging(replica: str) -> None:
    """Plain lines a person can follow, each naming the replica; bootmigrate's records carry
    structured fields too (``record.event`` and friends) for a JSON formatter to ship."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {replica} %(name)s %(levelname)s %(message)s",
        force=True,
    )
