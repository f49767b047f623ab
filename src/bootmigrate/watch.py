"""Waking waiters the moment the control document changes.

Where the deployment supports change streams (replica sets and sharded clusters; detected by
trying, not assumed), a waiter follows the control document's changes and re-reads it as soon
as the holder writes (a heartbeat, a finished migration, the release). Elsewhere (a standalone
server) it sleeps its backoff, as before. Either way the lock's semantics are the same: a wake
only triggers the same read and the same decision a poll would.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from anyio.abc import TaskGroup
from pymongo.errors import PyMongoError

from .control import CONTROL_ID
from .drivers import open_change_stream

log = logging.getLogger("bootmigrate")

# How long a stream being closed may wait for the server: the server closes an abandoned
# cursor by itself, a stopping process cannot wait for one out of reach.
CLOSE_SECONDS = 0.5


class ControlWatch:
    """Naps that end early when the control document changes."""

    def __init__(self, coll: Any, tasks: TaskGroup, idle_wait: float) -> None:
        self._coll = coll
        self._tasks = tasks
        # How long the server holds an idle getMore: the cost of following, per waiter.
        self._idle_wait = idle_wait
        self._changed = anyio.Event()
        self._following = False
        #: None until tried; then whether change streams work on this deployment.
        self.available: bool | None = None

    async def nap(self, seconds: float) -> None:
        """Sleep up to ``seconds``, or until the control document changes."""
        if not self._following:
            self._following = True
            self._tasks.start_soon(self._follow)
        with anyio.move_on_after(seconds):
            await self._changed.wait()
        self._changed = anyio.Event()

    async def _follow(self) -> None:
        pipeline = [{"$match": {"documentKey._id": CONTROL_ID}}]
        try:
            stream = await open_change_stream(self._coll, pipeline, self._idle_wait)
        except PyMongoError as exc:
            self.available = False
            log.debug("change streams unavailable (%s); waiting replicas poll", exc)
            return
        try:
            self.available = True
            self._changed.set()  # a change may have landed before the stream opened
            async for _ in stream:
                self._changed.set()
        except PyMongoError as exc:
            self.available = False
            log.debug("change stream ended (%s); waiting replicas poll", exc)
        finally:
            # Shielded so that the cursor is closed on the server, but bounded: a stop while
            # waiting must not wait on a partitioned server's killCursors.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS):
                await stream.close()
