"""aiohttp ``cleanup_ctx``: migrate before the app accepts requests.

    app.cleanup_ctx.append(migrate_context(lambda app: app[DB], "migrations"))

The :class:`~bootmigrate.MigrationReport` is stored under ``app[REPORT]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ..migrations import MigrationSource
from ..report import MigrationReport
from ..runner import migrate_with
from ..settings import Settings
from . import DatabaseOrFactory, resolve_database, settings_of

REPORT: web.AppKey[MigrationReport] = web.AppKey("bootmigrate_report", MigrationReport)


def migrate_context(
    db: DatabaseOrFactory,
    migrations: MigrationSource,
    *,
    settings: Settings | None = None,
    **options: Any,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry that runs ``migrate(db, migrations, **options)`` at startup.

    Put it after the entry that creates the database client, and pass a factory that reads
    it from the app. The options (a :class:`~bootmigrate.Settings`, and/or ``migrate()``'s
    keywords on top of it) are checked here: a misspelt one raises ``TypeError`` now.
    """
    checked = settings_of(settings, options)

    async def run(app: web.Application) -> AsyncIterator[None]:
        app[REPORT] = await migrate_with(resolve_database(db, app), migrations, checked)
        yield

    return run
