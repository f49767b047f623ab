"""The migration lock: every read and write of the control document, and the rules they keep.

:class:`ControlLock` is what any process does with the lock: read it, acquire it (creating the
document if missing), adopt one its own lost reply acquired, take over a dead holder's (or mark
it interrupted), tidy an abandoned one, retry a failure on a new build, and the operator's
unlock and set-version. :class:`HeldLock` is one acquisition, bound to its token: the heartbeat,
the fenced writes (start, progress, advance, release, stick), and the rule that once the lock
is lost it writes nothing more. Each change to the control document is one atomic round trip
(a history record, where one is kept, is a second).

The lease rule lives in :meth:`ControlLock.lease_of`: a holder is alive while the server's
clock says its last heartbeat is younger than the lease it recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from pymongo import ReturnDocument
from pymongo.errors import ConnectionFailure, DuplicateKeyError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay

from .control import (
    CONTROL_ID,
    HELD_FIELDS,
    Control,
    Owner,
    failure_record,
    parse_control,
    step_label,
)
from .drivers import address_of, majority_collection, server_time
from .errors import ControlLocked, DatabaseUnavailable, LockLost
from .history import Entry, History
from .migrations import Migration
from .plan import Plan
from .report import log_fields
from .waiting import Deadline, WaitPolicy

log = logging.getLogger("bootmigrate")

T = TypeVar("T")


class LockBusy(Exception):
    """A live process holds the lock: look again later."""

    def __init__(self, control: Control) -> None:
        super().__init__("control lock held")
        self.control = control


@dataclass(frozen=True)
class Lease:
    """A held lock's lease as seen now: seconds since its holder's last heartbeat (``None``:
    none recorded) against the lease it promised (``None``: a lock from Rocket.Chat or by hand,
    which records none)."""

    silent_for: float | None
    lease: float | None

    @property
    def expired(self) -> bool | None:
        """Whether a waiting replica would take this lock over (``None``: no lease to judge)."""
        if self.silent_for is None or self.lease is None:
            return None
        return self.silent_for > self.lease


@dataclass(frozen=True)
class OperatorChange:
    """What an operator's unlock or set-version found (``before``) and whether it changed it."""

    changed: bool
    before: Control
    lease: Lease


class ControlLock:
    """The lock on one control document, as used by one process (``owner``)."""

    def __init__(
        self, db: Any, *, collection: str, history: str, owner: Owner, waiting: WaitPolicy
    ) -> None:
        self.db = db
        self.collection = majority_collection(db, collection)
        self.collection_name = collection
        self.owner = owner
        self.waiting = waiting
        self.history = History(majority_collection(db, history), owner)

    async def read(self) -> Control:
        """The control document, validated (one ``find_one``)."""
        return parse_control(
            await self.collection.find_one({"_id": CONTROL_ID}), self.collection_name
        )

    async def lease_of(
        self, control: Control, deadline: Deadline | None = None, *, assumed: float | None = None
    ) -> Lease:
        """The lease of a held lock, both instants on the server's clock, so that no client's
        clock enters the decision. ``assumed`` stands in for a lease its holder did not record
        (a waiter judges such a holder by its own lease; an operator's view shows none)."""
        lease = control.recorded_lease or assumed
        if not control.locked or control.heartbeat is None:
            return Lease(None, lease)
        with deadline.bound() if deadline else anyio.CancelScope():
            now = await server_time(self.db)
        return Lease((now - control.heartbeat).total_seconds(), lease)

    # -- taking the lock ---------------------------------------------------------------------

    async def acquire(self, seen: Control) -> HeldLock | None:
        """Take a free lock at the version planned from (creating the document if there is
        none); ``None`` if another process got there first."""
        # Shielded: a lock taken by a write whose reply was abandoned would sit unused until
        # its lease ran out. A cancellation pending meanwhile lands at the holder's first
        # checkpoint, which releases the lock.
        with anyio.CancelScope(shield=True):
            if not seen.exists:
                held = await self._create(version=0, owner=self.owner)
            else:
                held = await self._swap(
                    {"_id": CONTROL_ID, "locked": False, "version": seen.version},
                    {"$unset": {"failure": "", "running": ""}},
                )
        return HeldLock(self, held) if held is not None else None

    def adopt(self, seen: Control) -> HeldLock | None:
        """The lock, if ``seen`` shows our own acquire went through though its reply was lost."""
        if seen.locked and not seen.stuck and (seen.owner or {}).get("id") == self.owner.id:
            return HeldLock(self, seen)
        return None

    async def take_over(
        self,
        seen: Control,
        known: Mapping[int, Migration],
        deadline: Deadline,
        plan: Plan | None = None,
    ) -> HeldLock | None:
        """Take a dead holder's lock, to run ``plan``; raise :class:`LockBusy` while it lives.

        A holder that died inside a migration that is not safe to repeat is never stepped
        over: its lock is marked interrupted (stuck) instead, and ``None`` returned, as when
        another process wins the takeover. One that died inside a step that is safe to repeat
        is taken over only by a plan that starts with that step, in its direction; any other
        plan is refused (``ControlLocked``, reason ``"unfinished"``) and the lock left as it is.
        """
        if seen.heartbeat is None or not seen.owner:
            raise LockBusy(seen)  # a lock with no lease is never presumed dead
        lease = await self.lease_of(seen, deadline, assumed=self.owner.lease)
        if not lease.expired:
            raise LockBusy(seen)
        running = seen.running
        unfinished = seen.unfinished_step  # None once an operator recorded the version
        interrupted = known.get(running["version"]) if running else None
        if running and unfinished and not (interrupted and interrupted.safe_to_repeat):
            await self._mark_interrupted(seen, lease)
            return None
        if unfinished and not (plan is not None and plan.resumes(unfinished)):
            raise ControlLocked(
                "unfinished",
                seen,
                collection=self.collection_name,
                action=plan.describe() if plan is not None and plan.steps else "take it over",
            )
        log.warning(
            "taking over the migration lock from %s: no heartbeat for %.1f s (lease %g s)%s",
            seen.describe_owner(),
            lease.silent_for,
            lease.lease,
            f"; re-running idempotent migration {running['version']}" if running else "",
        )
        with anyio.CancelScope(shield=True):
            held = await self._swap(_unbeaten(seen), {})
        return HeldLock(self, held) if held is not None else None

    async def release_abandoned(self, seen: Control, deadline: Deadline) -> None:
        """Release a lock whose holder died after its last migration: nothing was interrupted,
        so take it over and release it, sparing operators an unlock."""
        if seen.heartbeat is None or not seen.owner:
            return
        lease = await self.lease_of(seen, deadline, assumed=self.owner.lease)
        if not lease.expired:
            return  # alive: it is migrating beyond this build's target
        with anyio.CancelScope(shield=True):
            held = await self._swap(_unbeaten(seen), {})
            if held is not None:
                # One try, not a holder's retries: a failure goes back to the waiter's own loop.
                await self.collection.update_one(_fence(held.token), _RELEASED)
                log.warning(
                    "released the migration lock left by %s, silent for %.1f s after its last "
                    "migration",
                    seen.describe_owner(),
                    lease.silent_for,
                    extra=log_fields("dead_lock_released", holder=seen.owner),
                )

    async def retry_failed(self, seen: Control) -> HeldLock | None:
        """Take a lock stuck by a failure, only if it is still exactly as ``seen``; recorded in
        history as a manual ``retry-on-new-build`` action."""
        failure = seen.failure or {}
        with anyio.CancelScope(shield=True):
            held = await self._swap(_failed_as(seen), {"$unset": {"failure": "", "running": ""}})
            if held is not None:
                note = (
                    f"build {self.owner.build} retries the migration that failed on build "
                    f"{failure.get('build')}: {failure.get('error')}"
                )
                version, name = int(failure.get("version") or 0), str(failure.get("name") or "")
                entry = Entry.manual(
                    "retry-on-new-build", version, note, name=name, token=held.token
                )
                await self.history.record(entry)
        return HeldLock(self, held) if held is not None else None

    async def skip_fresh(self, version: int) -> bool:
        """Record a database with no control document as being at ``version`` without running
        anything (Rocket.Chat's way); ``False`` if another process created the document first."""
        with anyio.CancelScope(shield=True):
            if await self._create(version=version, owner=None) is None:
                return False
            await self.history.record(
                Entry(
                    version=version,
                    name="",
                    outcome="skipped",
                    direction="up",
                    note="fresh database: recorded as up to date without running migrations "
                    "(fresh='skip')",
                )
            )
        return True

    # -- what operators do -------------------------------------------------------------------

    async def unlock(
        self, *, force: bool, known: Mapping[int, Migration] | None = None
    ) -> OperatorChange:
        """Unlock a stuck or abandoned lock. Refused without ``force`` while a live holder
        runs, and while it would let a migration that is not safe to repeat run again: one
        stuck as interrupted, or one whose holder died inside it (``known`` says which
        migrations are safe to repeat; without it, none is). The step that did not finish
        stays recorded (``unfinished``): an ``up`` resumes at the next boot, a ``down`` or
        ``rerun`` only when run again in its direction. Recorded in history: the unlock, and
        the interruption of a holder that died inside a migration, if no one recorded it."""
        seen = await self.read()
        lease = await self.lease_of(seen)
        if not seen.locked:
            return OperatorChange(False, seen, lease)
        self._refuse_live(seen, lease, "unlock", force)
        unfinished = seen.unfinished_step  # None once an operator recorded the version
        stopped_inside = seen.running is not None and seen.failure is None
        interrupted = (seen.failure or {}).get("kind") == "interrupted" or stopped_inside
        if interrupted and unfinished is not None and not force:
            migration = (known or {}).get(unfinished.get("version") or 0)
            if not (stopped_inside and migration is not None and migration.safe_to_repeat):
                raise ControlLocked("interrupted", seen, collection=self.collection_name)
        update: dict[str, Any] = {**_RELEASED, "$set": {"locked": False}}
        if unfinished is not None and "unfinished" not in seen.raw:
            # Read from `running` or `failure`, which the release removes: keep it.
            update["$set"]["unfinished"] = {"from_version": seen.version, **unfinished}
        if not (await self.collection.update_one(_unchanged(seen), update)).modified_count:
            raise ControlLocked("changed", seen, collection=self.collection_name, action="unlock")
        if stopped_inside and seen.running is not None:
            await self.history.record(_interruption(seen.running, seen, "unlocked by an operator"))
        note = f"unlocked by an operator; was {describe_lock(seen, lease)}"
        step = seen.failure or seen.running or {}
        await self.history.record(
            Entry.manual("unlock", seen.version, note, name=str(step.get("name") or ""))
        )
        return OperatorChange(True, seen, lease)

    async def set_version(self, version: int, *, force: bool) -> OperatorChange:
        """Record the database as being at ``version`` (a skip) without touching the lock,
        refused while a live holder runs unless ``force``. Recorded in history."""
        seen = await self.read()
        lease = await self.lease_of(seen)
        self._refuse_live(seen, lease, "set the version", force)
        if not seen.exists:
            changed = await self._create(version=version, owner=None) is not None
        else:
            update: dict[str, Any] = {"version": version}
            if seen.unfinished_step is not None or seen.unfinished is not None:
                # The operator says where the database is: no step is left to finish. Null,
                # not removed, so that a `running` or `failure` left behind is not read instead.
                update["unfinished"] = None
            result = await self.collection.update_one(_unchanged(seen), {"$set": update})
            changed = bool(result.matched_count)
        if not changed:
            raise ControlLocked(
                "changed", seen, collection=self.collection_name, action="set the version"
            )
        note = f"version set by an operator from {seen.version} to {version}"
        await self.history.record(Entry.manual("set-version", version, note))
        return OperatorChange(True, seen, lease)

    def _refuse_live(self, seen: Control, lease: Lease, action: str, force: bool) -> None:
        if seen.locked and seen.failure is None and lease.expired is False and not force:
            raise ControlLocked(
                "holder_alive",
                seen,
                collection=self.collection_name,
                action=action,
                heartbeat_age=lease.silent_for,
                lease=lease.lease,
            )

    # -- the writes behind them ----------------------------------------------------------------

    async def _create(self, *, version: int, owner: Owner | None) -> Control | None:
        """Create the missing document, locked by ``owner`` if given; ``None`` if another
        process created it first. The filter cannot match an existing control document
        (every one has a ``version``), so the upsert inserts or fails with a duplicate key."""
        return await self._modify(
            {"_id": CONTROL_ID, "version": {"$exists": False}}, _created(version, owner), True
        )

    async def _swap(self, condition: dict[str, Any], extra: dict[str, Any]) -> Control | None:
        """Make this process the holder if ``condition`` still holds; ``None`` if not."""
        return await self._modify(condition, {**_taken_by(self.owner), **extra})

    async def _modify(
        self, condition: dict[str, Any], update: dict[str, Any], upsert: bool = False
    ) -> Control | None:
        try:
            doc = await self.collection.find_one_and_update(
                condition, update, upsert=upsert, return_document=ReturnDocument.AFTER
            )
        except DuplicateKeyError:
            return None
        return None if doc is None else parse_control(doc, self.collection_name)

    async def _mark_interrupted(self, seen: Control, lease: Lease) -> None:
        """Stick a dead holder's lock whose migration cannot be re-run (a compare-and-swap,
        like a takeover), and record the interruption in history."""
        running = seen.running or {}
        error = (
            f"holder {seen.describe_owner()} stopped heartbeating for {lease.silent_for:.1f} s "
            "inside this migration (killed or crashed)"
        )
        failure = failure_record(
            "interrupted",
            seen.unfinished_step or running,
            seen.owner or {},
            error=error,
            detected_by=f"{self.owner.host} (pid {self.owner.pid})",
        )
        with anyio.CancelScope(shield=True):
            result = await self.collection.update_one(
                _unbeaten(seen),
                {
                    "$set": {"failure": failure},
                    "$inc": {"token": 1},
                    "$unset": {"heartbeat": "", "owner": "", "running": ""},
                },
            )
            if result.modified_count:
                await self.history.record(_interruption(running, seen, error))


class HeldLock:
    """One acquisition of the lock, bound to its token.

    Every write to the control document is fenced on the token. Bookkeeping writes (start,
    advance, release, stick, and history records) are also shielded from cancellation and
    retried on connection loss for at most one lease; inside a transaction they join it
    instead. Once the lock is known lost (a fenced write matched nothing, or no heartbeat got
    through for a lease) every further write is refused before it is sent, history records
    included (those are not fenced by the server, so this rule is what stops them).
    """

    def __init__(self, lock: ControlLock, control: Control) -> None:
        self._lock = lock
        self.control = control
        self.token = control.token
        self.lost = False
        self._in_transaction = False
        self._beaten_at = 0.0  # when a transaction's commit last refreshed the heartbeat

    @property
    def collection_name(self) -> str:
        """The control document's collection name."""
        return self._lock.collection_name

    async def start(
        self, running: dict[str, Any], unfinished: dict[str, Any] | None = None
    ) -> None:
        """Name the migration about to run. Its own write, so that a taker can tell a holder
        that died inside a migration from one that died between two. ``unfinished`` (default:
        ``running``) names it until it completes, whatever happens to the lock meanwhile."""
        # `unfinished` outlives `running`: only this step's completion (advance) removes it.
        update = {"$set": {"running": running, "unfinished": unfinished or running}}
        await self.write(lambda: self._fenced(update))

    async def progress(self, done: int, total: int) -> None:
        """Record how far the running migration has got (shown by ``status``)."""
        update = {
            "$set": {"running.progress.done": done, "running.progress.total": total},
            "$currentDate": {"running.progress.at": True},
        }
        self._refuse_if_lost()
        await self._fenced(update)

    async def advance(self, version: int, session: Any = None) -> None:
        """Record a finished migration: the version reached, and no migration running. Given
        a session, the write joins its transaction (and fences it: a stale holder's
        transaction matches nothing, and aborts)."""
        update = {
            "$set": {"version": version},
            "$unset": {"running": "", "unfinished": ""},
            "$inc": {"beats": 1},
            "$currentDate": {"heartbeat": True},
        }
        await self._bookkeeping(lambda: self._fenced(update, session), session)

    async def release(self) -> None:
        """Unlock at the version reached; ``token`` stays, so that it keeps increasing."""
        await self.write(lambda: self._fenced(_RELEASED))

    async def stick(self, failure: dict[str, Any]) -> None:
        """Leave the lock held on purpose with the failure recorded, for an operator."""
        update = {
            "$set": {"failure": failure},
            "$unset": {"heartbeat": "", "owner": "", "running": ""},
        }
        await self.write(lambda: self._fenced(update))

    async def record(self, entry: Entry, session: Any = None) -> None:
        """A history record of this holder's work; in the transaction of ``session`` if given."""
        await self._bookkeeping(lambda: self._lock.history.record(entry, session), session)

    async def heartbeat(self) -> bool:
        """Refresh the lease on the server's clock; ``False`` once the lock is no longer ours."""
        self._refuse_if_lost()
        result = await self._lock.collection.update_one(
            _fence(self.token), {"$currentDate": {"heartbeat": True}, "$inc": {"beats": 1}}
        )
        return bool(result.matched_count)

    async def keep_alive(self, stop: Callable[[], None]) -> None:
        """Beat every lease/3 until cancelled; once the lock may not be ours, mark it lost and
        call ``stop`` (which cancels the migrations)."""
        lease = self._lock.owner.lease
        last_beat = time.monotonic()
        while True:
            await anyio.sleep(lease / 3)
            if self._in_transaction:
                continue  # a beat would conflict with the transaction; it is short by design
            last_beat = max(last_beat, self._beaten_at)
            ours: bool | None = None
            with anyio.move_on_after(max(last_beat + lease - time.monotonic(), 0.0)):
                try:
                    ours = await self.heartbeat()
                except Exception as exc:  # keep beating; the lease decides when to give up
                    log.warning("heartbeat failed: %s", exc)
            if ours:
                last_beat = time.monotonic()
                continue
            if ours is False or time.monotonic() - last_beat >= lease:
                log.error(
                    "lost the migration lock (token %d); stopping without further writes",
                    self.token,
                )
                self.lost = True
                stop()
                return

    @asynccontextmanager
    async def transaction_window(self) -> AsyncIterator[None]:
        """Around a transaction that writes the control document: beat just before, and pause
        the heartbeat meanwhile (a beat would conflict with the transaction's own write)."""
        self._refuse_if_lost()
        if not await self.heartbeat():
            self.lost = True
            raise self.lost_error("before a transaction")
        self._in_transaction = True
        try:
            yield
        finally:
            self._in_transaction = False
            self._beaten_at = time.monotonic()

    def lost_error(self, during: str) -> LockLost:
        """The error that says this lock was lost ``during`` something."""
        lock = self._lock
        return LockLost(
            token=self.token, collection=lock.collection_name, lease=lock.owner.lease, during=during
        )

    async def write(self, write: Callable[[], Awaitable[T]]) -> T:
        """A bookkeeping write: refused once the lock is lost, shielded from cancellation, and
        retried on connection loss for at most one lease (after that the lock may no longer
        be ours anyway)."""
        self._refuse_if_lost()
        lease = self._lock.owner.lease
        with anyio.CancelScope(shield=True):
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(ConnectionFailure),
                    wait=self._lock.waiting.write_retry_backoff(),
                    stop=stop_after_delay(lease),
                    reraise=True,
                ):
                    with attempt:
                        # Again before every retry: the heartbeat may have given up meanwhile.
                        self._refuse_if_lost()
                        return await write()
            except ConnectionFailure as exc:
                raise DatabaseUnavailable(
                    address=address_of(self._lock.db), seconds=lease, cause=str(exc), holding=True
                ) from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _bookkeeping(self, write: Callable[[], Awaitable[None]], session: Any) -> None:
        """Inside a transaction a write joins it: no shield and no retry of its own (the
        transaction commits or aborts as a whole); elsewhere it is a guarded :meth:`write`."""
        if session is None:
            await self.write(write)
        else:
            self._refuse_if_lost()
            await write()

    def _refuse_if_lost(self) -> None:
        if self.lost:
            raise self.lost_error("and refused a further write")

    async def _fenced(self, update: dict[str, Any], session: Any = None) -> None:
        doc = await self._lock.collection.find_one_and_update(
            _fence(self.token),
            update,
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        if doc is None:
            self.lost = True
            raise self.lost_error("when its next write found the lock gone")


def describe_lock(control: Control, lease: Lease) -> str:
    """How a lock looked, in a few words, for what ``unlock`` reports it changed."""
    if control.failure:
        kind = control.failure.get("kind", "failed")
        direction = control.failure.get("direction") or "up"
        during = "" if direction == "up" else f" during its `{direction}`"
        return (
            f"stuck at version {control.version}: migration {control.failure.get('version')} "
            f"{kind}{during}"
        )
    inside = f", inside {step_label(control.running)}" if control.running else ""
    if lease.expired:
        return f"held by {control.describe_owner()} whose lease had expired{inside}"
    if lease.lease is None:
        return f"locked at version {control.version} with no owner recorded"
    return f"held by {control.describe_owner()} (forced){inside}"


def _interruption(running: dict[str, Any], seen: Control, note: str) -> Entry:
    """The history record of a holder that stopped inside the step ``running``."""
    return Entry(
        version=int(running.get("version") or 0),
        name=str(running.get("name") or ""),
        outcome="interrupted",
        direction=running.get("direction") or "up",
        token=seen.token,
        note=note,
    )


# Unlocked at the version reached; the holder's fields go, `token` stays so it keeps growing.
# `unfinished` stays too: a step that did not complete is still unfinished after a release.
_RELEASED = {"$set": {"locked": False}, "$unset": {name: "" for name in HELD_FIELDS}}


def _fence(token: int) -> dict[str, Any]:
    """A filter matching the control document only while ``token``'s holder has the lock."""
    return {"_id": CONTROL_ID, "locked": True, "token": token}


def _taken_by(owner: Owner) -> dict[str, Any]:
    """The update that makes ``owner`` the holder: a new token, a fresh heartbeat (on the
    server's clock) and beat counter."""
    return {
        "$set": {"locked": True, "owner": owner.as_document(), "beats": 0},
        "$inc": {"token": 1},
        "$currentDate": {"heartbeat": True, "locked_at": True},
    }


def _created(version: int, owner: Owner | None) -> dict[str, Any]:
    """The upsert that creates a control document at ``version``, held by ``owner`` if given."""
    if owner is None:
        return {"$set": {"locked": False, "version": version}}
    taken = _taken_by(owner)
    return {
        "$set": {**taken["$set"], "version": version, "token": 1},
        "$currentDate": taken["$currentDate"],
    }


def _unbeaten(seen: Control) -> dict[str, Any]:
    """A filter matching a held lock only if its holder has not beaten since ``seen`` (a slow
    holder that beat in the meantime keeps its lock) and it is not stuck."""
    return {
        "_id": CONTROL_ID,
        "locked": True,
        "token": seen.token,
        "beats": seen.beats,
        "failure": None,
    }


def _failed_as(seen: Control) -> dict[str, Any]:
    """A filter matching a lock stuck by a failure only as ``seen`` (same token, same build)."""
    return {
        "_id": CONTROL_ID,
        "locked": True,
        "token": seen.token,
        "failure.kind": "failed",
        "failure.build": (seen.failure or {}).get("build"),
    }


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
