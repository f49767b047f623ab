"""The lock object on its own, against the real server: acquire, adopt, take over, the lost
rule, and the operator's unlock."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from pymongo.errors import ConnectionFailure

from bootmigrate import ControlLocked, LockLost
from bootmigrate.control import Owner
from bootmigrate.drivers import server_time
from bootmigrate.history import Entry
from bootmigrate.lock import ControlLock, HeldLock, LockBusy
from bootmigrate.waiting import Deadline, WaitPolicy
from tests.in_process import control, history

pytestmark = pytest.mark.anyio

LEASE = 30.0
# A holder that beats no more (no keep-alive runs in these tests) and promised this lease is
# found dead by a taker that watches it that long.
SHORT_LEASE = 0.3


def lock_for(db: Any, name: str, lease: float = LEASE) -> ControlLock:
    owner = Owner(host=name, pid=1, build=None, lease=lease, id=f"id-{name}")
    return ControlLock(
        db, collection="migrations", history="migrations_history", owner=owner, waiting=WaitPolicy()
    )


async def acquired(lock: ControlLock) -> HeldLock:
    held = await lock.acquire(await lock.read(), Deadline.after(10))
    assert held is not None
    return held


async def taken_over(taker: ControlLock, within: float = 10.0) -> HeldLock:
    """Look at the lock until ``taker`` has watched it silent for its lease, then take it."""
    deadline = Deadline.after(within)
    while True:
        try:
            held = await taker.take_over(await taker.read(), {}, deadline)
        except LockBusy:
            assert deadline.remaining() > 0, "the lock was never found dead"
            await anyio.sleep(0.05)
            continue
        assert held is not None
        return held


async def test_acquire_creates_the_document_and_a_second_acquire_loses(db: Any) -> None:
    first, second = lock_for(db, "a"), lock_for(db, "b")
    seen = await first.read()

    held = await first.acquire(seen, Deadline.after(10))

    assert held is not None and held.token == 1
    # Planned from the same reading: too late.
    assert await second.acquire(seen, Deadline.after(10)) is None
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["owner"]["host"]) == (True, "a")


async def test_only_the_process_whose_id_is_on_the_lock_adopts_it(db: Any) -> None:
    await acquired(lock_for(db, "a"))
    seen = await lock_for(db, "a").read()

    assert lock_for(db, "a").adopt(seen) is not None
    assert lock_for(db, "b").adopt(seen) is None


async def test_a_live_holder_is_not_taken_over(db: Any) -> None:
    await acquired(lock_for(db, "a"))
    taker = lock_for(db, "b")

    with pytest.raises(LockBusy):
        await taker.take_over(await taker.read(), {}, Deadline.after(10))


async def test_once_lost_a_held_lock_writes_nothing_more(db: Any) -> None:
    old = await acquired(lock_for(db, "a", lease=SHORT_LEASE))
    new = await taken_over(lock_for(db, "b"))
    assert new.token == old.token + 1

    with pytest.raises(LockLost):
        await old.advance(5)  # fenced: finds the lock gone
    assert old.lost
    with pytest.raises(LockLost):
        await old.record(Entry(version=5, name="five", outcome="applied", direction="up"))
    with pytest.raises(LockLost):
        await old.release()

    assert await history(db) == []  # not even a history record, which no fence would stop
    doc = await control(db)
    assert doc is not None
    assert (doc["locked"], doc["version"], doc["token"]) == (True, 0, new.token)


async def test_unlock_refuses_a_live_holder_unless_forced_and_is_recorded(db: Any) -> None:
    await acquired(lock_for(db, "a"))
    operator = lock_for(db, "ops")

    with pytest.raises(ControlLocked, match="refusing to unlock: a \\(pid 1\\) is alive") as caught:
        await operator.unlock(force=False)
    assert caught.value.reason == "holder_alive"

    done = await operator.unlock(force=True)

    assert done.changed and done.before.locked
    doc = await control(db)
    assert doc is not None and doc["locked"] is False and "owner" not in doc
    records = await history(db)
    assert [(r["outcome"], r["action"]) for r in records] == [("manual", "unlock")]


async def test_a_write_being_retried_stops_once_the_lock_is_known_lost(db: Any) -> None:
    old = await acquired(lock_for(db, "a", lease=SHORT_LEASE))
    await taken_over(lock_for(db, "b"))  # the lock moves on; its old holder does not know yet
    attempts: list[str] = []

    async def insert_after_a_lost_reply() -> None:
        attempts.append("sent")
        if len(attempts) == 1:
            # Meanwhile this holder learns that its lock is gone (as its heartbeat would)...
            with pytest.raises(LockLost):
                await old.progress(1, 2)
            # ...and this first attempt's reply is lost: the kind of error a write retries.
            raise ConnectionFailure("connection closed")
        await db.stray.insert_one({"from": "the old holder"})

    with pytest.raises(LockLost):
        await old.write(insert_after_a_lost_reply)

    assert attempts == ["sent"]  # not retried once the lock was known lost
    assert await db.stray.count_documents({}) == 0


async def test_operators_see_no_lease_where_the_holder_recorded_none(db: Any) -> None:
    now = await server_time(db)
    await db.migrations.insert_one(
        {
            "_id": "control",
            "locked": True,
            "version": 2,
            "heartbeat": now,
            "owner": {"host": "by-hand", "pid": 7},  # no lease: set by hand or another tool
        }
    )
    operator = lock_for(db, "ops")

    lease = await operator.lease_of(await operator.read())
    assert (lease.lease, lease.expired) == (None, None)
    done = await operator.unlock(force=False)  # no lease: nothing says it is alive

    assert done.changed
    assert (await control(db) or {})["locked"] is False


async def test_a_holder_naming_its_next_migration_is_not_taken_over_on_an_older_look(
    db: Any,
) -> None:
    """A taker decides from a look at a lock silent for a lease, with no migration running;
    the holder wakes and names its next migration meanwhile. That write is a beat: the taker's
    compare-and-swap on the older look must fail, or both would run the migration."""
    old = await acquired(lock_for(db, "a", lease=SHORT_LEASE))
    taker = lock_for(db, "b")
    deadline = Deadline.after(10)
    while not taker.observed(seen := await taker.read()).expired:
        assert deadline.remaining() > 0, "the lock was never found silent"
        await anyio.sleep(0.05)

    await old.start({"version": 2, "name": "two", "direction": "up"})

    assert await taker.take_over(seen, {}, deadline) is None
    doc = await control(db)
    assert doc is not None and doc["owner"]["host"] == "a" and doc["running"]["version"] == 2
