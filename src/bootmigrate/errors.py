"""The error family: every failure ``migrate()`` raises is a :class:`MigrationError`.

Each message says what happened, where, at which version, and the command that fixes it,
because the person reading it is usually an operator looking at a pod that will not boot.
"""

from __future__ import annotations


class MigrationError(Exception):
    """Base class of every error bootmigrate raises on purpose."""


class MigrationFailed(MigrationError):
    """A migration run by this call raised; the control lock is left stuck on purpose."""

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message)
        self.version = version


class ControlLocked(MigrationError):
    """The lock is stuck after an earlier failure, or still held when the wait ran out."""

    def __init__(self, message: str, *, control: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.control = control


class LockLost(ControlLocked):
    """This call held the lock but another process took it over (this one was presumed dead).

    The holder stops at once and writes nothing more to the control document.
    """


class UnsupportedUpgrade(MigrationError):
    """The database is older than the oldest version this build can upgrade from."""


class DatabaseAhead(MigrationError):
    """The database is newer than this build's latest migration, and that was refused."""


class InvalidMigrations(MigrationError):
    """The migration set is malformed: nothing was written to the database."""


class InvalidControlDocument(MigrationError):
    """The control document has a shape bootmigrate will not guess about."""


class DatabaseUnavailable(MigrationError):
    """The server could not be reached before the deadline."""


class InvalidTarget(MigrationError, ValueError):
    """The requested target or rerun version cannot be reached from here."""
