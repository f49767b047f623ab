"""Database errors: transient ones are retried within the deadline, permanent ones end the call
at once as a ``DatabaseError`` naming the operation, the server's code and what to do; none
escapes as a raw driver exception.

Faults are injected at the wire (``fault_uri``: the wire proxy in front of SecantusDB, or a
real MongoDB's own fail points), and commands are counted from the client's side (command
monitoring).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import anyio
import pytest
from pymongo.errors import (
    AutoReconnect,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
    WTimeoutError,
)
from pymongo.uri_parser import parse_uri

from bootmigrate import DatabaseError, DatabaseUnavailable, migrate
from bootmigrate.driver_errors import TRANSIENT_CODES, is_transient
from bootmigrate.drivers import server_time
from tests.clients import open_client
from tests.command_monitor import CommandLog
from tests.databases import new_db_name
from tests.fail_points import fail_point, needs_proxy
from tests.in_process import control, dead_holder_lock, history, ran, recorders
from tests.wire_proxy import HELLO_NAMES, ReplyPlan, WireProxy, _Link

WAIT_TIMEOUT = 3.0
LATE_BY_AT_MOST = 1.5


# -- the classification, on the driver's own exception types --------------------------------


def failure(code: int, labels: tuple[str, ...] = ()) -> OperationFailure:
    details: dict[str, Any] = {"ok": 0, "code": code, "errmsg": "from the server"}
    if labels:
        details["errorLabels"] = list(labels)
    return OperationFailure("from the server", code, details)


@pytest.mark.parametrize("code", sorted(TRANSIENT_CODES))
def test_each_retryable_code_is_transient(code: int) -> None:
    assert is_transient(failure(code))


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionFailure("down"),
        AutoReconnect("reset"),
        NetworkTimeout("timed out"),
        NotPrimaryError("not primary", {"code": 10107}),
        ServerSelectionTimeoutError("no server"),
        WTimeoutError("replication timed out", 64, {"code": 64, "errInfo": {"wtimeout": True}}),
        WriteConcernError("stepped down", 11602, {"code": 11602}),
        ExecutionTimeout("operation exceeded time limit", 50, {"code": 50}),
        failure(2, ("RetryableWriteError",)),
        failure(2, ("TransientTransactionError",)),
        failure(2, ("SystemOverloadedError", "RetryableError")),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_connection_failures_labels_and_timeouts_are_transient(exc: Exception) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        failure(13),  # Unauthorized
        failure(166),  # CommandNotSupportedOnView
        failure(2),  # BadValue
        WriteConcernError("cannot satisfy", 100, {"code": 100}),
        DuplicateKeyError("dup", 11000, {"code": 11000}),
        KeyError("localTime"),
        ValueError("not a database error at all"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_everything_else_is_permanent(exc: Exception) -> None:
    assert not is_transient(exc)


def test_a_database_error_survives_pickling_with_its_fields() -> None:
    error = DatabaseError(
        operation="take the migration lock",
        code=13,
        code_name="Unauthorized",
        detail="not authorized",
        fix="Grant readWrite.",
    )

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is DatabaseError and str(copy) == str(error)
    assert (copy.operation, copy.code, copy.code_name, copy.fix) == (
        "take the migration lock",
        13,
        "Unauthorized",
        "Grant readWrite.",
    )


# -- against the server, faults at the wire -----------------------------------------------


@asynccontextmanager
async def faulty_database(driver: str, fault_uri: str) -> AsyncIterator[tuple[Any, CommandLog]]:
    """A fresh database through the fault instrument, and a log of the commands sent to it."""
    log = CommandLog()
    async with open_client(
        driver,
        fault_uri,
        serverSelectionTimeoutMS=5000,
        # After a "not primary" error the driver waits for its monitor's next look at the
        # server before it sends anything again: every 10 s by default.
        heartbeatFrequencyMS=500,
        event_listeners=[log],
    ) as client:
        db = client[new_db_name()]
        try:
            yield db, log
        finally:
            await client.drop_database(db.name)


async def applied_once(db: Any, report: Any) -> None:
    """The call ran migration 1 exactly once and left a clean record of it."""
    assert (report.holder, report.applied) == (True, [1])
    assert await ran(db) == [(1, "up")]
    doc = await control(db)
    assert doc is not None and (doc["locked"], doc["version"]) == (False, 1)
    assert [(h["version"], h["outcome"]) for h in await history(db)] == [(1, "applied")]


WCE_TIMEOUT = {
    "code": 64,
    "codeName": "WriteConcernFailed",
    "errmsg": "waiting for replication timed out",
    "errInfo": {"wtimeout": True},
}
WCE_STEPPED_DOWN = {
    "code": 11602,
    "codeName": "InterruptedDueToReplStateChange",
    "errmsg": "operation was interrupted",
}

# Each fault hits the acquire's findAndModify; ``times`` outlasts the driver's own single
# retry where it makes one. A write-concern error comes after the write was applied: the
# retry then finds the lock already its own (adopted through its owner id).
TRANSIENT_ON_ACQUIRE = [
    pytest.param(2, {"errorCode": 16500, "errmsg": "Request rate is large"}, id="throttled-16500"),
    pytest.param(2, {"errorCode": 262}, id="ExceededTimeLimit-262"),
    pytest.param(2, {"errorCode": 50}, id="MaxTimeMSExpired-50"),
    pytest.param(3, {"errorCode": 10107}, id="NotWritablePrimary-10107"),
    pytest.param(3, {"errorCode": 91}, id="ShutdownInProgress-91"),
    pytest.param(3, {"errorCode": 2, "errorLabels": ["RetryableWriteError"]}, id="labelled"),
    pytest.param(1, {"writeConcernError": WCE_TIMEOUT}, id="WTimeout-64"),
    pytest.param(1, {"writeConcernError": WCE_STEPPED_DOWN}, id="wce-stepped-down-11602"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("times", "fault"), TRANSIENT_ON_ACQUIRE)
async def test_a_transient_error_on_the_acquire_is_retried(
    driver: str, fault_uri: str, times: int, fault: dict[str, Any]
) -> None:
    async with faulty_database(driver, fault_uri) as (db, _):
        async with fail_point(db.client, {"times": times}, failCommands=["findAndModify"], **fault):
            report = await migrate(db, recorders(1), wait_timeout=30)

        await applied_once(db, report)


@pytest.mark.anyio
async def test_a_throttled_read_is_retried(driver: str, fault_uri: str) -> None:
    async with faulty_database(driver, fault_uri) as (db, _):
        async with fail_point(db.client, {"times": 2}, failCommands=["find"], errorCode=16500):
            report = await migrate(db, recorders(1), wait_timeout=30)

        await applied_once(db, report)


@pytest.mark.anyio
async def test_throttling_that_outlasts_the_deadline_is_database_unavailable(
    driver: str, fault_uri: str
) -> None:
    async with (
        faulty_database(driver, fault_uri) as (db, log),
        fail_point(db.client, "alwaysOn", failCommands=["find"], errorCode=16500),
    ):
        log.clear()
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as caught:
            await migrate(db, recorders(1), wait_timeout=WAIT_TIMEOUT)
        elapsed = time.monotonic() - started
        sent = log.counts()

    message = str(caught.value)
    assert "error 16500" in message and "throttling" in message, message
    assert "read the control document" in message
    assert WAIT_TIMEOUT <= elapsed <= WAIT_TIMEOUT + LATE_BY_AT_MOST, elapsed
    # About ten commands a second at most, whatever the server answers.
    assert sum(sent.values()) <= 10 * elapsed + 5, sent


PERMANENT = [
    pytest.param("findAndModify", 13, "take the migration lock", "readWrite", id="acquire-13"),
    pytest.param("find", 13, "read the control document", "readWrite", id="read-13"),
    pytest.param("findAndModify", 166, "take the migration lock", "is a view", id="acquire-166"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("command", "code", "operation", "fix"), PERMANENT)
async def test_a_permanent_error_is_raised_at_once_as_a_database_error(
    driver: str, fault_uri: str, command: str, code: int, operation: str, fix: str
) -> None:
    async with faulty_database(driver, fault_uri) as (db, log):
        await db.migrations.insert_one({"_id": "control", "locked": False, "version": 0})
        async with fail_point(db.client, "alwaysOn", failCommands=[command], errorCode=code):
            log.clear()
            with pytest.raises(DatabaseError) as caught:
                await migrate(db, recorders(1), wait_timeout=30)
            sent = log.counts()
        doc = await control(db)

    error = caught.value
    assert (error.code, error.operation) == (code, operation)
    assert fix in error.fix
    assert f"could not {operation}: the server answered error {code}" in str(error)
    assert sent[command] == 1, sent  # not retried: the same command gets the same answer
    assert doc == {"_id": "control", "locked": False, "version": 0}


@pytest.mark.anyio
async def test_a_permanent_error_while_holding_the_lock_is_a_database_error(
    driver: str, fault_uri: str
) -> None:
    async with faulty_database(driver, fault_uri) as (db, _):
        history_ns = f"{db.name}.migrations_history"
        async with fail_point(
            db.client, "alwaysOn", failCommands=["insert"], errorCode=13, namespace=history_ns
        ):
            with pytest.raises(DatabaseError) as caught:
                await migrate(db, recorders(1), wait_timeout=30)

    assert caught.value.code == 13
    assert "holding the lock" in caught.value.operation


# -- the server's clock -------------------------------------------------------------------


class _HelloLink(_Link):
    """A relayed connection whose ``hello`` replies carry ``localTime`` as its proxy says."""

    proxy: HelloRewritingProxy

    def _rewrite_body(self, body: dict[str, Any], plan: ReplyPlan) -> bool:
        changed = super()._rewrite_body(body, plan)
        now = body.get("localTime")
        if plan.command.name not in HELLO_NAMES or not isinstance(now, datetime):
            return changed
        if self.proxy.local_time == "missing":
            del body["localTime"]
        elif self.proxy.local_time == "epoch-ms":  # as Azure Cosmos DB sends it
            body["localTime"] = int(now.replace(tzinfo=timezone.utc).timestamp() * 1000)
        else:
            return changed
        return True


class HelloRewritingProxy(WireProxy):
    """The wire proxy, with ``hello.localTime`` removed or sent as epoch milliseconds."""

    local_time = "date"

    async def _accept(self, reader: Any, writer: Any) -> None:
        link = _HelloLink(self, reader, writer)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


@pytest.fixture(scope="module")
def hello_proxy(mongo_uri: str) -> Iterator[HelloRewritingProxy]:
    needs_proxy("rewriting hello.localTime")
    host, port = parse_uri(mongo_uri)["nodelist"][0]
    with HelloRewritingProxy(f"{host}:{port}") as proxy:
        yield proxy


@pytest.fixture
def local_time_as(hello_proxy: HelloRewritingProxy) -> Iterator[HelloRewritingProxy]:
    yield hello_proxy
    hello_proxy.local_time = "date"


@pytest.mark.anyio
async def test_a_server_that_does_not_tell_its_time_still_has_a_dead_holder_taken_over(
    driver: str, local_time_as: HelloRewritingProxy
) -> None:
    """No server clock enters the lease decision: a waiter watches the dead holder's beats not
    move for a lease on its own clock. The server's time only dates the heartbeat for people,
    and without it the operator's view shows no age instead of failing."""
    async with faulty_database(driver, local_time_as.uri) as (db, _):
        await dead_holder_lock(db, version=0, running=None, lease=0.5)
        local_time_as.local_time = "missing"

        assert await server_time(db) is None
        with anyio.fail_after(30):
            report = await migrate(db, recorders(1), max_poll_interval=0.2)

    assert (report.holder, report.applied) == (True, [1])


@pytest.mark.anyio
async def test_a_server_clock_sent_as_epoch_milliseconds_is_read(
    driver: str, local_time_as: HelloRewritingProxy
) -> None:
    async with faulty_database(driver, local_time_as.uri) as (db, _):
        local_time_as.local_time = "epoch-ms"

        now = await server_time(db)

    assert (
        now is not None
        and abs((now - datetime.now(timezone.utc).replace(tzinfo=None)).total_seconds()) < 60
    )
