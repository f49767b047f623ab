"""bootmigrate: MongoDB migrations applied once, safely, when many replicas boot at once.

>>> report = await migrate(db, "migrations")  # doctest: +SKIP
"""

from .errors import (
    ControlLocked,
    DatabaseAhead,
    DatabaseUnavailable,
    InvalidControlDocument,
    InvalidMigrations,
    InvalidTarget,
    LockLost,
    MigrationError,
    MigrationFailed,
    UnsupportedUpgrade,
)
from .holder import MigrationContext
from .migrations import Migration, load_migrations
from .report import MigrationReport
from .runner import migrate

__all__ = [
    "ControlLocked",
    "DatabaseAhead",
    "DatabaseUnavailable",
    "InvalidControlDocument",
    "InvalidMigrations",
    "InvalidTarget",
    "LockLost",
    "Migration",
    "MigrationContext",
    "MigrationError",
    "MigrationFailed",
    "MigrationReport",
    "UnsupportedUpgrade",
    "load_migrations",
    "migrate",
]
