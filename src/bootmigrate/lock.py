"""The migration lock: every read and write of the control document, and the rules they keep.

:class:`ControlLock` is what any process does with the lock: read it, acquire it (creating the
document if missing), adopt one its own lost reply acquired, take over a dead holder's (or mark
it interrupted), retry a failure on a new build, and the operator's
unlock and set-version. :class:`HeldLock` is one acquisition, bound to its token: the heartbeat,
the fenced writes (start, progress, advance, release, stick), and the rule that once the lock
is lost it writes nothing more. Each change to the control document is one atomic round trip
(a history record, where one is kept, is a second).

The lease rule lives in :meth:`ControlLock.observed`, on one clock only: a holder is dead
once this process has watched its lock for a whole lease (on its own monotonic clock) without
seeing a heartbeat. Times stamped by the server are shown to people (:meth:`ControlLock.lease_of`)
but never decide, because "now" and the heartbeat may come from two servers with two clocks (a
mongos and a shard primary, an old and a new primary).

All the lock's I/O is pinned to the primary with majority read and write concern
(``drivers.pinned_collection``) and carries a deadline, so that no decision rests on a stale or
rolled-back copy and no call outlives its budget.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay

from .control import (
    CONTROL_ID,
    HELD_FIELDS,
    Control,
    Owner,
    failure_record,
    parse_control,
    step_label,
)
from .driver_errors import is_transient
from .drivers import address_of, pinned_collection, server_time
from .errors import ControlLocked, DatabaseUnavailable, LockLost
from .events import Emitter
from .history import Entry, History, presumed_entry
from .ledger import Ledger, Survey, digest_of, survey
from .migrations import Migration
from .plan import Plan, Step
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
    # The version recorded with the unlock: the step its holder died in had finished.
    recorded: int | None = None


class ControlLock:
    """The lock on one control document, as used by one process (``owner``)."""

    def __init__(
        self,
        db: Any,
        *,
        collection: str,
        history: str,
        owner: Owner,
        waiting: WaitPolicy,
        events: Emitter | None = None,
    ) -> None:
        self.db = db
        # Where this lock's events go: a migrate() call's, or log records only.
        self.events = events or Emitter(owner.id)
        self.collection = pinned_collection(db, collection, owner.lease)
        self.collection_name = collection
        self.owner = owner
        self.waiting = waiting
        self.history = History(pinned_collection(db, history, owner.lease), owner)
        self._sighting: tuple[tuple[int, str | None, int], float] | None = None

    def observed(self, control: Control, assumed: float | None = None) -> Lease:
        """The lease of a held lock as this process has watched it: how long, on this
        process's monotonic clock, its heartbeat has not moved (its token, acquisition and
        beat counter unchanged since first seen). No server's clock enters the decision, so
        that two servers' clocks are never compared."""
        lease = control.recorded_lease or assumed
        state = (control.token, control.acquisition, control.beats)
        now = time.monotonic()
        if self._sighting is None or self._sighting[0] != state:
            self._sighting = (state, now)
        return Lease(now - self._sighting[1], lease)

    def presumed_dead(self, seen: Control) -> Lease | None:
        """The lease of a holder this process has watched silent for it, or ``None`` while it
        may live. A lock with no heartbeat or owner (set by hand or by Rocket.Chat) records no
        lease, and is never presumed dead."""
        if seen.heartbeat is None or not seen.owner:
            return None
        lease = self.observed(seen, assumed=self.owner.lease)
        return lease if lease.expired else None

    async def read(self) -> Control:
        """The control document, validated (one ``find_one``)."""
        return parse_control(
            await self.collection.find_one({"_id": CONTROL_ID}), self.collection_name
        )

    async def lease_of(self, control: Control, *, assumed: float | None = None) -> Lease:
        """The lease of a held lock as the server's clock shows it: the age of its last
        heartbeat by the clock of the server answering now. For people only (``status``):
        after a failover, or through a mongos, that is a second clock, so it never decides.
        ``assumed`` stands in for a lease its holder did not record."""
        lease = control.recorded_lease or assumed
        if not control.locked or control.heartbeat is None:
            return Lease(None, lease)
        now = await server_time(self.db)
        if now is None:
            return Lease(None, lease)  # a server that does not tell its time
        return Lease((now - control.heartbeat).total_seconds(), lease)

    # -- taking the lock ---------------------------------------------------------------------

    async def acquire(self, seen: Control, deadline: Deadline) -> HeldLock | None:
        """Take a free lock at the version planned from (creating the document if there is
        none); ``None`` if another process got there first."""
        # Shielded: a lock taken by a write whose reply was abandoned would sit unused until
        # its lease ran out. A cancellation pending meanwhile lands at the holder's first
        # checkpoint, which releases the lock. Bounded all the same: a server that never
        # answers must not hold the call past its deadline.
        with anyio.CancelScope(shield=True), deadline.bound():
            if not seen.exists:
                held = await self._create(version=0, owner=self.owner)
            else:
                # The ledger too: an out-of-order migration moves it, not the version, and
                # must not run twice.
                held = await self._swap(
                    {
                        "_id": CONTROL_ID,
                        "locked": False,
                        "version": seen.version,
                        "applied": seen.raw.get("applied"),
                    },
                    {"$unset": {"failure": "", "running": ""}},
                )
        return HeldLock(self, held) if held is not None else None

    def adopt(self, seen: Control) -> HeldLock | None:
        """The lock, if ``seen`` (a majority read) shows our own acquire went through though
        its reply was lost: it names this process's own id and carries an acquisition id."""
        if (
            seen.locked
            and not seen.stuck
            and seen.acquisition is not None
            and (seen.owner or {}).get("id") == self.owner.id
        ):
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
        lease = self.presumed_dead(seen)
        if lease is None:
            raise LockBusy(seen)
        running = seen.running
        unfinished = seen.unfinished_step  # None once an operator recorded the version
        if running and unfinished:
            with anyio.CancelScope(shield=True), deadline.bound():
                finished = await self.finished_before_dying(seen)
            if finished:
                return await self._take_finished(seen, lease, unfinished, deadline)
        interrupted = known.get(running["version"]) if running else None
        repeatable = interrupted is not None and interrupted.safe_to_repeat(
            (running or {}).get("direction")
        )
        if running and unfinished and not repeatable:
            await self._mark_interrupted(seen, lease, deadline)
            return None
        if unfinished and not (plan is not None and plan.resumes(unfinished)):
            raise ControlLocked(
                "unfinished",
                seen,
                collection=self.collection_name,
                action=plan.describe() if plan is not None and plan.steps else "take it over",
            )
        with anyio.CancelScope(shield=True), deadline.bound():
            held = await self._swap(_unbeaten(seen), {})
        if held is None:
            return None
        why = (
            f"; re-running migration {running['version']}, which is safe to repeat"
            if running
            else ""
        )
        return self._took_over(seen, lease, held, why)

    async def finished_before_dying(self, seen: Control) -> bool:
        """Whether the dead holder's history shows the step it names finished: it died after
        recording the step applied and before recording its version. Asked only of a lock
        whose holder died inside a step (and by ``status``), so it costs no other boot a
        read."""
        if seen.acquisition is None or seen.running is None:
            return False  # a lock from before acquisition ids: its records cannot be told apart
        return await self.history.applied_by(seen.running, seen.token, seen.acquisition)

    async def _take_finished(
        self, seen: Control, lease: Lease, unfinished: dict[str, Any], deadline: Deadline
    ) -> HeldLock | None:
        """Take over a dead holder's lock whose step had finished, recording the version it
        reached in the same write: the taker goes on from there as after a holder that died
        between two steps."""
        reached = int(unfinished["to_version"])
        taken = _taken_by(self.owner)
        update = {
            **taken,
            "$set": {**taken["$set"], "version": reached, **_ledger_after(seen, unfinished)},
            "$unset": {"running": "", "unfinished": ""},
        }
        # Also as seen in version and step: an operator's set-version meanwhile (which moves
        # neither the token nor the beats) must not be overwritten by the version read here.
        unchanged = {
            **_unbeaten(seen),
            "version": seen.version,
            "running": seen.raw.get("running"),
            "unfinished": seen.raw.get("unfinished"),
            "applied": seen.raw.get("applied"),
        }
        with anyio.CancelScope(shield=True), deadline.bound():
            held = await self._modify(unchanged, update)
        if held is None:
            return None
        why = (
            f"; migration {(seen.running or {}).get('version')} had finished (its history "
            f"record says applied), so the lock was taken at version {reached}"
        )
        return self._took_over(seen, lease, held, why)

    def _took_over(self, seen: Control, lease: Lease, held: Control, why: str) -> HeldLock:
        """Say that a dead holder's lock was taken over (``why``: what it was found doing),
        and hand the lock over."""
        self.events.emit(
            "took_over",
            "took over the migration lock from %s: no heartbeat seen for %.1f s (lease %g s)%s",
            seen.describe_owner(),
            lease.silent_for,
            lease.lease,
            why,
            level=logging.WARNING,
            holder=seen.owner,
            running=seen.running,
            silent_s=lease.silent_for,
            lease_s=lease.lease,
            token=held.token,
            db_version=held.version,
        )
        return HeldLock(self, held)

    async def retry_failed(self, seen: Control, deadline: Deadline) -> HeldLock | None:
        """Take a lock stuck by a failure, only if it is still exactly as ``seen``; recorded in
        history as a manual ``retry-on-new-build`` action."""
        failure = seen.failure or {}
        with anyio.CancelScope(shield=True), deadline.bound():
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

    async def skip_fresh(self, version: int, skipped: Sequence[int], deadline: Deadline) -> bool:
        """Record a database with no control document as being at ``version`` without running
        anything (Rocket.Chat's way), ``skipped`` listed as skipped in history and in the
        ledger; ``False`` if another process created the document first."""
        ledger = Ledger.of(skipped, since=0, upto=version)
        with anyio.CancelScope(shield=True), deadline.bound():
            # The record goes first, so that the ledger never counts a skip the history
            # lacks; under one fixed id, so that replicas racing to create the document
            # leave one record between them.
            await self.history.record(
                Entry(
                    version=version,
                    name="",
                    outcome="skipped",
                    direction="up",
                    note="fresh database: recorded as up to date without running migrations "
                    "(fresh='skip')",
                    versions=tuple(skipped),
                    id=f"fresh-skip:{version}:{digest_of(skipped):x}",
                )
            )
            if await self._create(version=version, owner=None, applied=ledger) is None:
                return False
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
        await self._refuse_live(seen, lease, "unlock", force)
        unfinished = seen.unfinished_step  # None once an operator recorded the version
        stopped_inside = seen.running is not None and seen.failure is None
        # Died after recording its step applied, before its version: nothing is half done.
        finished = (
            stopped_inside and unfinished is not None and await self.finished_before_dying(seen)
        )
        interrupted = (seen.failure or {}).get("kind") == "interrupted" or stopped_inside
        if interrupted and unfinished is not None and not force and not finished:
            migration = (known or {}).get(unfinished.get("version") or 0)
            repeatable = migration is not None and migration.safe_to_repeat(
                unfinished.get("direction")
            )
            if not (stopped_inside and repeatable):
                raise ControlLocked("interrupted", seen, collection=self.collection_name)
        update: dict[str, Any] = {**_RELEASED, "$set": {"locked": False}}
        note = f"unlocked by an operator; was {describe_lock(seen, lease)}"
        reached: int | None = None
        if finished and unfinished is not None:
            reached = int(unfinished["to_version"])
            update = {
                **_RELEASED_UNNAMED,
                "$set": {"locked": False, "version": reached, **_ledger_after(seen, unfinished)},
            }
            note += (
                f"; migration {unfinished.get('version')} had finished (its history record "
                f"says applied), so version {reached} was recorded"
            )
        elif unfinished is not None and "unfinished" not in seen.raw:
            # Read from `running` or `failure`, which the release removes: keep it.
            update["$set"]["unfinished"] = {"from_version": seen.version, **unfinished}
        if not (await self.collection.update_one(_unchanged(seen), update)).modified_count:
            raise ControlLocked("changed", seen, collection=self.collection_name, action="unlock")
        if stopped_inside and seen.running is not None and not finished:
            await self.history.record(_interruption(seen.running, seen, "unlocked by an operator"))
        # Its version is the database's; the note names the migration the lock was stuck on.
        await self.history.record(
            Entry.manual("unlock", seen.version if reached is None else reached, note)
        )
        return OperatorChange(True, seen, lease, reached)

    async def set_version(
        self, version: int, *, force: bool, files: Sequence[int] | None = None
    ) -> OperatorChange:
        """Record the database as being at ``version`` (a skip) without touching the lock,
        refused while a live holder runs unless ``force``. Recorded in history, with each of
        this build's ``files`` it moves past going up listed as skipped; the ledger is
        rebuilt from the history (without ``files``, left as it was, for the history to
        settle at the next boot)."""
        seen = await self.read()
        lease = await self.lease_of(seen)
        await self._refuse_live(seen, lease, "set the version", force)
        skipped = [v for v in files or () if seen.version < v <= version]
        note = f"version set by an operator from {seen.version} to {version}"
        # The record first: the ledger written next counts the skips it lists.
        await self.history.record(
            Entry(
                version,
                "",
                "skipped" if version > seen.version else "manual",
                action="set-version",
                note=note,
                versions=tuple(skipped),
                from_version=seen.version,
            )
        )
        ledger = seen.ledger
        if files is not None:
            ledger = (await self.rebuilt_ledger(seen, files, version)).ledger
        if not seen.exists:
            changed = await self._create(version=version, owner=None, applied=ledger) is not None
        else:
            update: dict[str, Any] = {"$set": {"version": version}}
            if ledger is not None:
                # Without the files, the ledger stays as it was: the version moved past it,
                # and the history (this set-version's record) decides at the next boot.
                update["$set"]["applied"] = ledger.as_document()
            if seen.unfinished_step is not None or seen.unfinished is not None:
                # The operator says where the database is: no step is left to finish. Null,
                # not removed, so that a `running` or `failure` left behind is not read instead.
                update["$set"]["unfinished"] = None
            result = await self.collection.update_one(_unchanged(seen), update)
            changed = bool(result.matched_count)
        if not changed:
            raise ControlLocked(
                "changed", seen, collection=self.collection_name, action="set the version"
            )
        return OperatorChange(True, seen, lease)

    async def skip(self, seen: Control, versions: Sequence[int], files: Sequence[int]) -> None:
        """Record migrations below the database's version that never ran as skipped (their
        change is already there, or must never be made), so that no boot refuses them as out
        of order; an unfinished out-of-order run of one of them is settled too. Refused while
        a live holder runs, and if the document changed since ``seen``."""
        await self._refuse_live(seen, await self.lease_of(seen), "record a skip", False)
        found = await self.survey_history(seen, files)
        counted = [v for v in versions if v >= found.ledger.since and v not in found.presumed]
        ledger = found.ledger.with_versions(added=counted)
        await self._record_presumed(seen, found)
        update: dict[str, Any] = {"$set": {"applied": ledger.as_document()}}
        step = seen.unfinished_step
        if step is not None and step.get("version") in versions:
            update["$set"]["unfinished"] = None
        # The ledger first, compared with the document as read: an acquire made meanwhile
        # (which could run them) makes this fail before anything is recorded; and an acquire
        # that comes after it sees the ledger changed, looks again, and runs nothing.
        if not (await self.collection.update_one(_unchanged(seen), update)).matched_count:
            raise ControlLocked(
                "changed", seen, collection=self.collection_name, action="record a skip"
            )
        note = f"recorded as skipped by an operator at version {seen.version}: never run"
        await self.history.record(
            Entry(seen.version, "", "skipped", action="skip", note=note, versions=tuple(versions))
        )

    async def survey_history(
        self, seen: Control, files: Sequence[int], version: int | None = None
    ) -> Survey:
        """What the history says of ``files`` with the database at ``version`` (default:
        ``seen``'s), against ``seen``'s ledger."""
        at = seen.version if version is None else version
        return survey(files, at, seen.ledger, await self.history.in_effect(0, at))

    async def rebuilt_ledger(self, seen: Control, files: Sequence[int], version: int) -> Survey:
        """What the history says of ``files`` at ``version`` (the ledger to write, from
        ``seen``'s), with the versions it takes as done recorded first, as the ledger counts
        them."""
        found = await self.survey_history(seen, files, version)
        await self._record_presumed(seen, found)
        return found

    async def keep_ledger(self, seen: Control, found: Survey) -> bool:
        """Write the ledger of ``found`` on the control document if it is still as ``seen``
        and differs, the versions it takes as done recorded first; whether it was written."""
        if not seen.exists or seen.ledger == found.ledger:
            return False
        await self._record_presumed(seen, found)
        update = {"$set": {"applied": found.ledger.as_document()}}
        return bool((await self.collection.update_one(_unchanged(seen), update)).matched_count)

    async def _record_presumed(self, seen: Control, found: Survey) -> None:
        entry = presumed_entry(found, seen)
        if entry is not None:
            await self.history.record(entry)

    async def _refuse_live(self, seen: Control, lease: Lease, action: str, force: bool) -> None:
        """Refuse to change a live holder's lock unless ``force``. A heartbeat the server's
        clock calls recent is enough to refuse; one it calls old is not enough to proceed,
        since that compares two clocks: the holder must also be seen not to beat for its
        lease, on this process's clock (the rule every waiter follows)."""
        if force or not seen.locked or seen.failure is not None or lease.lease is None:
            return
        alive = lease.expired is False
        if not alive and seen.heartbeat is not None and seen.owner:
            now = await self._watched(seen, lease.lease)
            if (now.locked, now.token, now.acquisition) != (True, seen.token, seen.acquisition):
                raise ControlLocked("changed", seen, collection=self.collection_name, action=action)
            alive = now.beats != seen.beats
        if alive:
            raise ControlLocked(
                "holder_alive",
                seen,
                collection=self.collection_name,
                action=action,
                heartbeat_age=lease.silent_for,
                lease=lease.lease,
            )

    async def _watched(self, seen: Control, lease: float) -> Control:
        """Watch the lock for up to ``lease`` seconds; the first reading that differs from
        ``seen`` (its holder beat, or the lock changed hands), else the last one."""
        self.events.emit(
            "watching_holder",
            "watching the heartbeat of %s for up to %g s (its lease) before acting on its lock; "
            "--force skips this",
            seen.describe_owner(),
            lease,
            holder=seen.owner,
            lease_s=lease,
            db_version=seen.version,
        )
        ends = time.monotonic() + lease
        now = seen
        while time.monotonic() < ends:
            await anyio.sleep(min(0.25, lease / 4))
            now = await self.read()
            state = (now.locked, now.token, now.acquisition, now.beats)
            if state != (seen.locked, seen.token, seen.acquisition, seen.beats):
                break
        return now

    # -- the writes behind them ----------------------------------------------------------------

    async def _create(
        self, *, version: int, owner: Owner | None, applied: Ledger | None = None
    ) -> Control | None:
        """Create the missing document, locked by ``owner`` if given; ``None`` if another
        process created it first. The filter cannot match an existing control document
        (every one has a ``version``), so the upsert inserts or fails with a duplicate key."""
        update = _created(version, owner)
        if applied is not None:
            update["$set"]["applied"] = applied.as_document()
        return await self._modify({"_id": CONTROL_ID, "version": {"$exists": False}}, update, True)

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

    async def _mark_interrupted(self, seen: Control, lease: Lease, deadline: Deadline) -> None:
        """Stick a dead holder's lock whose migration cannot be re-run (a compare-and-swap,
        like a takeover), and record the interruption in history."""
        running = seen.running or {}
        error = (
            f"holder {seen.describe_owner()} was seen giving no heartbeat for "
            f"{lease.silent_for:.1f} s inside this migration (killed or crashed)"
        )
        failure = failure_record(
            "interrupted",
            seen.unfinished_step or running,
            seen.owner or {},
            error=error,
            detected_by=f"{self.owner.host} (pid {self.owner.pid})",
        )
        with anyio.CancelScope(shield=True), deadline.bound():
            result = await self.collection.update_one(
                _unbeaten(seen),
                {
                    "$set": {"failure": failure},
                    "$inc": {"token": 1},
                    "$unset": {"heartbeat": "", "owner": "", "running": "", "acquisition": ""},
                },
            )
            if result.modified_count:
                self.events.emit(
                    "marked_interrupted",
                    "%s; marked the lock interrupted: migration %s is not safe to repeat, so it "
                    "stays stuck for an operator",
                    error,
                    running.get("version"),
                    level=logging.ERROR,
                    holder=seen.owner,
                    running=running,
                    migration_version=running.get("version"),
                    migration_name=running.get("name"),
                    direction=running.get("direction") or "up",
                    silent_s=lease.silent_for,
                    lease_s=lease.lease,
                    db_version=seen.version,
                    stuck=True,
                )
                await self.history.record(_interruption(running, seen, error))


class HeldLock:
    """One acquisition of the lock, bound to its token and acquisition id.

    Every write to the control document is fenced on both. Bookkeeping writes (start,
    advance, release, stick, and history records) are also shielded from cancellation and
    retried on transient errors for at most one lease, each attempt bounded by what is left of
    it; inside a transaction they join it instead. A re-sent write has no further effect: the
    control writes are idempotent under the fence (a release is recognised as already done),
    and a history record keeps the ``_id`` it was first sent with. Once the lock is known lost
    (a fenced write matched nothing, no heartbeat got through for a lease, or a write found no
    server for a lease) every further write is refused before it is sent, history records
    included (those are not fenced by the server, so this rule is what stops them).
    """

    def __init__(self, lock: ControlLock, control: Control) -> None:
        self._lock = lock
        self.events = lock.events
        self.control = control
        self.token = control.token
        self.acquisition = control.acquisition
        self.lost = False
        self.released = False
        # Set once a release or a stick is under way: the lock is being let go on purpose, so
        # no beat is sent any more, and a beat that finds it free is not a lost lock.
        self._letting_go = False
        # Held by a heartbeat in flight and by a transaction for its whole life: a beat landing
        # inside a transaction's snapshot would make the transaction's own write to the control
        # document conflict (WriteConflict), so the two never overlap.
        self._serial = anyio.Lock()
        self._last_contact = time.monotonic()  # when the server last confirmed the lock ours

    @property
    def collection_name(self) -> str:
        """The control document's collection name."""
        return self._lock.collection_name

    async def start(
        self,
        running: dict[str, Any],
        unfinished: dict[str, Any] | None = None,
        *,
        applied: Ledger | None = None,
    ) -> None:
        """Name the migration about to run. Its own write, so that a taker can tell a holder
        that died inside a migration from one that died between two. ``unfinished`` (default:
        ``running``) names it until it completes, whatever happens to the lock meanwhile.
        ``applied``: the ledger as it stands before the run, if it is to be brought up to
        date (see ``ledger.py``)."""
        # `unfinished` outlives `running`: only this step's completion (advance) removes it.
        named = {"running": running, "unfinished": unfinished or running}
        if applied is not None:
            named["applied"] = applied.as_document()
        update = {"$set": named, **_BEAT}
        await self.write(lambda: self._fenced(update, returning=False))

    async def progress(self, done: int, total: int) -> None:
        """Record how far the running migration has got (shown by ``status``)."""
        update = {
            "$set": {"running.progress.done": done, "running.progress.total": total},
            "$inc": {"beats": 1},
            "$currentDate": {"running.progress.at": True, "heartbeat": True},
        }
        self._refuse_if_lost()
        with anyio.fail_after(self._lock.owner.lease):
            await self._fenced(update)

    async def advance(
        self,
        version: int,
        session: Any = None,
        *,
        then: Step | None = None,
        applied: Ledger | None = None,
    ) -> None:
        """Record a finished migration: the version reached and, in the same write, the step
        that runs next (``then``, named as :meth:`start` names it) or none. Naming the next
        step here is what keeps a migration at two commands (its history record and this
        write): from the moment a step's version is recorded, the document names either the
        step about to run or no step at all. Given a session, the write joins its transaction
        (and fences it: a stale holder's transaction matches nothing, and aborts). ``applied``:
        the ledger with the finished migration counted, kept in the same write as the version
        so that the two always agree."""
        update: dict[str, Any]
        reached: dict[str, Any] = {"version": version}
        if applied is not None:
            reached["applied"] = applied.as_document()
        if then is None:
            update = {"$set": reached, "$unset": {"running": "", "unfinished": ""}}
        else:
            named = {"running": then.running(), "unfinished": then.unfinished()}
            update = {"$set": {**reached, **named}}
        update.update(_BEAT)
        await self._bookkeeping(lambda: self._fenced(update, session, returning=False), session)

    async def reached(self, version: int, then: Step | None = None) -> bool:
        """Whether this acquisition's lock shows ``version`` reached and the step ``then``
        named as running (``None``: nothing running), as the :meth:`advance` recording it
        writes: how a transaction whose commit went unanswered is found to have been applied.
        Asked with a fenced beat, not a read: a write sees the primary's latest state (it
        waits behind a commit still in flight), where a majority read might not yet."""
        doc = await self.write(lambda: self._fenced(_BEAT))
        running = None if then is None else then.running()
        return doc is not None and doc.get("version") == version and doc.get("running") == running

    async def release(self, reason: ReleaseReason = "done", *, unname: bool = False) -> None:
        """Unlock at the version reached; ``token`` stays, so that it keeps increasing. A
        re-sent release that finds the lock already released by its first try (whose reply
        was lost) or since acquired by another process is done, not lost. ``reason`` says
        why, in the ``released`` event. ``unname``: the step just named never ran, so its
        ``unfinished`` name goes too (otherwise it outlives the release, by design)."""
        sent = False
        update = _RELEASED_UNNAMED if unname else _RELEASED

        async def release_once() -> dict[str, Any] | None:
            nonlocal sent
            done_if = self._released_since() if sent else None
            sent = True
            return await self._fenced(update, done_if=done_if)

        doc = await self._let_go(release_once)
        self.released = True
        version = doc.get("version") if doc is not None else None
        template, level = _RELEASE_LINES[reason]
        self.events.emit(
            "released",
            template,
            "?" if version is None else version,
            self.token,
            level=level,
            token=self.token,
            reason=reason,
            db_version=version,
        )

    async def stick(self, failure: dict[str, Any]) -> None:
        """Leave the lock held on purpose with the failure recorded, for an operator."""
        update = {
            "$set": {"failure": failure},
            "$unset": {"heartbeat": "", "owner": "", "running": ""},
            # A change every look can see: an operator's unlock or a taker that read the lock
            # before it was stuck must not match it after.
            "$inc": {"beats": 1},
        }
        await self._let_go(lambda: self._fenced(update))

    async def _let_go(self, write: Callable[[], Awaitable[T]]) -> T:
        """A write that ends the holding (release, stick): the heartbeat stops first, and a
        beat already in flight lands before it, so that no beat can find the lock gone by
        this very write, its reply still on the way, and report it lost."""
        self._letting_go = True
        # Shielded as the write itself is: waiting for the beat in flight must not let a
        # cancellation leave the lock held.
        with anyio.CancelScope(shield=True):
            async with self._serial:
                result = await self.write(write)
        return result

    async def record(self, entry: Entry, session: Any = None) -> None:
        """A history record of this holder's work; in the transaction of ``session`` if given.
        The record is built once, so a re-sent insert carries the same ``_id`` and adds
        nothing."""
        history = self._lock.history
        doc = history.document(entry)
        await self._bookkeeping(lambda: history.insert(doc, session), session)

    async def heartbeat(self) -> bool:
        """Refresh the lease; ``False`` once the lock is no longer ours."""
        self._refuse_if_lost()
        async with self._serial:
            if self._letting_go:
                return True  # nothing to keep: it is being let go, on purpose
            return await self._beat()

    async def keep_alive(self, stop: Callable[[], None]) -> None:
        """Beat every lease/3 until cancelled; once the lock may not be ours (a beat found it
        gone, or nothing confirmed it for a whole lease), mark it lost and call ``stop``
        (which cancels the migrations)."""
        lease = self._lock.owner.lease
        while True:
            await anyio.sleep(lease / 3)
            if self._letting_go:
                return
            ours: bool | None = None
            with anyio.move_on_after(max(self._last_contact + lease - time.monotonic(), 0.0)):
                try:
                    ours = await self.heartbeat()
                except LockLost:
                    ours = False
                except Exception as exc:  # keep beating; the lease decides when to give up
                    self.events.emit(
                        "heartbeat_failed",
                        "heartbeat failed: %s",
                        exc,
                        level=logging.WARNING,
                        token=self.token,
                        error=str(exc),
                        error_type=type(exc).__name__,
                    )
            if ours or self._letting_go:
                continue
            if ours is False or time.monotonic() - self._last_contact >= lease:
                self._lose(
                    "a heartbeat found it gone"
                    if ours is False
                    else f"no heartbeat got through for a whole lease ({lease:g} s)"
                )
                stop()
                return

    @asynccontextmanager
    async def transaction_window(self) -> AsyncIterator[None]:
        """Around a transaction that writes the control document: beat just before, and keep
        the heartbeat out meanwhile (its transaction's own fenced write refreshes it)."""
        self._refuse_if_lost()
        async with self._serial:
            ours = await self.write(self._beat)  # transient errors retried within the lease
            if not ours:
                self._lose("the beat before a transaction found it gone")
                raise self.lost_error("before a transaction")
            yield
        self._last_contact = time.monotonic()  # committed: its fenced write beat for us

    def check_in_touch(self, before: str) -> None:
        """Refuse to go on (:class:`LockLost`) once nothing has confirmed the lock ours for a
        whole lease: a waiter may have taken it over meanwhile, this process having been
        paused, say. Asked ``before`` what the server cannot fence, a migration's own writes
        and its history record; the writes to the control document are fenced anyway. (The
        heartbeat gives up at the same point: a lease without a confirmed beat.)"""
        self._refuse_if_lost()
        lease = self._lock.owner.lease
        if time.monotonic() - self._last_contact >= lease:
            self._lose(f"nothing confirmed it for a whole lease ({lease:g} s) {before}")
            raise self.lost_error(before)

    def lost_error(self, during: str) -> LockLost:
        """The error that says this lock was lost ``during`` something."""
        lock = self._lock
        return LockLost(
            token=self.token, collection=lock.collection_name, lease=lock.owner.lease, during=during
        )

    async def write(self, write: Callable[[], Awaitable[T]]) -> T:
        """A bookkeeping write: refused once the lock is lost, shielded from cancellation, and
        retried on transient errors for at most one lease, each attempt bounded by what is left
        of it. After a lease without an answer the lock may have been taken over: the lock is
        then treated as lost, and nothing more is written."""
        self._refuse_if_lost()
        lease = self._lock.owner.lease
        ends = time.monotonic() + lease
        with anyio.CancelScope(shield=True):
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(worth_retrying),
                    wait=self._lock.waiting.write_retry_backoff(),
                    stop=stop_after_delay(lease),
                    reraise=True,
                ):
                    with attempt:
                        # Again before every retry: the heartbeat may have given up meanwhile.
                        self._refuse_if_lost()
                        with anyio.fail_after(max(ends - time.monotonic(), 0.001)):
                            return await write()
            except Exception as exc:
                if not worth_retrying(exc):
                    raise
                self._lose(f"no server answered its write for a whole lease ({lease:g} s)")
                raise DatabaseUnavailable(
                    address=address_of(self._lock.db), seconds=lease, cause=str(exc), holding=True
                ) from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    async def _beat(self) -> bool:
        sent = time.monotonic()
        result = await self._lock.collection.update_one(self._fence(), _BEAT)
        if result.matched_count:
            self._beaten(sent)
        return bool(result.matched_count)

    def _beaten(self, sent: float) -> None:
        """A write that moved ``beats`` landed. Waiters count their lease from when they saw
        it, which is no earlier than when it was sent: so does this holder."""
        self._last_contact = max(self._last_contact, sent)

    async def _bookkeeping(self, write: Callable[[], Awaitable[Any]], session: Any) -> None:
        """Inside a transaction a write joins it: no shield and no retry of its own (the
        transaction commits or aborts as a whole); elsewhere it is a guarded :meth:`write`."""
        if session is None:
            await self.write(write)
        else:
            self._refuse_if_lost()
            await write()

    def _lose(self, how: str) -> None:
        """Mark the lock lost, from where the loss was found; the event fires once."""
        if self.lost:
            return
        self.lost = True
        self.events.emit(
            "lock_lost",
            "lost the migration lock (token %d): %s; stopping without further writes",
            self.token,
            how,
            level=logging.ERROR,
            token=self.token,
            reason=how,
            lease_s=self._lock.owner.lease,
        )

    def _refuse_if_lost(self) -> None:
        if self.lost:
            raise self.lost_error("and refused a further write")

    def _fence(self) -> dict[str, Any]:
        return _fence(self.token, self.acquisition)

    def _released_since(self) -> dict[str, Any]:
        """The control document as it is once this acquisition's release went through: free
        with its token, or since taken with a later one."""
        return {
            "_id": CONTROL_ID,
            "$or": [{"locked": False, "token": self.token}, {"token": {"$gt": self.token}}],
        }

    async def _fenced(
        self,
        update: dict[str, Any],
        session: Any = None,
        *,
        done_if: dict[str, Any] | None = None,
        returning: bool = True,
    ) -> dict[str, Any] | None:
        """The control document after ``update``, applied only while the lock is this
        acquisition's (an empty one unless ``returning``: the writes on the way through the
        migrations need no reply but the match, and a plain update costs the server less);
        ``None`` when ``done_if`` shows an earlier try already did it."""
        collection = self._lock.collection
        sent = time.monotonic()
        doc: Any
        if returning:
            doc = await collection.find_one_and_update(
                self._fence(), update, return_document=ReturnDocument.AFTER, session=session
            )
        else:
            result = await collection.update_one(self._fence(), update, session=session)
            doc = {} if result.matched_count else None
        if doc is not None:
            if session is None and "beats" in update.get("$inc", {}):
                self._beaten(sent)
            return dict(doc)
        if done_if is not None and await collection.find_one(done_if, {"_id": 1}) is not None:
            return None  # an earlier try went through; only its reply was lost
        self._lose("its next write found the lock gone")
        raise self.lost_error("when its next write found the lock gone")


def worth_retrying(exc: BaseException) -> bool:
    """Errors after which the same write may simply be sent again: no answer within its bound,
    or one the driver classes as transient (a lost connection, no primary, a majority that did
    not confirm in time: the write may stand, and sending it again is harmless)."""
    return isinstance(exc, TimeoutError) or is_transient(exc)


def describe_lock(control: Control, lease: Lease) -> str:
    """How a lock looked, in a few words, for what ``unlock`` reports it changed."""
    if control.failure:
        kind = control.failure.get("kind", "failed")
        direction = control.failure.get("direction") or "up"
        during = "" if direction == "up" else f" during its `{direction}`"
        name = f" {control.failure['name']}" if control.failure.get("name") else ""
        return (
            f"stuck at version {control.version}: migration {control.failure.get('version')}"
            f"{name} {kind}{during}"
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


ReleaseReason = Literal["done", "cancelled", "interrupted", "rerun_already_done", "error"]

# The `released` event's line and level, by why the lock was released: the end of a run is
# said by `migrations_done`, so its release is a DEBUG line; a cancellation is worth a warning.
_RELEASE_LINES: dict[ReleaseReason, tuple[str, int]] = {
    "done": ("released the migration lock at version %s (token %d)", logging.DEBUG),
    "cancelled": (
        "asked to stop between migrations: released the lock at version %s (token %d)",
        logging.WARNING,
    ),
    "interrupted": (
        "released the lock at version %s (token %d) for the migration to be run again",
        logging.WARNING,
    ),
    "rerun_already_done": (
        "released the migration lock at version %s (token %d) untouched: the rerun was "
        "already done",
        logging.INFO,
    ),
    "error": (
        "released the migration lock at version %s (token %d) unused, after an error",
        logging.WARNING,
    ),
}

# Unlocked at the version reached; the holder's fields go, `token` stays so it keeps growing.
# `unfinished` stays too: a step that did not complete is still unfinished after a release.
_RELEASED = {"$set": {"locked": False}, "$unset": {name: "" for name in HELD_FIELDS}}
_RELEASED_UNNAMED = {
    "$set": {"locked": False},
    "$unset": {**{name: "" for name in HELD_FIELDS}, "unfinished": ""},
}

# What every write that proves the holder alive adds: waiters judge liveness by `beats` alone.
_BEAT: dict[str, Any] = {"$inc": {"beats": 1}, "$currentDate": {"heartbeat": True}}


def _ledger_after(seen: Control, step: dict[str, Any]) -> dict[str, Any]:
    """The ``$set`` of the ledger once the step ``step`` of ``seen`` has finished (nothing for
    a document that keeps no ledger)."""
    ledger = seen.ledger_after(step)
    return {} if ledger is None else {"applied": ledger.as_document()}


def _fence(token: int, acquisition: str | None) -> dict[str, Any]:
    """A filter matching the control document only while this acquisition holds the lock.
    The token alone is not enough: an acquire rolled back at a failover can leave the same
    token number to be handed to another process; its acquisition id is its own."""
    return {"_id": CONTROL_ID, "locked": True, "token": token, "acquisition": acquisition}


def _taken_by(owner: Owner) -> dict[str, Any]:
    """The update that makes ``owner`` the holder: a new token, a fresh heartbeat (on the
    server's clock) and beat counter."""
    return {
        "$set": {
            "locked": True,
            "owner": owner.as_document(),
            "beats": 0,
            "acquisition": uuid.uuid4().hex,
        },
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
        "acquisition": seen.acquisition,  # None matches a lock from before acquisition ids
        "beats": seen.beats,
        "failure": None,
        # An operator's `skip` meanwhile moves only the ledger: what was planned is stale.
        "applied": seen.raw.get("applied"),
    }


def _failed_as(seen: Control) -> dict[str, Any]:
    """A filter matching a lock stuck by a failure only as ``seen`` (same token, same build)."""
    return {
        "_id": CONTROL_ID,
        "locked": True,
        "token": seen.token,
        "failure.kind": "failed",
        "failure.build": (seen.failure or {}).get("build"),
        "applied": seen.raw.get("applied"),
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
        "acquisition": seen.raw.get("acquisition"),
        "running": seen.raw.get("running"),
        "failure": seen.raw.get("failure"),
        "applied": seen.raw.get("applied"),
    }
