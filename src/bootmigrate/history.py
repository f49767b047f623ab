"""The history collection: one record per migration run or operator action, kept apart from
the control document."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from bson import ObjectId
from pymongo.errors import DuplicateKeyError, OperationFailure

from .control import Owner, utc_now
from .errors import ERROR_TEXT_CHARS, shorten
from .ledger import Survey
from .plan import Direction

Outcome = Literal["applied", "failed", "interrupted", "skipped", "manual"]

# Enough of a traceback to find the failing line without bloating the control document.
TRACEBACK_TAIL_CHARS = 2000

# The error code of `create` for a collection that already exists (NamespaceExists).
NAMESPACE_EXISTS = 48


def error_fields(exc: BaseException) -> dict[str, str]:
    """The error and the tail of its traceback, as stored in a failure record: both bounded
    (``error`` to ``ERROR_TEXT_CHARS``, the traceback to its last ``TRACEBACK_TAIL_CHARS``),
    whatever the size of the exception's message."""
    # Each chunk is bounded before the tail is taken, so that a huge message (the traceback's
    # last line) cannot push the lines that locate the failure out of the tail.
    chunks = traceback.TracebackException.from_exception(exc).format()
    text = "".join(
        chunk if len(chunk) <= ERROR_TEXT_CHARS else shorten(chunk) + "\n" for chunk in chunks
    )
    return {
        "error": shorten(f"{type(exc).__name__}: {exc}"),
        "traceback": text[-TRACEBACK_TAIL_CHARS:],
    }


@dataclass(frozen=True)
class Entry:
    """What one history record says: a migration's run (``direction`` set) or an operator's
    or the lock's own action (``action`` set, ``outcome="manual"``)."""

    version: int
    name: str
    outcome: Outcome
    direction: Direction | None = None
    action: str | None = None
    started_at: datetime | None = None
    duration: float | None = None
    token: int | None = None
    acquisition: str | None = None
    error: BaseException | None = None
    note: str | None = None
    checksum: str | None = None
    #: The versions a ``skipped`` record skips (set-version, a fresh database, a baseline).
    versions: tuple[int, ...] = ()
    #: Where a set-version moved the database from.
    from_version: int | None = None

    @classmethod
    def manual(
        cls, action: str, version: int, note: str, *, name: str = "", token: int | None = None
    ) -> Entry:
        """The record of an action taken on the lock rather than a migration run."""
        return cls(version, name, "manual", action=action, token=token, note=note)


@dataclass(frozen=True)
class Recorded:
    """What the history says of some versions: those applied or skipped and not reverted
    since (``done``), and the lowest of them with a record of an ``up`` run (``first_run``),
    where records that bootmigrate ran them begin."""

    done: frozenset[int]
    first_run: int | None


def presumed_entry(found: Survey, upto: int | None, token: int | None = None) -> Entry | None:
    """The history record of the versions ``found`` takes as done without a record (see
    :func:`~bootmigrate.ledger.survey`), written before a ledger that counts them; ``upto``
    is the ledger's before, for a version set by hand. ``None`` if there are none."""
    if not found.presumed or found.why is None:
        return None
    if found.why == "baseline":
        note = (
            "the history has no record of these versions, older than the first one it records "
            "running: taken as applied before it was kept"
        )
    else:
        note = (
            f"version set by hand from {upto} to {found.version} (not through bootmigrate): "
            "the migrations in between are taken as skipped"
        )
    return Entry(
        found.version,
        "",
        "skipped",
        direction="up",
        action=found.why,
        token=token,
        note=note,
        versions=found.presumed,
    )


class History:
    """Append-only records of what ran, where and how it ended."""

    def __init__(self, coll: Any, owner: Owner) -> None:
        self._coll = coll
        self._owner = owner

    @property
    def collection(self) -> Any:
        """The history collection (majority write concern)."""
        return self._coll

    async def ensure_collection(self) -> None:
        """Create the collection if it does not exist yet. Called before a transaction
        records into it: Amazon DocumentDB, and MongoDB before 4.4, cannot create a
        collection inside a transaction."""
        await create_collection(self._coll)

    async def record(self, entry: Entry, session: Any = None) -> None:
        """Insert one record, stamped with this process and the time; inside the transaction
        of ``session`` when one is given."""
        await self.insert(self.document(entry), session)

    def document(self, entry: Entry) -> dict[str, Any]:
        """The record of ``entry``, stamped with this process and the time, with its ``_id``
        drawn now: sent again after a lost reply, it is recognised and not duplicated."""
        finished_at = utc_now()
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "version": entry.version,
            "name": entry.name,
            "direction": entry.direction,
            "outcome": entry.outcome,
            "started_at": entry.started_at or finished_at,
            "finished_at": finished_at,
            "duration_s": entry.duration,
            "host": self._owner.host,
            "pid": self._owner.pid,
            "build": self._owner.build,
            "token": entry.token,
            "error": None,
        }
        if entry.error is not None:
            doc.update(error_fields(entry.error))
        if entry.acquisition:
            doc["acquisition"] = entry.acquisition
        if entry.checksum:
            doc["checksum"] = entry.checksum
        if entry.action:
            doc["action"] = entry.action
        if entry.note:
            doc["note"] = entry.note
        if entry.versions:
            doc["versions"] = list(entry.versions)
        if entry.from_version is not None:
            doc["from_version"] = entry.from_version
        return doc

    async def in_effect(self, versions: Sequence[int]) -> Recorded:
        """Which of ``versions`` the history shows applied or skipped and not reverted since
        (the latest record of each decides): what the control document's ledger summarises."""
        if not versions:
            return Recorded(frozenset(), None)
        wanted = list(versions)
        records = await self._coll.find(
            {
                "$and": [
                    {
                        "$or": [
                            {"version": {"$in": wanted}},
                            {"versions": {"$in": wanted}},
                            {"action": "set-version"},
                        ]
                    },
                    # A set-version record written before skips were listed names its version.
                    {
                        "$or": [
                            {"outcome": {"$in": ["applied", "skipped"]}},
                            {"action": "set-version"},
                        ]
                    },
                ]
            },
            {"version": 1, "versions": 1, "direction": 1, "outcome": 1, "from_version": 1},
            sort=[("finished_at", 1), ("_id", 1)],
        ).to_list(None)
        state: dict[int, bool] = {}
        among = set(wanted)
        first: int | None = None
        for record in records:
            for version, done in _effect(record, among):
                state[version] = done
            if (record.get("outcome"), record.get("direction")) == ("applied", "up"):
                version = record.get("version")
                if isinstance(version, int) and (first is None or version < first):
                    first = version
        return Recorded(frozenset(v for v in wanted if state.get(v)), first)

    async def skipped(self, versions: Sequence[int]) -> set[int]:
        """Which of ``versions`` were last recorded as skipped by an operator or a fresh
        database (never run, so running their ``down`` undoes what was never done); a
        baseline's versions, presumed applied before the history began, are not."""
        if not versions:
            return set()
        wanted = list(versions)
        records = await self._coll.find(
            {
                "$or": [{"version": {"$in": wanted}}, {"versions": {"$in": wanted}}],
                "outcome": {"$in": ["applied", "skipped"]},
            },
            {"version": 1, "versions": 1, "outcome": 1, "action": 1},
            sort=[("finished_at", 1), ("_id", 1)],
        ).to_list(None)
        last: dict[int, bool] = {}
        for record in records:
            listed = record.get("versions")
            if record.get("outcome") == "skipped" and isinstance(listed, list):
                skip = record.get("action") != "baseline"
                last.update((v, skip) for v in listed if isinstance(v, int))
            elif isinstance(record.get("version"), int):
                last[record["version"]] = record.get("outcome") == "skipped"
        return {v for v in wanted if last.get(v)}

    async def applied_by(self, running: dict[str, Any], token: int, acquisition: str) -> bool:
        """Whether the acquisition ``token``/``acquisition`` recorded the step ``running`` (as
        the control document names it) as applied: a holder records a step's history before
        its version, so a holder that died between the two leaves this record behind."""
        found = await self._coll.find_one(
            {
                "version": running.get("version"),
                "direction": running.get("direction") or "up",
                "outcome": "applied",
                "token": token,
                "acquisition": acquisition,
            },
            {"_id": 1},
        )
        return found is not None

    async def insert(self, doc: dict[str, Any], session: Any = None) -> None:
        """Insert a record made by :meth:`document`; one already there (an earlier try whose
        reply was lost) counts as inserted."""
        try:
            await self._coll.insert_one(dict(doc), session=session)
        except DuplicateKeyError:
            if session is not None:
                raise  # a transaction's insert is never re-sent on its own


async def create_collection(coll: Any) -> None:
    """Create ``coll`` (majority write concern) outside any transaction; one that already
    exists is left as it is."""
    try:
        await coll.database.command("create", coll.name, writeConcern={"w": "majority"})
    except OperationFailure as exc:
        if exc.code != NAMESPACE_EXISTS:
            raise


def _effect(record: dict[str, Any], wanted: set[int]) -> list[tuple[int, bool]]:
    """What one history record says of the versions in ``wanted``: applied or skipped (True),
    reverted (False). A set-version record covers the versions it moved past: skipped going
    up, no longer applied going down."""
    version = record.get("version")
    start = record.get("from_version")
    if (
        record.get("action") == "set-version"
        and isinstance(start, int)
        and isinstance(version, int)
    ):
        low, high = sorted((start, version))
        return [(v, version > start) for v in wanted if low < v <= high]
    listed = record.get("versions")
    if record.get("outcome") == "skipped" and isinstance(listed, list):
        return [(v, True) for v in listed if isinstance(v, int)]
    if isinstance(version, int) and version in wanted:
        return [(version, record.get("direction") != "down")]
    return []
