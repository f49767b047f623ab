"""Starlette (and FastAPI) lifespan: migrate before the app accepts requests.

    app = FastAPI(lifespan=migrate_lifespan(lambda app: client["shop"], "migrations"))

The :class:`~bootmigrate.MigrationReport` is put on ``app.state.migrations``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from ..migrations import MigrationSource
from ..runner import migrate_with
from ..settings import Settings
from . import DatabaseOrFactory, resolve_database, settings_of

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def migrate_lifespan(
    db: DatabaseOrFactory,
    migrations: MigrationSource,
    *,
    lifespan: Lifespan | None = None,
    state_name: str = "migrations",
    settings: Settings | None = None,
    **options: Any,
) -> Lifespan:
    """A lifespan that runs ``migrate(db, migrations, **options)`` at startup.

    ``lifespan`` is the app's own, entered first (so it can create the client that ``db``, a
    factory taking the app, then returns) and left last; what it yields is passed on.
    The options (a :class:`~bootmigrate.Settings`, and/or ``migrate()``'s keywords on top of
    it) are checked here, when the app is built: a misspelt one raises ``TypeError`` now.
    """
    checked = settings_of(settings, options)

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        async with AsyncExitStack() as stack:
            state = None
            if lifespan is not None:
                state = await stack.enter_async_context(lifespan(app))
            report = await migrate_with(resolve_database(db, app), migrations, checked)
            setattr(app.state, state_name, report)
            yield state

    return run
