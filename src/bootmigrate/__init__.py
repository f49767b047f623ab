"""bootmigrate: MongoDB migrations applied once, safely, when many replicas boot at once.

>>> report = await migrate(db, "migrations")  # doctest: +SKIP
"""

from .commands import Status, status
from .config import ConfigError, pyproject_options
from .context import MigrationContext
from .errors import (
    ControlLocked,
    DatabaseAhead,
    DatabaseError,
    DatabaseUnavailable,
    InvalidControlDocument,
    InvalidMigrations,
    InvalidTarget,
    LockLost,
    MigrationError,
    MigrationFailed,
    NotMigrated,
    OutOfOrder,
    UnsupportedUpgrade,
)
from .events import Event
from .migrations import Migration, load_migrations
from .report import MigrationReport
from .runner import migrate
from .servers import UnsupportedServer
from .settings import Settings

__all__ = [
    "ConfigError",
    "ControlLocked",
    "DatabaseAhead",
    "DatabaseError",
    "DatabaseUnavailable",
    "Event",
    "InvalidControlDocument",
    "InvalidMigrations",
    "InvalidTarget",
    "LockLost",
    "Migration",
    "MigrationContext",
    "MigrationError",
    "MigrationFailed",
    "MigrationReport",
    "NotMigrated",
    "OutOfOrder",
    "Settings",
    "Status",
    "UnsupportedServer",
    "UnsupportedUpgrade",
    "load_migrations",
    "migrate",
    "pyproject_options",
    "status",
]
