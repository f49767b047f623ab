"""``migrate()``: settle the options, read, plan, then wait or act; ``apply.py`` applies.

The policy of one call lives here (what the plan is, whether to wait, acquire, take over or
fail fast); how the lock does each of those is ``lock.py``'s, and how waiting paces itself is
``waiting.py``'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from logging import DEBUG, ERROR, WARNING
from typing import Any, Literal, NoReturn

import anyio
from pymongo.errors import ConnectionFailure, PyMongoError

from .apply import Applier
from .cancellation import in_child_task
from .checksums import find_drift
from .control import Control, Owner
from .driver_errors import TryAgain, database_error, describe, is_transient, sorted_errors
from .drivers import address_of, detect_driver
from .envvar import ENV_VAR, parse_version_request
from .errors import (
    ControlLocked,
    DatabaseAhead,
    DatabaseError,
    DatabaseUnavailable,
    InvalidMigrations,
    InvalidTarget,
    MigrationFailed,
    NotMigrated,
    OutOfOrder,
    ahead_text,
)
from .events import Emitter, Hook
from .history import Entry, presumed_entry
from .ledger import Ledger, Survey
from .lock import ControlLock, HeldLock, LockBusy
from .migrations import Catalog, Migration, MigrationSource, catalog, floor_in_force
from .plan import Plan, Route, Target, resolve_target, route_for
from .report import MigrationReport
from .servers import Server, detect_server, prepare_transactions, refuse_unsafe_lock
from .settings import Settings
from .waiting import Deadline, Waiter


async def migrate(
    db: Any,
    migrations: MigrationSource,
    *,
    target: Target = "latest",
    collection: str = "migrations",
    history_collection: str | None = None,
    build: str | None = None,
    wait_timeout: float = 300.0,
    lease: float = 30.0,
    fresh: Literal["run", "skip"] = "run",
    on_ahead: Literal["warn", "error"] = "warn",
    floor: int | None = None,
    floor_release: str | None = None,
    rerun: int | None = None,
    max_poll_interval: float = 2.0,
    migration_timeout: float | None = None,
    validate: bool = False,
    retry_failed_on_new_build: bool = False,
    shutdown_grace: float = 20.0,
    apply: bool = True,
    on_event: Hook | Sequence[Hook] | None = None,
    allow_out_of_order: bool = False,
) -> MigrationReport:
    """Bring the database to ``target``, with exactly one replica applying migrations.

    Awaited in a service's startup by every replica: the one that takes the control lock
    applies the pending migrations; the others wait until it is done. Returns after one
    read when nothing is pending. Raises a :class:`~bootmigrate.MigrationError` the
    service should not boot past (``bootmigrate.errors`` lists them).

    ``db``: a PyMongo async (``AsyncMongoClient()[name]``) or motor database.
    ``migrations``: a directory, a dotted package name, or ``Migration`` objects; versions
    come from the file names, and a module is imported only when its step is to run.
    ``target``: ``"latest"``, or a version (lower than the database's: run ``down`` steps).
    ``collection`` holds the control document; ``history_collection`` the history
    (default ``<collection>_history``). ``build`` names this build on the lock (default: env
    ``BOOTMIGRATE_BUILD``). ``wait_timeout``: seconds to wait for another replica's lock or
    an unreachable server. ``lease``: seconds the holder may go without a heartbeat before a
    waiter presumes it dead and takes over. ``fresh="skip"``: a database with no control
    document is recorded as up to date without running anything. ``on_ahead``: a database
    newer than this build ``"warn"``s and boots, or ``"error"`` refuses (``DatabaseAhead``).
    ``floor`` is the oldest database version this build upgrades from (default: ``FLOOR``
    in the migrations package, else the version just before its oldest migration);
    ``floor_release`` (default ``FLOOR_RELEASE``) names the release to upgrade through
    when the database is older. ``rerun=N`` runs migration ``N``'s ``up`` again under the
    lock without changing the version. ``max_poll_interval``: the longest nap between two
    looks at a held lock. ``migration_timeout`` bounds each migration (a module's own
    ``timeout`` wins); one that runs over fails like one that raised. ``validate=True``
    first refuses (``InvalidMigrations``, nothing written) if an applied migration's code
    changed or disappeared since it ran. ``retry_failed_on_new_build=True`` lets a build
    other than the one a migration failed on take the stuck lock and retry it (never an
    interrupted one, never a live lock). ``allow_out_of_order=True`` runs a known migration
    below the database's version that was never applied nor skipped (merged after a higher
    one ran) once, first; without it such a migration is refused
    (:class:`~bootmigrate.OutOfOrder`, nothing written). ``shutdown_grace``: once the call is
    cancelled (a SIGTERM), how long a migration already running may go on to finish before it
    is cancelled and recorded; waiting, and the time between two migrations, end at once.
    ``apply=False``: wait only (never take the lock, never write) until another process
    brought the database to ``target``; a stuck lock fails fast, and if nothing migrated it
    within ``wait_timeout`` the call raises :class:`~bootmigrate.NotMigrated`. ``on_event``:
    a callable taking each :class:`~bootmigrate.events.Event` of this call (or a sequence of
    them), called synchronously; one that raises is logged and ignored (docs/events.md lists
    them).

    When neither ``target`` nor ``rerun`` is given, ``MIGRATION_VERSION`` in the environment
    is honoured as Rocket.Chat reads it; ``N,exit`` sets ``exit_requested`` on the report so
    the caller can exit once migrated. Options are checked before anything runs
    (``TypeError``/``ValueError``); :class:`~bootmigrate.Settings` documents each one.
    """
    settings = Settings(
        target=target,
        collection=collection,
        history_collection=history_collection,
        build=build,
        wait_timeout=wait_timeout,
        lease=lease,
        fresh=fresh,
        on_ahead=on_ahead,
        floor=floor,
        floor_release=floor_release,
        rerun=rerun,
        max_poll_interval=max_poll_interval,
        migration_timeout=migration_timeout,
        validate=validate,
        retry_failed_on_new_build=retry_failed_on_new_build,
        shutdown_grace=shutdown_grace,
        apply=apply,
        on_event=on_event,
        allow_out_of_order=allow_out_of_order,
    )
    return await migrate_with(db, migrations, settings)


async def migrate_with(
    db: Any, migrations: MigrationSource, settings: Settings, *, explicit_rerun: bool = False
) -> MigrationReport:
    """:func:`migrate` with its options in one :class:`Settings` (the CLI and the
    integrations call this).

    A rerun asked for at boot (``rerun=N`` or ``MIGRATION_VERSION=N,rerun``) runs once per
    build: a replica that finds it already done by this build does nothing.
    ``explicit_rerun=True`` is an operator's own command (``bootmigrate rerun N``): it always
    runs.

    The call's first event is ``started`` and its last ``done``, ``failed`` or
    ``cancelled``, whatever happens in between."""
    owner = Owner.this_process(settings.build, settings.lease)
    events = Emitter(owner.id, settings.hooks)
    began = time.monotonic()
    events.emit(
        "started", "migrate() started (build %s)", owner.build, level=DEBUG, build=owner.build
    )
    try:
        detect_driver(db)
        report = await in_child_task(
            lambda: _migrate(db, migrations, settings, owner, events, explicit_rerun=explicit_rerun)
        )
    except Exception as exc:
        reason = getattr(exc, "reason", None)
        events.emit(
            "failed",
            "migrate() failed: %s: %s",
            type(exc).__name__,
            exc,
            level=ERROR,
            error=str(exc),
            error_type=type(exc).__name__,
            reason=reason if isinstance(reason, str) else None,
            stuck=events.left_stuck
            or isinstance(exc, MigrationFailed)
            # An unfinished down or rerun blocks every boot until an operator acts, as a
            # stuck lock does.
            or reason in ("stuck", "interrupted", "unfinished"),
            waited_s=events.waited(),
            duration_s=time.monotonic() - began,
        )
        raise
    except BaseException:
        events.emit(
            "cancelled",
            "migrate() cancelled after %.1f s",
            time.monotonic() - began,
            level=WARNING,
            stuck=events.left_stuck,
            waited_s=events.waited(),
            duration_s=time.monotonic() - began,
        )
        raise
    events.emit(
        "done",
        "migrate() done: version %d -> %d in %.3f s",
        report.from_version,
        report.to_version,
        time.monotonic() - began,
        level=DEBUG,
        from_version=report.from_version,
        db_version=report.to_version,
        applied=tuple(report.applied),
        reverted=tuple(report.reverted),
        held=report.holder,
        waited_s=report.waited,
        duration_s=time.monotonic() - began,
    )
    return report


async def _migrate(
    db: Any,
    migrations: MigrationSource,
    settings: Settings,
    owner: Owner,
    events: Emitter,
    *,
    explicit_rerun: bool,
) -> MigrationReport:
    raw_request = os.environ.get(ENV_VAR)
    request = None
    if settings.target == "latest" and settings.rerun is None:
        request = parse_version_request(raw_request)
    # Versions and names from the file names: no migration module is imported until a step
    # that will run needs it.
    known = catalog(migrations)
    if request is not None and request.rerun is not None and not settings.apply:
        # The environment a Job and its wait-only app pods share: the rerun is the Job's.
        events.emit(
            "rerun_left_to_migrator",
            "%s=%r asks for a rerun, which the process that migrates carries out; this "
            "wait-only call (apply=False) waits for the database as usual",
            ENV_VAR,
            raw_request,
            migration_version=request.rerun,
        )
        request = replace(request, rerun=None)
    if request is not None:
        try:
            resolve_target(request.rerun if request.rerun is not None else request.target, known)
            settings = settings.updated(target=request.target, rerun=request.rerun)
        except InvalidTarget as exc:
            raise InvalidTarget(f"{ENV_VAR}={raw_request!r}: {exc}") from None
    floor, release = floor_in_force(migrations, settings.floor, settings.floor_release)
    settings = settings.updated(floor=floor, floor_release=release)
    lock = ControlLock(
        db,
        collection=settings.collection,
        history=settings.history_name,
        owner=owner,
        waiting=settings.waiting,
        events=events,
    )
    # One deadline for the whole call, the drift check included.
    deadline = Deadline.after(settings.wait_timeout)
    if settings.validate:
        await _refuse_drift(lock, known.load_all(), deadline)
    report = await Runner(db, known, settings, lock, rerun_once=not explicit_rerun).run(deadline)
    if request is not None and request.exit:
        report = replace(report, exit_requested=True)
    return report


async def _refuse_drift(lock: ControlLock, known: list[Migration], deadline: Deadline) -> None:
    operation = "compare the applied migrations with their history (validate=True)"
    try:
        with deadline.bound(), sorted_errors(operation):
            version = (await lock.read()).version
            drift = await find_drift(lock.history.collection, known, version)
    except (TryAgain, TimeoutError) as exc:
        raise DatabaseUnavailable(
            address=address_of(lock.db),
            seconds=deadline.seconds,
            cause=f"{operation}: {exc}",
            holding=False,
        ) from exc
    if drift:
        raise InvalidMigrations(
            "applied migrations differ from the ones that ran: "
            + "; ".join(d.describe() for d in drift)
            + ". A migration that ran never runs again: restore its code and put the change "
            "in a new migration (`bootmigrate validate` lists them)."
        )


HOLDER_WRITES = "record progress on the control document and in history, holding the lock"

# Writes on the lock that matched nothing while the document stayed exactly as tried, in a row
# and over at least this long, before the collection is declared unwritable: a read from a
# majority snapshot may lag a winner's write for a moment, never for a second on a healthy
# deployment.
UNMATCHED_LIMIT = 2
UNMATCHED_SECONDS = 1.0


class LookPacer:
    """Paces one call's looks at the control document, whatever wakes them (a nap's end, a
    change-stream event, an error answered at once, the Waiter's naps cut to nothing at its
    deadline): ``rate`` a second on average, ``burst`` at once. A look is a read and, with the
    lock held, a ``hello`` (or with it free, a write), so two a second with bursts of three
    keep a call to about ten commands in any second; the burst lets a holder's last writes
    (advance, release) reach a waiter at once."""

    def __init__(self, rate: float = 2.0, burst: int = 3) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    async def next_look(self, deadline: Deadline) -> None:
        """Return when the next look may go. Near or past the deadline a pause is cut to a
        tenth of a second, so the call still ends on time."""
        self._refill()
        if self._tokens < 1:
            pause = (1 - self._tokens) / self._rate
            await anyio.sleep(min(pause, max(deadline.remaining(), 0.1)))
            self._refill()
        self._tokens -= 1

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now


@dataclass(frozen=True)
class _Unmatched:
    """Writes on the lock that matched nothing while the document stayed ``seen``: how many,
    since when."""

    seen: Control
    count: int
    since: float


class _Missed(Exception):
    """A write on the lock matched nothing (``tried``: the document it was made on); the next
    look reads again, after a nap."""

    def __init__(self, tried: Control) -> None:
        super().__init__(
            "the lock's write matched nothing (another process got there first, or the "
            "collection takes no writes)"
        )
        self.tried = tried


class _NotYet(Exception):
    """Wait-only: the database is not yet where this build needs it; look again after a nap."""

    def __init__(self, control: Control, wanted: int) -> None:
        super().__init__(f"the database is at version {control.version}, waiting for {wanted}")
        self.control = control
        self.wanted = wanted


@dataclass(frozen=True)
class _Held:
    """The lock is ours, and this is what to run under it."""

    lock: HeldLock
    plan: Plan
    #: The ledger as it stands before the plan runs, and the record of versions taken as
    #: done to write first (see ``ledger.py``).
    ledger: Ledger
    presumed: Entry | None = None


class Runner:
    """One call's policy: from each reading of the control document, finish, wait or act."""

    def __init__(
        self,
        db: Any,
        known: Catalog,
        settings: Settings,
        lock: ControlLock,
        *,
        rerun_once: bool = True,
    ) -> None:
        self.db = db
        # A rerun asked for at boot runs once per build, not once per replica.
        self.rerun_once = rerun_once and settings.rerun is not None
        self.known = known
        # Looking a migration up imports its module: only a takeover that must know whether
        # the dead holder's migration is safe to repeat does.
        self.by_version: Mapping[int, Migration] = known
        self.settings = settings
        self.lock = lock
        self._server: Server | None = None
        self._transactions_checked = False
        self._first_seen: Control | None = None
        self._last_seen: Control | None = None
        self._busy_since: float | None = None
        self._pacer = LookPacer()
        self._tried: Control | None = None  # the document of the last write that missed
        self._unmatched: _Unmatched | None = None
        self._taken: HeldLock | None = None  # taken, and not yet handed to the apply loop
        self._surveys: dict[tuple[int, Ledger | None], Survey] = {}
        self.events = lock.events

    async def run(self, deadline: Deadline | None = None) -> MigrationReport:
        """Until there is nothing to do (a report) or the lock is ours (then apply), within
        ``deadline`` (default: ``wait_timeout`` from now)."""
        deadline = deadline or Deadline.after(self.settings.wait_timeout)
        waiter = Waiter(
            self.settings.waiting,
            deadline,
            self.lock.collection,
            again=(LockBusy, ConnectionFailure, TryAgain, _Missed, _NotYet),
            before_nap=self._before_nap,
        )
        try:
            settled = await self._settle(waiter, deadline)
        except _Missed as exc:
            if self._unmatched is not None:  # the deadline came before it could be confirmed
                raise self._not_writable(self._unmatched.count) from None
            self._give_up(exc)
        except TimeoutError:
            # The deadline cut a read short (anyio's TimeoutError says nothing of its own).
            self._give_up(TimeoutError("no answer before the deadline"))
        except (LockBusy, ConnectionFailure, TryAgain, _NotYet) as exc:
            self._give_up(exc)
        if isinstance(settled, MigrationReport):
            return settled
        self._taken = None  # the apply loop owns it from here, and releases it
        applier = Applier(
            self.db,
            settled.lock,
            self.lock.owner,
            self.settings.migration_timeout,
            self.settings.shutdown_grace,
            ledger=settled.ledger,
            presumed=settled.presumed,
        )
        try:
            return await applier.apply(settled.plan, self._waited())
        # A bookkeeping write the held lock did not retry (permanent), or gave up on.
        except PyMongoError as exc:
            if not is_transient(exc):
                raise database_error(HOLDER_WRITES, exc) from exc
            raise DatabaseUnavailable(
                address=address_of(self.db),
                seconds=self.settings.lease,
                cause=f"{HOLDER_WRITES}: {describe(exc)}",
                holding=True,
            ) from exc

    async def _settle(self, waiter: Waiter, deadline: Deadline) -> MigrationReport | _Held:
        try:
            return await waiter.until_settled(lambda: self._attempt(deadline))
        except BaseException:
            # A lock taken by the last attempt, then a cancellation on the way out of the
            # Waiter (whose task group checkpoints as it closes), before the apply loop owns
            # it: never leave it held and unused, for every replica to wait out its lease.
            taken, self._taken = self._taken, None
            if taken is not None:
                await taken.release("cancelled")
            raise

    async def _attempt(self, deadline: Deadline) -> MigrationReport | _Held:
        """One look at the control document and, if there is work, one try at the lock.

        A try that matched nothing (another replica got there first) goes back to the Waiter,
        which naps before the next look, as for a busy lock or a transient error; and looks
        are paced, so however the server answers, a call sends about ten commands a second
        at most."""
        await self._pacer.next_look(deadline)
        with sorted_errors("read the control document"):
            control = await self._read(deadline)
        self._check_writable(control)
        # Decided from the versions alone: nothing is imported unless a step is to run here.
        route = self._route(control)
        route = await self._with_missing(control, route, deadline)
        if not route.moves:
            # A lock abandoned after its last migration is left alone here: telling a dead
            # holder from a live one takes watching it for a lease, which an up-to-date boot
            # must not pay. The next boot with work to do takes it over.
            adopted = self.lock.adopt(control)
            if adopted is not None:
                # Except one of our own: a takeover whose reply was lost, which went through
                # and recorded the version of a step its dead holder had finished, leaving
                # nothing to do. Held by nobody alive: free it.
                await adopted.release("done")
            return self._nothing_to_do(control, route)
        if not self.settings.apply:
            self._wait_only(control, route)
        if not control.exists and self.settings.fresh == "skip" and self.settings.rerun is None:
            with sorted_errors("create the control document (fresh='skip')"):
                skipped = [v for v in self.known.versions if v <= route.to_version]
                created = await self.lock.skip_fresh(route.to_version, skipped, deadline)
            if created:
                self.events.emit(
                    "fresh_skipped",
                    "fresh database: set to version %d without running migrations",
                    route.to_version,
                    db_version=route.to_version,
                )
                return MigrationReport(from_version=0, to_version=route.to_version)
        else:
            if self.rerun_once and not control.locked:
                with sorted_errors("read the history for the requested rerun"):
                    done = await self._rerun_done(deadline)
                if done is not None:
                    return done
            # The steps' modules are imported here, so a bad one that would run is refused
            # (InvalidMigrations) before the lock is taken and anything is written.
            plan = route.plan(self.known)
            with sorted_errors("take the migration lock"):
                held = await self._take(control, plan, deadline)
            if held is not None:
                try:
                    with sorted_errors("read the history to bring the ledger up to date"):
                        ledger, presumed = await self._ledger_to_keep(control, held, deadline)
                    if (held.control.version, held.control.ledger) != (
                        control.version,
                        control.ledger,
                    ):
                        # A takeover that recorded the version of a step its dead holder had
                        # finished: what is left to run is planned from there.
                        plan = self._plan(held.control)
                        await self._check_server(plan, deadline)
                    self._acquired(held, plan)
                    # Again under the lock: another replica may have run it since the look.
                    with sorted_errors("read the history for the requested rerun"):
                        done = await self._rerun_done(deadline) if self.rerun_once else None
                except BaseException:
                    await held.release("error")  # never leave a lock taken and unused
                    raise
                if done is not None:
                    await held.release("rerun_already_done")
                    return replace(done, holder=True)
                self._taken = held
                return _Held(held, self._plan(held.control), ledger, presumed)
        self._tried = control
        raise _Missed(control)

    def _acquired(self, held: HeldLock, plan: Plan) -> None:
        self.events.emit(
            "acquired",
            "took the migration lock (token %d): %d migration(s) to run, version %d -> %d",
            held.token,
            len(plan.steps),
            plan.from_version,
            plan.to_version,
            token=held.token,
            db_version=plan.from_version,
            target_version=plan.to_version,
            waited_s=self._waited(),
            holder=self.lock.owner.as_document(),
        )

    def _wait_only(self, control: Control, plan: Route) -> NoReturn:
        """A wait-only call (``apply=False``) with work left: fail fast on a stuck lock (only
        an operator can clear it), else wait for whoever migrates."""
        if control.stuck:
            raise ControlLocked("stuck", control, collection=self.lock.collection_name)
        raise _NotYet(control, plan.to_version)

    def _check_writable(self, control: Control) -> None:
        """After a write that matched nothing, the next reading tells why: another process
        got there first and changed the document (every acquisition increments ``token``),
        or the document is exactly as tried and the write went nowhere. Repeatedly so, for
        a second, means the collection does not take writes."""
        tried, self._tried = self._tried, None
        if tried is None:
            return
        if (control.exists, control.raw) != (tried.exists, tried.raw):
            self._unmatched = None
            return
        previous = self._unmatched
        if previous is None or previous.seen != control:
            previous = _Unmatched(control, 0, time.monotonic())
        self._unmatched = unmatched = replace(previous, count=previous.count + 1)
        lasted = time.monotonic() - unmatched.since
        if unmatched.count >= UNMATCHED_LIMIT and lasted >= UNMATCHED_SECONDS:
            raise self._not_writable(unmatched.count)

    def _not_writable(self, misses: int) -> DatabaseError:
        name = self.lock.collection_name
        return DatabaseError(
            operation=f"take the migration lock in collection {name!r}",
            code=None,
            detail=(
                f"the server accepted the lock's compare-and-swap writes but matched nothing, "
                f"{misses} time(s) in a row, while the control "
                "document stayed exactly as read (a write lost to another process would have "
                "changed it)"
            ),
            fix=(
                f"The collection does not take writes: is {name!r} a view "
                f'(db.getCollectionInfos({{name: "{name}"}}))? Does this server support '
                "findAndModify? Point `collection` at a plain collection, or use a server that "
                "supports findAndModify; nothing was written."
            ),
        )

    async def _take(self, control: Control, plan: Plan, deadline: Deadline) -> HeldLock | None:
        """The lock, if this process may have it now; ``None`` to read again.

        A step that did not finish (a failed, interrupted or released ``down``, ``rerun`` or
        ``up``) is never stepped over: only a plan that starts with that step, in its
        direction, may take the lock; any other fails fast."""
        if control.stuck:
            if not (
                self._may_retry(control, plan) and not await self._failed_here(control, deadline)
            ):
                raise ControlLocked("stuck", control, collection=self.lock.collection_name)
            await self._check_server(plan, deadline)
            return await self._retry_failed(control, deadline)
        if not control.locked:
            unfinished = control.unfinished_step
            if unfinished is not None and not plan.resumes(unfinished):
                raise ControlLocked(
                    "unfinished",
                    control,
                    collection=self.lock.collection_name,
                    action=plan.describe(),
                )
            await self._check_server(plan, deadline)
            return await self.lock.acquire(control, deadline)
        adopted = self.lock.adopt(control)
        if adopted is not None:
            return adopted
        if self.lock.presumed_dead(control) is not None:
            # Asked once the holder looks dead, before the takeover, as before an acquire: a
            # waiter does not pay it on every look, and a new holder does not spend its lease
            # on it with no heartbeat running.
            await self._check_server(plan, deadline)
        return await self.lock.take_over(control, self.by_version, deadline, plan)

    async def _read(self, deadline: Deadline) -> Control:
        # Reads are bounded by the deadline; the driver's own server selection may be longer.
        with deadline.bound():
            control = await self.lock.read()
        self._last_seen = control
        if self._first_seen is None:
            self._first_seen = control
        return control

    def _route(self, control: Control) -> Route:
        return route_for(
            control,
            self.known,
            target=self.settings.target,
            floor=self.settings.floor,
            rerun=self.settings.rerun,
            floor_release=self.settings.floor_release,
        )

    def _plan(self, control: Control) -> Plan:
        route = self._route(control)
        found = self._surveys.get((control.version, control.ledger))
        if found is not None and self.settings.allow_out_of_order:
            route = route.with_missing(found.missing)
        return route.plan(self.known)

    async def _with_missing(self, control: Control, route: Route, deadline: Deadline) -> Route:
        """``route``, refused if known migrations below the database's version were never
        applied nor skipped (:class:`OutOfOrder`), or with them run first if the call allows
        it. Costs nothing while the ledger agrees with the file names. Else the history is
        read, and an up-to-date call that finds nothing missing brings the ledger up to date
        (a database from before the ledger, a build that dropped old files, a version set
        by hand), so that the next boot is one read again."""
        if not control.exists or control.version > self.known.latest:
            return route  # nothing applied yet, or an older build: nothing it could miss
        ledger = control.ledger
        if ledger is not None and ledger.agrees(self.known.versions, control.version):
            return route
        with sorted_errors("read the history for migrations never applied"):
            found = await self._survey(control, deadline)
        if not found.missing:
            # Not a wait-only call: it never writes.
            if not route.moves and not control.locked and self.settings.apply:
                with sorted_errors("bring the ledger of applied migrations up to date"):
                    await self._keep(control, found, deadline)
            return route
        if not self.settings.allow_out_of_order:
            self._refuse_missing(control, found)
        self.events.emit(
            "out_of_order",
            "migration(s) %s below the database's version %d were never applied: running "
            "them first, out of order (allow_out_of_order)",
            ", ".join(str(v) for v in found.missing),
            control.version,
            level=WARNING,
            db_version=control.version,
            applied=found.missing,
        )
        return route.with_missing(found.missing)

    def _refuse_missing(self, control: Control, found: Survey) -> NoReturn:
        """Refuse a database with migrations missing below its version. A lock in the way is
        said first: one stuck (by such a migration, perhaps) or an unfinished step only an
        operator settles; a live holder may be running them, so wait for it."""
        name = self.lock.collection_name
        if control.stuck:
            raise ControlLocked("stuck", control, collection=name)
        if control.locked and self.lock.presumed_dead(control) is None:
            raise LockBusy(control)  # its holder may be running them: see it finish
        # A dead holder's lock is not this call's to take: it would not run them anyway.
        unfinished = control.unfinished_step
        if unfinished is not None and unfinished.get("version") in found.missing:
            action = "boot without running it"
            raise ControlLocked("unfinished", control, collection=name, action=action)
        raise self._out_of_order(control, found)

    def _out_of_order(self, control: Control, found: Survey) -> OutOfOrder:
        where = {v: self._where(v) for v in found.missing}
        return OutOfOrder(missing=where, db_version=control.version)

    async def _keep(self, control: Control, found: Survey, deadline: Deadline) -> None:
        """Write the ledger ``found`` says, if the document is still as ``control`` (the
        versions it presumes done recorded first, once however many replicas do this)."""
        if found.ledger == control.ledger:
            return
        with deadline.bound():
            written = await self.lock.keep_ledger(control, found)
        if written:
            self.events.emit(
                "ledger_updated",
                "brought the ledger of applied migrations up to date from the history "
                "(version %d, %d applied or skipped)%s",
                control.version,
                found.ledger.count,
                f"; taken as done without a record: {list(found.presumed)} ({found.why})"
                if found.presumed
                else "",
                db_version=control.version,
                applied=found.presumed or None,
                reason=found.why,
            )

    async def _survey(self, control: Control, deadline: Deadline) -> Survey:
        """What the history says of this build's versions at or below ``control``'s; read
        once per version and ledger seen."""
        key = (control.version, control.ledger)
        found = self._surveys.get(key)
        if found is None:
            with deadline.bound():
                found = await self.lock.survey_history(control, self.known.versions)
            self._surveys[key] = found
        return found

    async def _ledger_to_keep(
        self, looked: Control, held: HeldLock, deadline: Deadline
    ) -> tuple[Ledger, Entry | None]:
        """The ledger the lock ``held`` starts its run with, brought up to date from the
        history if it is missing, disagrees with the file names or lags a version set by
        hand (or by a bootmigrate that keeps none); and the record of the versions that takes
        as done, if any."""
        control = held.control
        if not looked.exists:
            return Ledger(since=0, upto=control.version), None
        ledger = control.ledger
        if ledger is not None and ledger.agrees(self.known.versions, control.version):
            return ledger, None
        found = await self._survey(control, deadline)
        if found.missing and not self.settings.allow_out_of_order:
            raise self._out_of_order(control, found)
        return found.ledger, presumed_entry(found, control, held.token)

    def _where(self, version: int) -> str:
        """Where migration ``version`` comes from, for a message."""
        try:
            return self.known.origin(version)
        except KeyError:
            return "defined in code"

    def _nothing_to_do(self, control: Control, plan: Route) -> MigrationReport:
        if plan.ahead:
            latest = self.known.latest
            if self.settings.on_ahead == "error":
                raise DatabaseAhead(db_version=control.version, latest=latest, wanted=None)
            self.events.emit(
                "database_ahead",
                "the database is at version %d, %s Booting anyway (on_ahead='warn').",
                control.version,
                ahead_text(latest),
                level=WARNING,
                db_version=control.version,
                target_version=latest,
            )
        if self._busy_since is not None:
            self.events.emit(
                "wait_done",
                "database reached version %d after waiting %.1f s; done",
                control.version,
                self._waited(),
                db_version=control.version,
                waited_s=self._waited(),
            )
        else:
            self.events.emit(
                "up_to_date",
                "database at version %d: nothing to migrate",
                control.version,
                db_version=control.version,
            )
        first = self._first_seen or control
        return MigrationReport(
            from_version=first.version,
            to_version=control.version,
            waited=self._waited(),
            ahead=plan.ahead,
        )

    async def _check_server(self, plan: Plan, deadline: Deadline) -> None:
        """Before taking the lock (never on the up-to-date path): find out once per call what
        the server is, and refuse one where the lock cannot be safe, or transactional
        migrations it cannot run in a transaction, rather than run them without one."""
        wanted = [s.migration.label() for s in plan.steps if s.migration.transactional]
        with deadline.bound():
            if self._server is None:
                self._server = await detect_server(self.db, self.events)
                refuse_unsafe_lock(self._server)
            if wanted and not self._transactions_checked:
                await prepare_transactions(
                    self.db,
                    self._server,
                    wanted,
                    control=self.lock.collection,
                    history=self.lock.history,
                )
                self._transactions_checked = True

    def _may_retry(self, control: Control, plan: Plan) -> bool:
        """A lock stuck by a failure is retried only when the operator opted in, this is a
        different build (the fix, presumably), and this call's plan starts with the failed
        step in its direction; never an interrupted one, never the same build, and never a
        live lock."""
        failure = control.failure or {}
        return bool(
            self.settings.retry_failed_on_new_build
            and failure.get("kind") == "failed"
            and self.lock.owner.build
            and failure.get("build") != self.lock.owner.build
            and plan.resumes(failure)
        )

    async def _failed_here(self, control: Control, deadline: Deadline) -> bool:
        """Whether this build already failed the step the lock is stuck on: then it is not
        the fix, and does not retry (in a rolling deploy, old and new builds would otherwise
        take turns). Read from history, only when a retry is being considered."""
        failure = control.failure or {}
        with deadline.bound():
            found = await self.lock.history.collection.find_one(
                {
                    "version": failure.get("version"),
                    "direction": failure.get("direction") or "up",
                    "outcome": "failed",
                    "build": self.lock.owner.build,
                },
                {"_id": 1},
            )
        if found is not None:
            self.events.emit(
                "retry_declined",
                "build %s already failed migration %s: not retrying it "
                "(retry_failed_on_new_build is for a build that may fix it)",
                self.lock.owner.build,
                failure.get("version"),
                build=self.lock.owner.build,
                migration_version=failure.get("version"),
                db_version=control.version,
            )
        return found is not None

    async def _rerun_done(self, deadline: Deadline) -> MigrationReport | None:
        """A report that does nothing, if this build's rerun request was already carried out
        (a history record of that rerun, applied by this build); ``None`` to run it."""
        version, build = self.settings.rerun, self.lock.owner.build
        with deadline.bound():
            done = await self.lock.history.collection.find_one(
                {"version": version, "direction": "rerun", "outcome": "applied", "build": build},
                sort=[("finished_at", -1)],
            )
        if done is None:
            return None
        self.events.emit(
            "rerun_already_done",
            "rerun of migration %s for build %s was already done by %s (pid %s) at %s: not "
            "running it again (`bootmigrate rerun %s` runs it once more)",
            version,
            build,
            done.get("host"),
            done.get("pid"),
            done.get("finished_at"),
            version,
            migration_version=version,
            build=build,
            done_by=done.get("host"),
            done_at=done.get("finished_at"),
        )
        current = (self._last_seen or Control(exists=True)).version
        return MigrationReport(from_version=current, to_version=current, waited=self._waited())

    async def _retry_failed(self, control: Control, deadline: Deadline) -> HeldLock | None:
        held = await self.lock.retry_failed(control, deadline)
        if held is not None:
            failure = control.failure or {}
            self.events.emit(
                "failed_retried",
                "build %s retries migration %s, which failed on build %s "
                "(retry_failed_on_new_build=True)",
                self.lock.owner.build,
                failure.get("version"),
                failure.get("build"),
                level=WARNING,
                migration_version=failure.get("version"),
                migration_name=failure.get("name"),
                build=self.lock.owner.build,
                error=failure.get("error"),
                token=held.token,
            )
        return held

    def _give_up(self, exc: BaseException) -> NoReturn:
        """The deadline passed: say why, as the error an operator can act on."""
        last = exc.control if isinstance(exc, (LockBusy, _NotYet)) else self._last_seen
        if last is not None and last.locked:
            raise ControlLocked(
                "stuck" if last.stuck else "wait_timeout",
                last,
                collection=self.lock.collection_name,
                wait_timeout=self.settings.wait_timeout,
            )
        if isinstance(exc, _NotYet):
            raise NotMigrated(
                db_version=exc.control.version,
                wanted=exc.wanted,
                wait_timeout=self.settings.wait_timeout,
                collection=self.lock.collection_name,
            )
        raise DatabaseUnavailable(
            address=address_of(self.db),
            seconds=self.settings.wait_timeout,
            cause=str(exc),
            holding=False,
        ) from exc

    def _before_nap(self, exc: BaseException) -> None:
        if isinstance(exc, LockBusy):
            if self._busy_since is None:
                self._busy_since = time.monotonic()
                c = exc.control
                self.events.emit(
                    "waiting",
                    "waiting for %s, which holds the migration lock%s (database at version %d%s)",
                    c.describe_owner(),
                    f" since {c.locked_at:%H:%M:%S} UTC" if c.locked_at else "",
                    c.version,
                    f", running {c.running.get('version')}" if c.running else "",
                    holder=c.owner,
                    locked_since=c.locked_at,
                    db_version=c.version,
                    running=c.running,
                    token=c.token,
                )
                lease = c.recorded_lease
                if lease is not None and lease >= self.settings.wait_timeout:
                    self.events.emit(
                        "lease_too_long",
                        "the holder's lease (%g s) is not shorter than this replica's "
                        "wait_timeout (%g s): it cannot see the holder die before giving up; if "
                        "the holder is gone, raise wait_timeout or run `bootmigrate unlock`",
                        lease,
                        self.settings.wait_timeout,
                        level=WARNING,
                        holder=c.owner,
                        lease_s=lease,
                    )
        elif isinstance(exc, _NotYet):
            if self._busy_since is None:
                self._busy_since = time.monotonic()
                c = exc.control
                self.events.emit(
                    "waiting",
                    "waiting for the database to reach version %d (now %d, lock %s); this "
                    "replica only waits (apply=False): another process runs the migrations",
                    exc.wanted,
                    c.version,
                    f"held by {c.describe_owner()}" if c.locked else "free",
                    db_version=c.version,
                    target_version=exc.wanted,
                    holder=c.owner if c.locked else None,
                    running=c.running,
                    token=c.token if c.locked else None,
                )
        elif isinstance(exc, _Missed):
            self.events.emit(
                "acquire_missed",
                "%s; looking again",
                exc,
                level=DEBUG,
                db_version=exc.tried.version,
            )
        else:
            self.events.emit(
                "unreachable",
                "MongoDB unreachable (%s); retrying until the wait_timeout",
                exc,
                level=WARNING,
                error=str(exc),
                error_type=type(exc).__name__,
            )

    def _waited(self) -> float:
        if self._busy_since is None:
            return 0.0
        return time.monotonic() - self._busy_since
