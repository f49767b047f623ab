"""Waiting for a condition another process or the server brings about, with a deadline."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


async def wait_for(
    predicate: Callable[[], Any], within: float, what: str, every: float = 0.02
) -> Any:
    """:func:`wait_until` for a coroutine: napping lets the event loop run meanwhile. The
    predicate may be a coroutine function (its result is awaited, not taken as true)."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await anyio.sleep(every)


def wait_past_lease(sync_db: Any, heartbeat: datetime, lease: float, whose: str) -> None:
    """Wait until the server's clock is more than ``lease`` seconds past ``heartbeat``: the
    lease is over as bootmigrate measures it, whatever the test machine's clock says."""
    wait_until(
        lambda: (sync_db.command("hello")["localTime"] - heartbeat).total_seconds() > lease,
        30,
        f"{whose} lease to expire",
    )
