"""The smallest service using each integration, run as a real server process by the tests.

Configured by the environment: BM_URI, BM_DB, BM_DRIVER (motor or pymongo), BM_MIGRATIONS,
BM_OPTIONS (JSON: ``migrate()``'s options plus ``serve_while_migrating`` and
``exit_on_failure``). Serves ``/healthz`` (liveness) and ``/readyz`` (the library's
readiness handler). Logs bootmigrate's records to stderr, where the tests read its progress.
BM_SIGTERM_ON: this process sends itself SIGTERM at the first bootmigrate log line containing
that text (a real signal at a point a test cannot hit from outside: between two migrations).

    uvicorn --factory tests.served_app:starlette_app
    gunicorn -k uvicorn.workers.UvicornWorker 'tests.served_app:starlette_app()'
    python tests/served_app.py PORT          # aiohttp's web.run_app
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.clients import close_client, make_client


class SignalAt(logging.Handler):
    """Sends this process SIGTERM once, at the first record containing ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__(logging.DEBUG)
        self.fragment = fragment

    def emit(self, record: logging.LogRecord) -> None:
        if self.fragment and self.fragment in record.getMessage():
            self.fragment = ""
            os.kill(os.getpid(), signal.SIGTERM)


def configure() -> tuple[str, dict[str, Any]]:
    logging.basicConfig(
        level=logging.INFO, format="%(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if os.environ.get("BM_SIGTERM_ON"):
        logging.getLogger("bootmigrate").addHandler(SignalAt(os.environ["BM_SIGTERM_ON"]))
    return os.environ["BM_MIGRATIONS"], json.loads(os.environ.get("BM_OPTIONS", "{}"))


def starlette_app() -> Any:
    """The Starlette variant (uvicorn, gunicorn with uvicorn workers)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse

    from bootmigrate.integrations.starlette import migrate_lifespan, readiness

    migrations, options = configure()

    @asynccontextmanager
    async def connect(app: Any) -> AsyncIterator[None]:
        app.state.client = make_client(os.environ["BM_DRIVER"], os.environ["BM_URI"])
        yield
        await close_client(app.state.client)

    async def healthz(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        lifespan=migrate_lifespan(
            lambda app: app.state.client[os.environ["BM_DB"]],
            migrations,
            lifespan=connect,
            **options,
        )
    )
    app.add_route("/healthz", healthz)
    app.add_route("/readyz", readiness)
    return app


def aiohttp_app() -> Any:
    """The aiohttp variant (``web.run_app``)."""
    from aiohttp import web

    from bootmigrate.integrations.aiohttp import migrate_context, readiness

    migrations, options = configure()
    client_key = web.AppKey("client", object)

    async def connect(app: web.Application) -> AsyncIterator[None]:
        app[client_key] = make_client(os.environ["BM_DRIVER"], os.environ["BM_URI"])
        yield
        await close_client(app[client_key])

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.cleanup_ctx.append(connect)
    app.cleanup_ctx.append(
        migrate_context(
            lambda app: app[client_key][os.environ["BM_DB"]],  # type: ignore[index]
            migrations,
            **options,
        )
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readiness)
    return app


if __name__ == "__main__":
    from aiohttp import web

    web.run_app(aiohttp_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
