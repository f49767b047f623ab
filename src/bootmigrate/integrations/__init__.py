"""Thin adapters that run :func:`bootmigrate.migrate` in a web framework's startup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..drivers import is_async_database
from ..settings import Settings
from .signals import StoppedBySignal

__all__ = ["DatabaseOrFactory", "StoppedBySignal", "check_flags", "resolve_database", "settings_of"]

DatabaseOrFactory = Any  # a motor/PyMongo async database, or a callable(app) returning one


def resolve_database(db: DatabaseOrFactory, app: Any) -> Any:
    """``db`` itself, or what the factory returns for ``app`` (called once startup began, so
    it may read a client the app's own startup created)."""
    if is_async_database(db):
        return db
    factory: Callable[[Any], Any] = db
    return factory(app)


def settings_of(settings: Settings | None, options: dict[str, Any]) -> Settings:
    """``settings`` (default: the defaults) with ``options`` (``migrate()``'s keywords) on
    top, checked now, when the app is built, so that a misspelt or bad option fails there
    rather than at boot."""
    return (settings or Settings()).updated(**options)


def check_flags(**flags: object) -> None:
    """The integrations' own switches must be ``True`` or ``False``: a string such as
    ``"false"`` from an environment variable would otherwise mean ``True``."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
