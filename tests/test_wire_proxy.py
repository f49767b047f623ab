"""The fault instrument itself: traffic passes through the wire proxy unchanged, and each
``failCommand`` action reaches the driver as it would from a real MongoDB. Runs through
``fault_uri``, so on a real MongoDB (MONGODB_URI) the server's own fail points are tested."""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import bson
import pytest
from pymongo import MongoClient
from pymongo.errors import AutoReconnect, OperationFailure, WriteConcernError

from bootmigrate.drivers import open_change_stream, transaction
from tests.clients import open_client
from tests.fail_points import command_counts, fail_point, needs_proxy, with_app_name
from tests.migration_files import recording_migrations
from tests.polling import wait_for
from tests.processes import Replicas, boot
from tests.wire_proxy import (
    CHECKSUM_PRESENT,
    OP_MSG,
    OP_QUERY,
    LegacyQuery,
    Message,
    WireProxy,
    join_op_msg,
    op_msg_body,
    parse_command,
    split_op_msg,
    without_compression,
)

pytestmark = pytest.mark.anyio

NOT_RETRYABLE = 96  # OperationFailed: no driver retries it, so one attempt is one command


@asynccontextmanager
async def proxied(driver: str, fault_uri: str, **options: Any) -> AsyncIterator[Any]:
    """A client that goes through the fault instrument."""
    options.setdefault("serverSelectionTimeoutMS", 5000)
    async with open_client(driver, fault_uri, **options) as client:
        yield client


@pytest.fixture
async def client(driver: str, fault_uri: str) -> AsyncIterator[Any]:
    async with proxied(driver, fault_uri, appname="tester") as client:
        yield client


@pytest.fixture
async def db(client: Any, sync_db: Any) -> Any:
    """The test's database through the fault instrument (``sync_db`` sees it directly)."""
    return client[sync_db.name]


async def test_plain_traffic_passes(db: Any, sync_db: Any) -> None:
    await db.things.insert_one({"_id": 1, "n": 1})
    assert await db.things.find_one({"_id": 1}) == {"_id": 1, "n": 1}
    async with transaction(db, commit_within=10) as session:
        await db.things.insert_one({"_id": 2}, session=session)
        await db.things.update_one({"_id": 1}, {"$inc": {"n": 1}}, session=session)
    assert sorted(sync_db.things.find(), key=lambda d: d["_id"]) == [{"_id": 1, "n": 2}, {"_id": 2}]
    stream = await open_change_stream(db.things, [], idle_wait=0.5)
    try:
        await db.things.insert_one({"_id": 3})
        with anyio.fail_after(20):
            change = await stream.next()
    finally:
        await stream.close()
    assert change["operationType"] == "insert" and change["documentKey"] == {"_id": 3}


async def test_error_code_reaches_the_driver_with_its_labels(
    client: Any, db: Any, sync_db: Any
) -> None:
    async with fail_point(
        client,
        {"times": 1},
        failCommands=["insert"],
        errorCode=NOT_RETRYABLE,
        errorLabels=["SomeLabel"],
    ):
        with pytest.raises(OperationFailure) as failure:
            await db.things.insert_one({"_id": 1})
    assert failure.value.code == NOT_RETRYABLE
    assert failure.value.has_error_label("SomeLabel")
    assert sync_db.things.count_documents({}) == 0  # refused before it reached the server


async def test_times_n_fails_n_commands_then_none(db: Any, client: Any) -> None:
    await db.things.insert_one({"_id": 1})
    async with fail_point(client, {"times": 2}, failCommands=["find"], errorCode=NOT_RETRYABLE):
        for _ in range(2):
            with pytest.raises(OperationFailure):
                await db.things.find_one()
        assert await db.things.find_one() == {"_id": 1}


async def test_skip_n_lets_n_commands_through_then_fails(db: Any, client: Any) -> None:
    async with fail_point(client, {"skip": 1}, failCommands=["find"], errorCode=NOT_RETRYABLE):
        assert await db.things.find_one() is None
        with pytest.raises(OperationFailure):
            await db.things.find_one()


async def test_app_name_targets_only_that_client(
    driver: str, fault_uri: str, client: Any, sync_db: Any
) -> None:
    target_uri = with_app_name(fault_uri, "target")
    async with (
        proxied(driver, target_uri) as target,
        proxied(driver, fault_uri) as other,
        fail_point(
            client, "alwaysOn", failCommands=["find"], errorCode=NOT_RETRYABLE, appName="target"
        ),
    ):
        with pytest.raises(OperationFailure):
            await target[sync_db.name].things.find_one()
        assert await other[sync_db.name].things.find_one() is None


async def test_namespace_targets_only_that_collection(db: Any, client: Any) -> None:
    async with fail_point(
        client,
        "alwaysOn",
        failCommands=["find"],
        errorCode=NOT_RETRYABLE,
        namespace=f"{db.name}.fails",
    ):
        with pytest.raises(OperationFailure):
            await db.fails.find_one()
        assert await db.works.find_one() is None


async def test_write_concern_error_comes_after_the_write_is_applied(
    db: Any, client: Any, sync_db: Any
) -> None:
    error = {"code": 100, "codeName": "UnsatisfiableWriteConcern", "errmsg": "not enough nodes"}
    async with fail_point(client, {"times": 1}, failCommands=["insert"], writeConcernError=error):
        with pytest.raises(WriteConcernError) as failure:
            await db.things.insert_one({"_id": 1})
    assert failure.value.code == 100
    assert sync_db.things.find_one() == {"_id": 1}


async def test_close_connection_fails_the_command_with_nothing_applied(
    driver: str, fault_uri: str, client: Any, sync_db: Any
) -> None:
    async with (
        proxied(driver, fault_uri, retryWrites=False) as victim,
        fail_point(client, {"times": 1}, failCommands=["insert"], closeConnection=True),
    ):
        with pytest.raises(AutoReconnect):
            await victim[sync_db.name].things.insert_one({"_id": 1})
    assert sync_db.things.count_documents({}) == 0


async def test_block_connection_delays_the_command(db: Any, client: Any) -> None:
    async with fail_point(
        client, {"times": 1}, failCommands=["find"], blockConnection=True, blockTimeMS=300
    ):
        started = time.monotonic()
        assert await db.things.find_one() is None  # delayed, then executed
        assert time.monotonic() - started >= 0.3


async def test_drop_reply_applies_the_write_but_the_client_sees_a_connection_error(
    driver: str, fault_uri: str, client: Any, sync_db: Any
) -> None:
    async with (
        proxied(driver, fault_uri, retryWrites=False) as victim,
        fail_point(client, {"times": 1}, failCommands=["insert"], dropReply=True),
    ):
        with pytest.raises(AutoReconnect):
            await victim[sync_db.name].things.insert_one({"_id": 1})
    assert sync_db.things.find_one() == {"_id": 1}


async def test_delay_reply_applies_the_command_at_once_and_answers_late(
    driver: str, fault_uri: str, client: Any, sync_db: Any
) -> None:
    async with (
        proxied(driver, fault_uri) as victim,
        fail_point(client, {"times": 1}, failCommands=["insert"], delayReplyMS=400),
        anyio.create_task_group() as tasks,
    ):
        answered = anyio.Event()

        async def insert() -> None:
            await victim[sync_db.name].things.insert_one({"_id": 1})
            answered.set()

        tasks.start_soon(insert)
        await wait_for(lambda: sync_db.things.find_one(), within=5, what="the insert to apply")
        assert not answered.is_set()  # applied, and its reply still on its way
        with anyio.fail_after(5):
            await answered.wait()


async def test_skew_local_time_shifts_hello_local_time(
    driver: str, fault_uri: str, client: Any, sync_db: Any
) -> None:
    skew = timedelta(hours=1)
    async with (
        proxied(driver, with_app_name(fault_uri, "skewed")) as skewed,
        fail_point(
            client, "alwaysOn", name="skewLocalTime", seconds=skew.total_seconds(), appName="skewed"
        ),
    ):
        before = sync_db.command("hello")["localTime"]
        shifted = (await skewed.admin.command("hello"))["localTime"]
        plain = (await client.admin.command("hello"))["localTime"]
        after = sync_db.command("hello")["localTime"]
    assert before + skew <= shifted <= after + skew
    assert before <= plain <= after  # another appName is not skewed


async def test_command_counts_by_app_name(
    driver: str, fault_uri: str, fault_proxy: WireProxy, sync_db: Any
) -> None:
    app = f"counted-{uuid.uuid4().hex[:8]}"
    async with proxied(driver, with_app_name(fault_uri, app)) as counted:
        things = counted[sync_db.name].things
        await things.insert_one({"_id": 1})
        for _ in range(3):
            await things.find_one()
    counts = command_counts(fault_proxy, app)
    assert (counts["insert"], counts["find"]) == (1, 3)
    assert command_counts(fault_proxy)["find"] >= 3


async def test_a_client_offering_compression_works_through_the_proxy(
    driver: str, fault_proxy: WireProxy
) -> None:
    async with proxied(driver, fault_proxy.uri, compressors="zlib") as zipped:
        reply = await zipped.admin.command("hello")
        assert "compression" not in reply
        assert (await zipped.admin.command("ping"))["ok"] == 1


async def test_a_mistyped_fail_point_is_refused(client: Any) -> None:
    needs_proxy("checking failCommand's data")  # a real server accepts and ignores it
    with pytest.raises(OperationFailure, match="failCommands"):
        async with fail_point(client, "alwaysOn", failComands=["find"], errorCode=2):
            pass


async def test_wait_entered_returns_once_a_command_is_held(
    driver: str, fault_uri: str, client: Any, sync_db: Any
) -> None:
    async with (
        proxied(driver, with_app_name(fault_uri, "held")) as held,
        fail_point(
            client,
            {"times": 1},
            failCommands=["find"],
            blockConnection=True,
            blockTimeMS=300,
            appName="held",
        ) as point,
        anyio.create_task_group() as tasks,
    ):
        found: list[Any] = []

        async def find() -> None:
            found.append(await held[sync_db.name].things.find_one())

        tasks.start_soon(find)
        assert (await point.wait_entered(timeout=10))["ok"] == 1
    assert found == [None]  # the held find went on after the block


def test_the_synchronous_driver_sets_fail_points_too(fault_uri: str, sync_db: Any) -> None:
    with MongoClient(fault_uri, retryReads=False) as client:
        things = client[sync_db.name].things
        with (
            fail_point(client, {"times": 1}, failCommands=["find"], errorCode=NOT_RETRYABLE),
            pytest.raises(OperationFailure),
        ):
            things.find_one()
        assert things.find_one() is None


@pytest.mark.multiprocess
def test_a_worker_process_connects_under_its_app_name(
    fault_uri: str, fault_proxy: WireProxy, sync_db: Any, driver: str, tmp_path: Path
) -> None:
    app = f"worker-{uuid.uuid4().hex[:8]}"
    migrations = recording_migrations(tmp_path, 2)
    result = boot(Replicas(with_app_name(fault_uri, app), sync_db, driver, migrations))
    assert (result["exit_code"], result["applied"]) == (0, [1, 2])
    assert command_counts(fault_proxy, app)["ping"] == 1  # the worker's own first command


def handshake(op_code: int) -> Message:
    body = {"isMaster": 1, "helloOk": True, "compression": ["zlib"], "client": {}}
    if op_code == OP_QUERY:
        query = LegacyQuery(0, "admin.$cmd", 0, -1, bson.encode(body), b"")
        return Message(7, 0, OP_QUERY, query.to_payload())
    return Message(7, 0, OP_MSG, join_op_msg(0, [(0, bson.encode({**body, "$db": "admin"}))]))


@pytest.mark.parametrize("op_code", [OP_QUERY, OP_MSG], ids=["OP_QUERY", "OP_MSG"])
def test_a_handshake_leaves_the_proxy_offering_no_compression(op_code: int) -> None:
    offered = handshake(op_code)
    command = parse_command(offered)
    assert command is not None and command.body["compression"] == ["zlib"]
    relayed = parse_command(without_compression(offered, command))
    assert relayed is not None
    assert "compression" not in relayed.body
    assert (relayed.name, relayed.db, relayed.body["helloOk"]) == ("isMaster", "admin", True)


def test_op_msg_document_sequences_and_checksum_survive_a_rewrite() -> None:
    body = bson.encode({"insert": "things", "$db": "db", "compression": ["zlib"]})
    docs = b"".join(bson.encode({"_id": i}) for i in range(3))
    sequence = struct.pack("<i", 4 + len(b"documents\x00") + len(docs)) + b"documents\x00" + docs
    payload = join_op_msg(0, [(0, body), (1, sequence)]) + b"\x00\x00\x00\x00"
    payload = struct.pack("<I", CHECKSUM_PRESENT) + payload[4:]  # flag + four checksum bytes
    message = Message(1, 0, OP_MSG, payload)
    command = parse_command(message)
    assert command is not None and command.namespace == "db.things"
    rewritten = without_compression(message, command)
    flags, sections = split_op_msg(rewritten.payload)
    assert flags & CHECKSUM_PRESENT == 0  # the bytes changed: no stale checksum
    assert sections[1] == (1, sequence)
    assert "compression" not in op_msg_body(rewritten.payload)
