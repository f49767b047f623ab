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

from .control import Control, Owner, utc_now
from .errors import ERROR_TEXT_CHARS, shorten
from .ledger import Recorded, Survey, digest_of
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
    #: A fixed ``_id``, for a record that processes racing to make it must make once.
    id: str | None = None

    @classmethod
    def manual(
        cls, action: str, version: int, note: str, *, name: str = "", token: int | None = None
    ) -> Entry:
        """The record of an action taken on the lock rather than a migration run."""
        return cls(version, name, "manual", action=action, token=token, note=note)


def presumed_entry(found: Survey, seen: Control, token: int | None = None) -> Entry | None:
    """The history record of the versions ``found`` takes as done without a record (see
    :func:`~bootmigrate.ledger.survey`), written before a ledger that counts them; ``seen``
    is the control document they were found on, ``token`` the holder's if one writes it.
    ``None`` if there are none."""
    if not found.presumed or found.why is None:
        return None
    upto = seen.ledger.upto if seen.ledger is not None else None
    if found.why == "baseline":
        note = (
            "no record of these versions when the ledger of applied migrations was started: "
            "taken as applied (or skipped by hand) before it was kept"
        )
    else:
        note = (
            f"version set by hand from {upto} to {found.version} (not through bootmigrate): "
            "the migrations in between are taken as skipped"
        )
    # One record of one finding, however many replicas make it at once from the same reading;
    # the same finding made again later (after a lock was taken since: a new token) is
    # another record, which the history's counting needs.
    key = f"{found.why}:{seen.token}:{upto}:{found.version}:{digest_of(found.presumed):x}"
    return Entry(
        found.version,
        "",
        "skipped",
        direction="up",
        action=found.why,
        token=token,
        note=note,
        versions=found.presumed,
        id=key,
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
            "_id": entry.id or ObjectId(),
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

    async def in_effect(self, low: int, high: int) -> Recorded:
        """The versions from ``low`` to ``high`` that the history shows applied or skipped and
        not reverted since: what the control document's ledger summarises.

        Counted, not ordered: records from different hosts are stamped by different clocks,
        so "the latest record" cannot be trusted. Each applied ``up`` and each skip puts a
        version in effect, each applied ``down`` takes it out; in reality they alternate, so
        a version is in effect when the first kind outnumbers the second."""
        if high < low:
            return Recorded(frozenset())
        span = {"$gte": low, "$lte": high}
        records = await self._coll.find(
            {
                "$or": [
                    {"version": span, "outcome": "applied", "direction": {"$in": ["up", "down"]}},
                    {"versions": {"$elemMatch": span}, "outcome": "skipped"},
                    # Written before skips were listed: a fresh skip, or a set-version.
                    {"version": span, "outcome": "skipped", "versions": {"$exists": False}},
                    {
                        "version": span,
                        "action": "set-version",
                        "versions": {"$exists": False},
                        "from_version": {"$exists": False},
                    },
                ]
            },
            {"version": 1, "versions": 1, "direction": 1, "outcome": 1, "action": 1},
        ).to_list(None)
        balance: dict[int, int] = {}
        ran: set[int] = set()
        for record in records:
            for version, change in _effect(record):
                if low <= version <= high:
                    balance[version] = balance.get(version, 0) + change
            if (record.get("outcome"), record.get("direction")) == ("applied", "up"):
                ran.add(record["version"])
        done = frozenset(v for v, count in balance.items() if count > 0)
        return Recorded(done, frozenset(ran & done))

    async def skipped(self, versions: Sequence[int]) -> set[int]:
        """Which of ``versions`` are in effect by a skip (an operator's, a hand edit's, a
        fresh database's) and not by a run: running their ``down`` undoes what was never
        done. A baseline's versions, presumed applied before the history began, count as
        run. Counted as :meth:`in_effect` counts, not ordered."""
        if not versions:
            return set()
        wanted = list(versions)
        records = await self._coll.find(
            {
                "$or": [{"version": {"$in": wanted}}, {"versions": {"$in": wanted}}],
                "outcome": {"$in": ["applied", "skipped"]},
            },
            {"version": 1, "versions": 1, "direction": 1, "outcome": 1, "action": 1},
        ).to_list(None)
        runs: dict[int, int] = {}
        skips: dict[int, int] = {}
        for record in records:
            by_skip = record.get("outcome") == "skipped" and record.get("action") != "baseline"
            tally = skips if by_skip else runs
            for version, change in _effect(record):
                tally[version] = tally.get(version, 0) + change
        return {v for v in wanted if runs.get(v, 0) <= 0 < runs.get(v, 0) + skips.get(v, 0)}

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


def _effect(record: dict[str, Any]) -> list[tuple[int, int]]:
    """What one history record does to the versions it names: +1 puts one in effect (an
    applied ``up``, a skip), -1 takes it out (an applied ``down``). A set-version going down
    counts for nothing: the versions it moves below are run or skipped again before they
    count, and each of those adds one."""
    listed = record.get("versions")
    if isinstance(listed, list):
        skips = record.get("outcome") == "skipped"
        return [(v, 1) for v in listed if isinstance(v, int)] if skips else []
    version = record.get("version")
    if not isinstance(version, int):
        return []
    if record.get("outcome") == "applied":
        return [(version, -1 if record.get("direction") == "down" else 1)]
    return [(version, 1)]  # a skip recorded before skips were listed
