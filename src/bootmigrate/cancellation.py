"""Cancellation that respects shields, whoever cancels.

asyncio's own ``Task.cancel()`` (what uvicorn, aiohttp and a plain ``task.cancel()`` do) throws
into whatever the task awaits, shielded or not; only anyio's cancel scopes honour
``CancelScope(shield=True)``. The lock's bookkeeping writes and a migration's shutdown grace
rely on shields, so a call runs its work in a child task: a native cancellation of the
caller then reaches the work as a cancellation of the task group's scope, which shields hold
back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

# anyio imports its asyncio backend when a task group is first made (about 20 ms): loaded
# with bootmigrate, so that it is not paid inside the first migrate() of a process. Every
# call needs it (motor and PyMongo async run on asyncio only).
import anyio._backends._asyncio

T = TypeVar("T")


async def in_child_task(work: Callable[[], Awaitable[T]]) -> T:
    """``await work()`` in a child task, so that shields inside it hold against any
    cancellation of the caller; its result or exception is the caller's, unwrapped."""
    outcome: list[T] = []
    failure: list[Exception] = []

    async def run() -> None:
        try:
            outcome.append(await work())
        except Exception as exc:  # raised below, as is, rather than in an exception group
            failure.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
    if failure:
        raise failure[0]
    if not outcome:  # the work was cancelled, and the cancellation was the caller's own
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("the migration call ended without a result")  # pragma: no cover
    return outcome[0]
