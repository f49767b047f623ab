"""A control collection that takes no writes gets a clear error, in bounded time and with a
bounded number of commands, and every state of a call sends about ten commands a second at
most.

The unwritable collection is a view on a collection holding a free control document. MongoDB
refuses findAndModify on a view (error 166, CommandNotSupportedOnView); SecantusDB answers it
with ``value: null``, as if another process had won the lock, which is the silent case: the
re-read shows the same free document again and again. Both must end in a ``DatabaseError``
that names the view, well within ``wait_timeout``, instead of a loop of reads and writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from bootmigrate import ControlLocked, DatabaseError, migrate
from tests.clients import open_client
from tests.command_monitor import CommandLog
from tests.in_process import recorders
from tests.migration_files import recording_migrations
from tests.processes import Replicas, start_blocked_holder

WAIT_TIMEOUT = 3.0
# One read's grace past the deadline, plus scheduling.
LATE_BY_AT_MOST = 1.5
# About ten commands a second, plus a change stream's opening and a client's closing.
COMMANDS_PER_SECOND = 10
COMMANDS_ASIDE = 5


def over_rate(log: CommandLog, seconds: float) -> bool:
    """Whether a call that lasted ``seconds`` sent more than about ten commands a second."""
    return log.total() > COMMANDS_PER_SECOND * max(seconds, 1.0) + COMMANDS_ASIDE


@pytest.fixture
def control_view(sync_db: Any) -> dict[str, Any]:
    """``migrations`` as a view on ``control_source``, which holds a free control document."""
    free = {"_id": "control", "locked": False, "version": 0}
    sync_db.control_source.insert_one(free)
    sync_db.create_collection("migrations", viewOn="control_source", pipeline=[])
    return free


@pytest.mark.anyio
async def test_a_view_as_control_collection_is_a_clear_error_not_a_spin(
    driver: str, mongo_uri: str, sync_db: Any, control_view: dict[str, Any]
) -> None:
    log = CommandLog()
    async with open_client(driver, mongo_uri, event_listeners=[log]) as client:
        started = time.monotonic()
        # A guard for the test itself: without the fix the call never ends.
        with anyio.fail_after(WAIT_TIMEOUT + 10), pytest.raises(DatabaseError) as caught:
            await migrate(client[sync_db.name], recorders(1), wait_timeout=WAIT_TIMEOUT)
        elapsed = time.monotonic() - started

    error = caught.value
    assert "take the migration lock" in error.operation
    assert "is 'migrations' a view" in str(error) or "is a view" in str(error), str(error)
    assert elapsed <= WAIT_TIMEOUT + LATE_BY_AT_MOST, elapsed
    counts = log.counts()
    # Tried at most three times a second, for the second it takes to be sure.
    assert counts["findAndModify"] <= 6, counts
    assert not over_rate(log, elapsed), (log.total(), elapsed, counts)
    assert list(sync_db.control_source.find()) == [control_view]
    assert "ran" not in sync_db.list_collection_names()


@pytest.mark.anyio
async def test_a_live_holder_is_waited_for_at_about_ten_commands_a_second(
    driver: str, mongo_uri: str, sync_db: Any, tmp_path: Path
) -> None:
    # A short lease, so the holder beats (and wakes the waiter's change stream) twice a
    # second; the waiter must not look again at each wake-up, nor spin at its deadline.
    migrations = recording_migrations(tmp_path / "m", 2)
    holder = start_blocked_holder(Replicas(mongo_uri, sync_db, driver, migrations), 1, lease=1.5)
    log = CommandLog()
    try:
        async with open_client(driver, mongo_uri, event_listeners=[log]) as client:
            started = time.monotonic()
            with pytest.raises(ControlLocked) as caught:
                await migrate(client[sync_db.name], migrations, wait_timeout=WAIT_TIMEOUT)
            elapsed = time.monotonic() - started
    finally:
        holder.kill()

    assert caught.value.reason == "wait_timeout"
    assert elapsed <= WAIT_TIMEOUT + LATE_BY_AT_MOST, elapsed
    assert not over_rate(log, elapsed), (log.total(), elapsed, log.counts())
