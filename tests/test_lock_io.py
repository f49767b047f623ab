"""How the lock talks to the server: pinned to the primary with majority read and write
concern whatever the caller's client says, fenced by the acquisition's own id, and
transactions retried as MongoDB prescribes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from bootmigrate import LockLost, Migration, migrate
from bootmigrate.control import Owner
from bootmigrate.lock import ControlLock
from bootmigrate.waiting import Deadline, WaitPolicy
from tests.clients import open_client
from tests.command_monitor import CommandLog
from tests.in_process import control, history, recorders
from tests.polling import wait_for

pytestmark = pytest.mark.anyio


async def test_lock_io_uses_majority_read_and_write_concern_whatever_the_client_says(
    driver: str, mongo_uri: str, db_name: str
) -> None:
    commands = CommandLog()
    async with open_client(
        driver,
        mongo_uri,
        readPreference="secondaryPreferred",
        readConcernLevel="local",
        w=1,
        event_listeners=[commands],
    ) as client:
        db = client[db_name]
        try:
            await migrate(db, recorders(1, 2))
            await migrate(db, recorders(1, 2))  # the up-to-date boot's read too
        finally:
            await client.drop_database(db_name)

    lock_commands = commands.on("migrations") + commands.on("migrations_history")
    reads = [cmd for name, cmd in lock_commands if name == "find"]
    writes = [cmd for name, cmd in lock_commands if name in ("findAndModify", "update", "insert")]
    assert len(reads) >= 2 and len(writes) >= 4
    assert all(cmd.get("readConcern") == {"level": "majority"} for cmd in reads), reads
    for cmd in writes:
        concern = cmd.get("writeConcern") or {}
        assert concern.get("w") == "majority" and concern.get("wtimeout", 0) > 0, cmd


def lock_for(db: Any, name: str) -> ControlLock:
    owner = Owner(host=name, pid=1, build=None, lease=30.0, id=f"id-{name}")
    return ControlLock(
        db, collection="migrations", history="migrations_history", owner=owner, waiting=WaitPolicy()
    )


async def test_a_token_handed_out_again_after_a_rollback_fences_the_old_holder_out(
    db: Any,
) -> None:
    """A failover rolls back A's acquire, and the new primary hands the same token number to
    B. A must not be able to write: it is fenced by its acquisition's id, not the number."""
    a = lock_for(db, "a")
    held = await a.acquire(await a.read(), Deadline.after(10))
    assert held is not None
    # What the new primary holds after the rollback and B's acquire: the same token number.
    doc = await control(db)
    assert doc is not None
    await db.migrations.replace_one(
        {"_id": "control"},
        {
            **doc,
            "owner": {**doc["owner"], "host": "b", "id": "id-b"},
            "acquisition": "b's own acquisition",
        },
    )

    assert await held.heartbeat() is False
    with pytest.raises(LockLost):
        await held.advance(5)
    after = await control(db)
    assert after is not None
    assert (after["version"], after["owner"]["host"], after["beats"]) == (0, "b", doc["beats"])
    assert a.adopt(await a.read()) is None  # nor does A take B's lock for its own


async def test_a_transaction_that_conflicts_with_an_open_one_is_run_again_until_it_commits(
    db: Any,
) -> None:
    """A dead holder's transaction stays open on the server until it is reaped; the taker's
    re-run meets WriteConflict (TransientTransactionError) meanwhile, and must outlast it."""
    tries: list[int] = []

    async def up(db: Any, ctx: Any) -> None:
        tries.append(1)
        await db.accounts.update_one(
            {"_id": "shared"}, {"$inc": {"moved": 1}}, session=ctx.session, upsert=True
        )

    await db.accounts.insert_one({"_id": "shared", "moved": 0})
    holder = db.client.start_session()
    if hasattr(holder, "__await__"):
        holder = await holder
    started = holder.start_transaction()
    if hasattr(started, "__await__"):
        await started
    # The "dead holder's" transaction: it has written the document and never ends by itself.
    await db.accounts.update_one({"_id": "shared"}, {"$set": {"by": "dead"}}, session=holder)

    outcome: list[Any] = []

    async def boot() -> None:
        outcome.append(
            await migrate(db, [Migration(version=1, up=up, name="move", transactional=True)])
        )

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(boot)
            try:
                await wait_for(lambda: len(tries) >= 2 or outcome, 20, "a second try")
                assert not outcome  # still trying, not failed
            finally:
                await holder.abort_transaction()  # the server reaps the dead holder's one
                ended = holder.end_session()
                if hasattr(ended, "__await__"):
                    await ended

    assert outcome[0].applied == [1]
    doc = await db.accounts.find_one({"_id": "shared"})
    assert doc is not None and doc["moved"] == 1 and "by" not in doc
    assert [(r["version"], r["outcome"]) for r in await history(db)] == [(1, "applied")]
    assert (await control(db) or {})["version"] == 1
