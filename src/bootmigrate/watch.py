"""Waking waiters the moment the control document changes.

Where the deployment supports change streams (replica sets and sharded clusters; detected by
trying, not assumed), a waiter follows the control document's changes and re-reads it as soon
as they can change its decision: the lock taken, handed over, released or stuck, a migration
finished (``WAKES_ON``). A holder's heartbeats and progress writes, which change nothing but
``beats``, ``heartbeat`` and ``running.progress``, do not wake it: the server filters them out,
so a migration reporting progress ten times a second costs its waiters nothing; their polls
(at most ``max_poll_interval`` apart) still see the heartbeat move, which is all the lease rule
needs. Elsewhere (a standalone server) a waiter sleeps its backoff, as before. Either way the
lock's semantics are the same: a wake only triggers the same read and the same decision a poll
would.
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

# The fields whose change wakes a waiter: every write that can change its decision sets one
# of these (or removes a field, or replaces or deletes the document). Dotted progress paths
# (``running.progress.done``) are reported under their own dotted names, not under ``running``.
WAKES_ON = (
    "locked",
    "token",
    "version",
    "failure",
    "running",
    "unfinished",
    "acquisition",
    "owner",
)


def wake_pipeline() -> list[dict[str, Any]]:
    """The change-stream pipeline of the control document's changes that wake a waiter."""
    updated = "updateDescription.updatedFields"
    return [
        {
            "$match": {
                "documentKey._id": CONTROL_ID,
                "$or": [
                    {"operationType": {"$ne": "update"}},
                    {"updateDescription.removedFields.0": {"$exists": True}},
                    *({f"{updated}.{name}": {"$exists": True}} for name in WAKES_ON),
                ],
            }
        }
    ]


# The least time between two getMores after an empty batch: at most two a second, however
# often a holder writes what does not wake its waiters; the most a wake is delayed by it.
EMPTY_BATCH_PACE = 0.5

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
        try:
            stream = await open_change_stream(self._coll, wake_pipeline(), self._idle_wait)
        except PyMongoError as exc:
            self.available = False
            log.debug("change streams unavailable (%s); waiting replicas poll", exc)
            return
        try:
            self.available = True
            self._changed.set()  # a change may have landed before the stream opened
            while stream.alive:
                asked = anyio.current_time()
                if await stream.try_next() is not None:
                    self._changed.set()
                    continue
                # An empty batch. A server that answers a getMore as soon as any change lands,
                # even one the pipeline filters out (a heartbeat, a progress write), would
                # otherwise be asked again at once, once per such write: ask at most every
                # EMPTY_BATCH_PACE seconds. A change landing meanwhile waits in the stream.
                await anyio.sleep(max(0.0, asked + EMPTY_BATCH_PACE - anyio.current_time()))
        except PyMongoError as exc:
            self.available = False
            log.debug("change stream ended (%s); waiting replicas poll", exc)
        finally:
            # Shielded so that the cursor is closed on the server, but bounded: a stop while
            # waiting must not wait on a partitioned server's killCursors.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECONDS):
                await stream.close()
