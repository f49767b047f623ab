"""aiohttp ``cleanup_ctx``: migrate before the app accepts requests, or while it serves; and a
readiness handler.

    app.cleanup_ctx.append(migrate_context(lambda app: app[DB], "migrations"))
    app.router.add_get("/readyz", readiness)

Where the boot migration stands (:class:`BootMigration`, with the report once migrated) is
``app[BOOT]``; when the startup awaited the migration, the report is also ``app[REPORT]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ..migrations import MigrationSource
from ..report import MigrationReport
from ..runner import migrate_with
from ..settings import Settings
from . import DatabaseOrFactory, check_flags, resolve_database, settings_of
from .boot import NOT_CONFIGURED, Background, BootMigration, boot_or_say_why

REPORT: web.AppKey[MigrationReport] = web.AppKey("bootmigrate_report", MigrationReport)
BOOT: web.AppKey[BootMigration] = web.AppKey("bootmigrate_boot", BootMigration)

__all__ = ["BOOT", "REPORT", "BootMigration", "migrate_context", "readiness"]


def migrate_context(
    db: DatabaseOrFactory,
    migrations: MigrationSource,
    *,
    settings: Settings | None = None,
    serve_while_migrating: bool = False,
    exit_on_failure: bool = False,
    **options: Any,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry that runs ``migrate(db, migrations, **options)`` at startup.

    Put it after the entry that creates the database client, and pass a factory that reads
    it from the app. The options (a :class:`~bootmigrate.Settings`, and/or ``migrate()``'s
    keywords on top of it) are checked here: a misspelt one raises ``TypeError`` now.

    By default the startup awaits the migration; SIGTERM or SIGINT during it stops it at
    once with :class:`~.signals.StoppedBySignal` (or, under ``web.run_app``, which cancels
    its startup itself, with the cancellation), logging why; only where the startup runs in
    the main thread, the one Python lets set signal handlers.
    ``serve_while_migrating=True``: the app starts at once and the migration runs in a
    background task; :func:`readiness` answers 503 until it is done, and with the reason if
    it fails (the report is then ``app[BOOT].report``: a started app's items are frozen). A
    call that ended in what passes (a wait that ran out, an unreachable server) is made again
    after a pause (:class:`~.boot.Background`). ``exit_on_failure=True`` then also stops the
    server on a final failure (SIGTERM, so it shuts down cleanly). The app's cleanup cancels a
    migration still running.
    """
    checked = settings_of(settings, options)
    check_flags(serve_while_migrating=serve_while_migrating, exit_on_failure=exit_on_failure)

    async def run(app: web.Application) -> AsyncIterator[None]:
        boot = BootMigration()
        app[BOOT] = boot
        database = resolve_database(db, app)
        if serve_while_migrating:
            background = Background(
                boot,
                lambda: migrate_with(database, migrations, checked),
                exit_on_failure=exit_on_failure,
            )
            try:
                yield
            finally:
                await background.stop()
            return
        report = await boot_or_say_why(lambda: migrate_with(database, migrations, checked))
        boot.done(report)
        app[REPORT] = report
        yield

    return run


async def readiness(request: web.Request) -> web.Response:
    """A readiness handler: ``app.router.add_get("/readyz", readiness)``.

    200 with the migration report once the app is migrated; 503 with
    ``{"ready": false, "state": "migrating"|"failed", "reason": ...}`` before that, or after
    a failure. Works in both modes (in the blocking one it only ever answers 200), and on a
    sub-application (``app.add_subapp``) of the app that migrates.
    """
    # config_dict: this app's items, then its parents'. request.app is the sub-app that
    # routed the request, which the cleanup_ctx, on the main app, never saw.
    boot = request.config_dict.get(BOOT)
    status, body = boot.readiness() if boot is not None else NOT_CONFIGURED
    return web.json_response(body, status=status)
