"""The one seam between motor and PyMongo's async API.

Both drivers expose the same awaitable collection methods, so the seam is small: recognise
the database object (and refuse a synchronous one with a clear message), give out the lock's
collections pinned to the primary with majority read and write concern, and read the server's
clock.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, Literal

import anyio
from pymongo import ReadPreference, WriteConcern
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern

Driver = Literal["motor", "pymongo"]

# Matched by name so that neither driver is imported unless the caller uses it.
_ASYNC_DATABASE_TYPES: dict[str, Driver] = {
    "motor.motor_asyncio.AsyncIOMotorDatabase": "motor",
    "pymongo.asynchronous.database.AsyncDatabase": "pymongo",
}

MAJORITY = WriteConcern("majority")
TRANSIENT_TRANSACTION_ERROR = "TransientTransactionError"
UNKNOWN_COMMIT_RESULT = "UnknownTransactionCommitResult"


def detect_driver(db: object) -> Driver:
    """Name the driver behind ``db``, or raise ``TypeError`` saying what to pass instead."""
    for cls in type(db).__mro__:
        driver = _ASYNC_DATABASE_TYPES.get(f"{cls.__module__}.{cls.__qualname__}")
        if driver is not None:
            return driver
    kind = f"{type(db).__module__}.{type(db).__qualname__}"
    hint = ""
    if kind in ("pymongo.database.Database", "pymongo.synchronous.database.Database"):
        hint = " (a synchronous PyMongo database; use pymongo.AsyncMongoClient instead)"
    raise TypeError(
        f"bootmigrate needs an async database: motor's AsyncIOMotorClient()[name] or "
        f"pymongo.AsyncMongoClient()[name]; got {kind}{hint}"
    )


def is_async_database(value: object) -> bool:
    """Whether ``value`` is a motor or PyMongo async database (rather than, say, a factory)."""
    try:
        detect_driver(value)
    except TypeError:
        return False
    return True


def pinned_collection(db: Any, name: str, wtimeout: float) -> Any:
    """``db[name]`` for the lock's own reads and writes, whatever the caller's client says.

    Primary read preference and majority read concern: a lock decision is never made on a
    stale secondary's copy, nor on a write a failover may roll back. Majority write concern, so
    a lock survives a failover, with a ``wtimeout`` so that a majority that cannot be reached
    answers with an error instead of never.
    """
    return db.get_collection(
        name,
        read_preference=ReadPreference.PRIMARY,
        read_concern=ReadConcern("majority"),
        write_concern=WriteConcern("majority", wtimeout=max(1, int(wtimeout * 1000))),
    )


async def open_change_stream(coll: Any, pipeline: list[dict[str, Any]], idle_wait: float) -> Any:
    """A change stream on ``coll``, opened now so that an unsupported deployment fails here.

    PyMongo's ``watch`` is a coroutine; motor's returns a stream that opens lazily, on
    entering it as a context manager.
    """
    stream = coll.watch(pipeline, max_await_time_ms=max(1, int(idle_wait * 1000)))
    if inspect.isawaitable(stream):
        return await stream
    return await stream.__aenter__()


async def supports_transactions(db: Any) -> bool:
    """Replica sets and sharded clusters run multi-document transactions; standalone servers
    do not. Asked of the server, not assumed."""
    reply = await db.command("hello")
    clustered = bool(reply.get("setName")) or reply.get("msg") == "isdbgrid"
    return clustered and reply.get("logicalSessionTimeoutMinutes") is not None


@asynccontextmanager
async def transaction(db: Any, commit_within: float) -> AsyncIterator[Any]:
    """A session with a transaction (majority write concern) open on it: committed when the
    block ends, aborted if it raises or is cancelled. A commit whose outcome is unknown
    (UnknownTransactionCommitResult) is sent again, as MongoDB prescribes, for at most
    ``commit_within`` seconds (a commit is idempotent on the server); a
    TransientTransactionError is the caller's to retry (the whole transaction). The abort and
    the commit are shielded from cancellation but bounded by ``commit_within`` all the same: a
    server that never answers an abort aborts the transaction itself at its lifetime limit, and
    a commit that never answers raises :class:`CommitOutcomeUnknown`. Motor's
    ``start_session`` is a coroutine and PyMongo's ``start_transaction`` is; the other of each
    is not."""
    session = db.client.start_session()
    if inspect.isawaitable(session):
        session = await session
    try:
        started = session.start_transaction(write_concern=MAJORITY)
        if inspect.isawaitable(started):
            await started
        try:
            yield session
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(commit_within):
                await session.abort_transaction()
            raise
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(commit_within):
                await _commit(session)
        except TimeoutError as exc:
            raise CommitOutcomeUnknown(f"no answer to the commit in {commit_within:g} s") from exc
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(commit_within):
            ended = session.end_session()
            if inspect.isawaitable(ended):
                await ended


class CommitOutcomeUnknown(Exception):
    """A commit kept going unanswered (or answering UnknownTransactionCommitResult) for as
    long as it may take: it may or may not have been applied, which only a read can tell."""


async def _commit(session: Any) -> None:
    """Commit, sending the commit again while its outcome is unknown (the caller bounds it)."""
    while True:
        try:
            await session.commit_transaction()
            return
        except PyMongoError as exc:
            if not exc.has_error_label(UNKNOWN_COMMIT_RESULT):
                raise
        await anyio.sleep(0.05)


async def server_time(db: Any) -> datetime | None:
    """The server's clock (``hello.localTime``), as naive UTC like the dates it stores, or
    ``None`` when the server does not report it. It is shown to people (how old a heartbeat
    looks), never used to decide whether a holder is alive. Some compatible servers send it as
    milliseconds since the epoch."""
    reply = await db.command("hello", read_preference=ReadPreference.PRIMARY)
    now = reply.get("localTime")
    if isinstance(now, datetime):
        return as_naive_utc(now)
    if isinstance(now, int) and not isinstance(now, bool):
        return datetime.fromtimestamp(now / 1000, timezone.utc).replace(tzinfo=None)
    return None


def as_naive_utc(value: datetime) -> datetime:
    """Drop the timezone after converting to UTC: clients may be ``tz_aware`` or not."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def address_of(db: Any) -> str:
    """``host:port`` pairs the client was given, for error messages (never credentials)."""
    try:
        seeds = db.client.topology_description.server_descriptions()
        return ", ".join(f"{host}:{port}" for host, port in seeds) or "unknown server"
    except Exception:  # a description is only decoration for an error message
        return "unknown server"
