"""The control document: read it, acquire it, heartbeat, fence, release, stick.

One document, ``{"_id": "control", "locked": false, "version": 19}``, as Rocket.Chat writes
it, plus fields of our own while a lock is held:

- ``token``: incremented by every acquisition; every holder write is conditional on it, so
  a holder that lost its lock cannot change anything (fencing).
- ``beats`` and ``heartbeat``: a counter and the server's clock, refreshed by the holder.
  A waiter takes over only with a compare-and-swap on ``token`` and ``beats``, so a holder
  that beat in the meantime keeps its lock.
- ``owner`` (host, pid, build, lease, id), ``locked_at``: who holds it, since when.
- ``running``: the migration in progress; ``failure``: why the lock is stuck.

Every function here is one round trip; the decisions are the runner's.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from .drivers import as_naive_utc
from .errors import InvalidControlDocument, LockLost

CONTROL_ID = "control"
HELD_FIELDS = ("owner", "locked_at", "heartbeat", "beats", "running", "failure")


@dataclass(frozen=True)
class Owner:
    """This process as a lock holder: enough for an operator to find it, and a unique id
    so that it recognises its own lock if an acquire's reply was lost."""

    host: str
    pid: int
    build: str | None
    lease: float
    id: str

    @classmethod
    def this_process(cls, build: str | None, lease: float) -> Owner:
        """This process, with a fresh id; ``build`` defaults to ``BOOTMIGRATE_BUILD``."""
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            build=build if build is not None else os.environ.get("BOOTMIGRATE_BUILD"),
            lease=lease,
            id=uuid.uuid4().hex,
        )

    def as_document(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "build": self.build,
            "lease": self.lease,
            "id": self.id,
        }


@dataclass(frozen=True)
class Control:
    """A validated reading of the control document (``exists=False``: no document yet)."""

    exists: bool
    locked: bool = False
    version: int = 0
    token: int = 0
    beats: int = 0
    heartbeat: datetime | None = None
    locked_at: datetime | None = None
    owner: dict[str, Any] | None = None
    running: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def stuck(self) -> bool:
        """Locked after a failure or an interruption: only an operator unlocks it."""
        return self.locked and self.failure is not None

    def holder(self) -> str:
        """The lock holder, as an operator would want it named."""
        if not self.owner:
            return "an unknown process (a lock set by Rocket.Chat or by hand records no owner)"
        build = f", build {self.owner.get('build')}" if self.owner.get("build") else ""
        return f"{self.owner.get('host')} (pid {self.owner.get('pid')}{build})"


def parse_control(doc: dict[str, Any] | None, collection_name: str) -> Control:
    """Validate a raw control document; refuse, rather than guess at, a malformed one."""
    if doc is None:
        return Control(exists=False)

    def bad(problem: str, fix: str) -> InvalidControlDocument:
        return InvalidControlDocument(
            f"the control document in collection {collection_name!r} is malformed: {problem} "
            f"(document: {doc!r}). {fix}"
        )

    locked = doc.get("locked")
    if not isinstance(locked, bool):
        raise bad(
            f"`locked` must be true or false, got {locked!r}",
            f'Fix it with: db.{collection_name}.updateOne({{_id: "control"}}, '
            "{$set: {locked: false}}) once no migration is running.",
        )
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise bad(
            f"`version` must be a non-negative integer, got {version!r}",
            f"Set the version the database is really at: db.{collection_name}.updateOne("
            '{_id: "control"}, {$set: {version: NumberInt(N)}}) (the legacy mongo shell '
            "stores a bare number as a double).",
        )
    ints = {}
    for name in ("token", "beats"):
        value = doc.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(
                f"`{name}` must be an integer, got {value!r}",
                f'Remove the field: db.{collection_name}.updateOne({{_id: "control"}}, '
                f"{{$unset: {{{name}: 1}}}}).",
            )
        ints[name] = value
    dates = {}
    for name in ("heartbeat", "locked_at"):
        value = doc.get(name)
        if value is not None and not isinstance(value, datetime):
            raise bad(
                f"`{name}` must be a date, got {value!r}",
                f'Remove the field: db.{collection_name}.updateOne({{_id: "control"}}, '
                f"{{$unset: {{{name}: 1}}}}).",
            )
        dates[name] = as_naive_utc(value) if value is not None else None
    subdocs = {}
    for name in ("owner", "running", "failure"):
        value = doc.get(name)
        if value is not None and not isinstance(value, dict):
            raise bad(
                f"`{name}` must be a sub-document, got {value!r}",
                f'Remove the field: db.{collection_name}.updateOne({{_id: "control"}}, '
                f"{{$unset: {{{name}: 1}}}}).",
            )
        subdocs[name] = value
    return Control(
        exists=True,
        locked=locked,
        version=version,
        token=ints["token"],
        beats=ints["beats"],
        heartbeat=dates["heartbeat"],
        locked_at=dates["locked_at"],
        owner=subdocs["owner"],
        running=subdocs["running"],
        failure=subdocs["failure"],
        raw=dict(doc),
    )


class ControlStore:
    """The control document's operations, each one atomic and one round trip."""

    def __init__(self, coll: Any) -> None:
        self._coll = coll
        self.name: str = coll.name

    @property
    def collection(self) -> Any:
        """The collection holding the control document (majority write concern)."""
        return self._coll

    async def read(self) -> Control:
        return parse_control(await self._coll.find_one({"_id": CONTROL_ID}), self.name)

    async def create(self, *, version: int, owner: Owner | None) -> Control | None:
        """Create the missing document, locked by ``owner`` if given.

        An upsert whose filter no existing control document can match (every one has a
        ``version``), so it either inserts or fails with a duplicate key: ``None`` then
        means another replica created the document first.
        """
        update: dict[str, Any] = {"$set": {"locked": owner is not None, "version": version}}
        if owner is not None:
            update["$set"].update(token=1, beats=0, owner=owner.as_document())
            update["$currentDate"] = {"heartbeat": True, "locked_at": True}
        try:
            doc = await self._coll.find_one_and_update(
                {"_id": CONTROL_ID, "version": {"$exists": False}},
                update,
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return None
        return parse_control(doc, self.name)

    async def acquire(self, seen: Control, owner: Owner) -> Control | None:
        """Take a free lock at the version we planned from; ``None`` if we lost the race."""
        return await self._swap(
            {"_id": CONTROL_ID, "locked": False, "version": seen.version},
            owner,
            {"$unset": {"failure": "", "running": ""}},
        )

    async def take_over(self, seen: Control, owner: Owner) -> Control | None:
        """Take a dead holder's lock, only if it has not beaten since ``seen``.

        ``running`` is kept: should this taker die too, the next one still knows which
        migration was interrupted.
        """
        return await self._swap(
            {
                "_id": CONTROL_ID,
                "locked": True,
                "token": seen.token,
                "beats": seen.beats,
                "failure": None,
            },
            owner,
            {},
        )

    async def retry_failed(self, seen: Control, owner: Owner) -> Control | None:
        """Take a lock stuck by a failure, only if it is still exactly as ``seen``."""
        return await self._swap(
            {
                "_id": CONTROL_ID,
                "locked": True,
                "token": seen.token,
                "failure.kind": "failed",
                "failure.build": (seen.failure or {}).get("build"),
            },
            owner,
            {"$unset": {"failure": "", "running": ""}},
        )

    async def _swap(
        self, condition: dict[str, Any], owner: Owner, extra: dict[str, Any]
    ) -> Control | None:
        update: dict[str, Any] = {
            "$set": {"locked": True, "owner": owner.as_document(), "beats": 0},
            "$inc": {"token": 1},
            "$currentDate": {"heartbeat": True, "locked_at": True},
            **extra,
        }
        try:
            doc = await self._coll.find_one_and_update(
                condition, update, return_document=ReturnDocument.AFTER
            )
        except DuplicateKeyError:
            return None
        return None if doc is None else parse_control(doc, self.name)

    async def mark_interrupted(self, seen: Control, failure: dict[str, Any]) -> bool:
        """Stick a dead holder's lock whose migration cannot be re-run; CAS like take_over."""
        result = await self._coll.update_one(
            {
                "_id": CONTROL_ID,
                "locked": True,
                "token": seen.token,
                "beats": seen.beats,
                "failure": None,
            },
            {
                "$set": {"failure": failure},
                "$inc": {"token": 1},
                "$unset": {"heartbeat": "", "owner": "", "running": ""},
            },
        )
        return bool(result.modified_count)

    async def unlock(self, seen: Control) -> bool:
        """An operator's unlock, only if nothing changed since ``seen``."""
        result = await self._coll.update_one(
            _unchanged(seen),
            {"$set": {"locked": False}, "$unset": {name: "" for name in HELD_FIELDS}},
        )
        return bool(result.modified_count)

    async def set_version(self, seen: Control, version: int) -> bool:
        """An operator's version change (a skip), only if nothing changed since ``seen``."""
        if not seen.exists:
            return await self.create(version=version, owner=None) is not None
        result = await self._coll.update_one(_unchanged(seen), {"$set": {"version": version}})
        return bool(result.matched_count)

    async def heartbeat(self, token: int) -> bool:
        """Refresh the lease on the server's clock; ``False`` once the lock is no longer ours."""
        result = await self._coll.update_one(
            {"_id": CONTROL_ID, "locked": True, "token": token},
            {"$currentDate": {"heartbeat": True}, "$inc": {"beats": 1}},
        )
        return bool(result.matched_count)

    async def start(self, token: int, running: dict[str, Any]) -> None:
        """Name the migration about to run. Its own write, so that a taker can tell a holder
        that died inside a migration from one that died between two."""
        await self._fenced(token, {"$set": {"running": running}})

    async def progress(self, token: int, done: int, total: int) -> None:
        """Record how far the running migration has got (shown by ``status``)."""
        await self._fenced(
            token,
            {
                "$set": {"running.progress.done": done, "running.progress.total": total},
                "$currentDate": {"running.progress.at": True},
            },
        )

    async def advance(self, token: int, version: int, session: Any = None) -> None:
        """Record a finished migration: the version reached, and no migration running. Given
        a session, the write joins its transaction (and fences it: a stale holder's
        transaction matches nothing, and aborts)."""
        await self._fenced(
            token,
            {
                "$set": {"version": version},
                "$unset": {"running": ""},
                "$inc": {"beats": 1},
                "$currentDate": {"heartbeat": True},
            },
            session,
        )

    async def release(self, token: int) -> None:
        """Unlock at the version reached; keep ``token`` so it keeps increasing."""
        await self._fenced(
            token,
            {"$set": {"locked": False}, "$unset": {name: "" for name in HELD_FIELDS}},
        )

    async def stick(self, token: int, failure: dict[str, Any]) -> None:
        """Leave the lock held on purpose with the failure recorded, for an operator."""
        await self._fenced(
            token,
            {"$set": {"failure": failure}, "$unset": {"heartbeat": "", "owner": "", "running": ""}},
        )

    async def _fenced(self, token: int, update: dict[str, Any], session: Any = None) -> Control:
        doc = await self._coll.find_one_and_update(
            {"_id": CONTROL_ID, "locked": True, "token": token},
            update,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        if doc is None:
            raise LockLost(
                f"this process lost the migration lock (token {token}) in collection "
                f"{self.name!r}: another process took it over, presumably because this one "
                "missed its heartbeats for longer than the lease (paused, overloaded, or cut "
                "off from the server). It stopped and changed nothing more; check the control "
                "document and history to see what the new holder did."
            )
        return parse_control(doc, self.name)


def _unchanged(seen: Control) -> dict[str, Any]:
    """A filter that matches the control document only as it was when read."""
    return {
        "_id": CONTROL_ID,
        "locked": seen.locked,
        "version": seen.version,
        # None matches a missing field too, as in a document written by Rocket.Chat.
        "token": seen.raw.get("token"),
        "beats": seen.raw.get("beats"),
    }


def utc_now() -> datetime:
    """Wall-clock time for records people read; leases never use it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def failure_record(
    kind: str, running: dict[str, Any], who: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """The ``failure`` sub-document that makes a lock stuck: what, where, when, why."""
    return {
        "kind": kind,
        "version": running.get("version"),
        "name": running.get("name"),
        "direction": running.get("direction"),
        "host": who.get("host"),
        "pid": who.get("pid"),
        "build": who.get("build"),
        "at": utc_now(),
        **fields,
    }
