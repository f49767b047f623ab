"""Starlette (and FastAPI) lifespan: migrate before the app accepts requests, or while it
serves; and a readiness endpoint.

    app = FastAPI(lifespan=migrate_lifespan(lambda app: client["shop"], "migrations"))
    app.add_route("/readyz", readiness)

The :class:`~bootmigrate.MigrationReport` is put on ``app.state.migrations`` once migrated;
where the boot migration stands (:class:`BootMigration`) is ``app.state.bootmigrate``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..migrations import MigrationSource
from ..runner import migrate_with
from ..settings import Settings
from . import DatabaseOrFactory, check_flags, resolve_database, settings_of
from .boot import NOT_CONFIGURED, Background, BootMigration, boot_or_say_why

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]

BOOT_STATE = "bootmigrate"  # the attribute of app.state holding the BootMigration

__all__ = ["BOOT_STATE", "BootMigration", "Lifespan", "migrate_lifespan", "readiness"]


def migrate_lifespan(
    db: DatabaseOrFactory,
    migrations: MigrationSource,
    *,
    lifespan: Lifespan | None = None,
    state_name: str = "migrations",
    settings: Settings | None = None,
    serve_while_migrating: bool = False,
    exit_on_failure: bool = False,
    **options: Any,
) -> Lifespan:
    """A lifespan that runs ``migrate(db, migrations, **options)`` at startup.

    ``lifespan`` is the app's own, entered first (so it can create the client that ``db``, a
    factory taking the app, then returns) and left last; what it yields is passed on.
    The options (a :class:`~bootmigrate.Settings`, and/or ``migrate()``'s keywords on top of
    it) are checked here, when the app is built: a misspelt one raises ``TypeError`` now.

    By default the startup awaits the migration, so the app serves only once migrated, and
    SIGTERM or SIGINT during it stops it at once (:func:`~.signals.until_signalled`; servers
    such as uvicorn would otherwise sit out the whole call): the startup fails with
    :class:`~.signals.StoppedBySignal` and the server exits. Only where the startup runs in
    the main thread, the one Python lets set signal handlers (servers run it there; a test
    client does not, and then only the server's own handling applies).
    ``serve_while_migrating=True``: the app starts at once and the migration runs in a
    background task; :func:`readiness` answers 503 until it is done, and with the reason if
    it fails. A call that ended in what passes (a wait that ran out, an unreachable server) is
    made again after a pause (:class:`~.boot.Background`). ``exit_on_failure=True`` then also
    stops the server on a final failure (SIGTERM, so it shuts down cleanly). The app's
    shutdown cancels a migration still running.
    """
    checked = settings_of(settings, options)
    check_flags(serve_while_migrating=serve_while_migrating, exit_on_failure=exit_on_failure)

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        async with AsyncExitStack() as stack:
            state = None
            if lifespan is not None:
                state = await stack.enter_async_context(lifespan(app))
            boot = BootMigration()
            setattr(app.state, BOOT_STATE, boot)
            database = resolve_database(db, app)

            def keep(report: Any) -> None:
                setattr(app.state, state_name, report)

            if serve_while_migrating:
                background = Background(
                    boot,
                    lambda: migrate_with(database, migrations, checked),
                    exit_on_failure=exit_on_failure,
                    on_report=keep,
                )
                # Left before the app's own lifespan: the client is still open meanwhile.
                stack.push_async_callback(background.stop)
            else:
                report = await boot_or_say_why(lambda: migrate_with(database, migrations, checked))
                boot.done(report)
                keep(report)
            yield state

    return run


async def readiness(request: Request) -> JSONResponse:
    """A readiness endpoint: ``app.add_route("/readyz", readiness)``.

    200 with the migration report once the app is migrated; 503 with
    ``{"ready": false, "state": "migrating"|"failed", "reason": ...}`` before that, or after
    a failure. Works in both modes (in the blocking one it only ever answers 200).

    It reads ``request.app.state``: add it to the app given the lifespan. Under a ``Mount``,
    ``request.app`` is the mounted sub-app, which has no lifespan of its own run, so there it
    answers 503 "no bootmigrate integration on this app".
    """
    boot: BootMigration | None = getattr(request.app.state, BOOT_STATE, None)
    status, body = boot.readiness() if boot is not None else NOT_CONFIGURED
    return JSONResponse(body, status_code=status)
