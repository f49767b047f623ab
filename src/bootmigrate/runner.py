"""``migrate()``: read, plan, then wait, acquire or take over; holder.py applies."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Literal, NoReturn

import anyio
from pymongo.errors import ConnectionFailure
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from .checksums import find_drift
from .control import Control, ControlStore, Owner, failure_record
from .drivers import (
    address_of,
    detect_driver,
    majority_collection,
    server_time,
    supports_transactions,
)
from .envvar import ENV_VAR, VersionRequest, parse_version_request
from .errors import (
    ControlLocked,
    DatabaseAhead,
    DatabaseUnavailable,
    InvalidMigrations,
    InvalidTarget,
)
from .history import History
from .holder import Holder
from .migrations import Migration, MigrationSource, floor_in_force, load_migrations
from .plan import Plan, Target, latest_version, plan_for, resolve_target
from .report import MigrationReport, log_fields
from .watch import ControlWatch

log = logging.getLogger("bootmigrate")

# The first polls come quickly (a hand-off is usually imminent); later ones back off.
FIRST_POLL_INTERVAL = 0.05


class _Busy(Exception):
    """Another live process holds the lock: poll again after a backoff."""

    def __init__(self, control: Control) -> None:
        super().__init__("control lock held")
        self.control = control


@dataclass(frozen=True)
class _Held:
    control: Control
    plan: Plan


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
) -> MigrationReport:
    """Bring the database to ``target``, with exactly one replica applying migrations.

    Awaited in a service's startup by every replica: the one that takes the control lock
    applies the pending migrations; the others wait until it is done. Returns after one
    read when nothing is pending. Raises a :class:`~bootmigrate.MigrationError` the
    service should not boot past.

    ``rerun=N`` runs migration ``N``'s ``up`` again under the lock without changing the
    version. ``floor`` is the oldest database version this build upgrades from (default:
    ``FLOOR`` in the migrations package, else the version just before its oldest
    migration); ``floor_release`` (default ``FLOOR_RELEASE``) names the release to upgrade
    through when the database is older. ``migration_timeout`` bounds each
    migration (a module's own ``timeout`` wins); one that runs over fails like one that
    raised. ``validate=True`` first refuses (``InvalidMigrations``, nothing written) if an
    applied migration's code changed or disappeared since it ran.
    ``retry_failed_on_new_build=True`` lets a build other than the one a migration failed on
    take the stuck lock and retry it (never an interrupted one, never a live lock).

    When neither ``target`` nor ``rerun`` is given, ``MIGRATION_VERSION`` in the environment
    is honoured as Rocket.Chat reads it; ``N,exit`` sets ``exit_requested`` on the report so
    the caller can exit once migrated.
    """
    detect_driver(db)
    request = None
    if target == "latest" and rerun is None:
        request = parse_version_request(os.environ.get(ENV_VAR))
        if request is not None:
            target, rerun = request.target, request.rerun
    _check_options(
        wait_timeout=wait_timeout,
        lease=lease,
        fresh=fresh,
        on_ahead=on_ahead,
        max_poll_interval=max_poll_interval,
        migration_timeout=migration_timeout,
    )
    known = load_migrations(migrations)
    floor, floor_release = floor_in_force(migrations, floor, floor_release)
    if request is not None:
        _check_request(request, known)
    control = ControlStore(majority_collection(db, collection))
    history_name = history_collection or f"{collection}_history"
    if validate:
        await _refuse_drift(db, known, control, history_name)
    runner = _Runner(
        db,
        known,
        target=target,
        control=control,
        history_name=history_name,
        owner=Owner.this_process(build, lease),
        wait_timeout=wait_timeout,
        fresh=fresh,
        on_ahead=on_ahead,
        floor=floor,
        floor_release=floor_release,
        rerun=rerun,
        max_poll_interval=max_poll_interval,
        migration_timeout=migration_timeout,
        retry_failed_on_new_build=retry_failed_on_new_build,
    )
    report = await runner.run()
    if request is not None and request.exit:
        report = replace(report, exit_requested=True)
    return report


async def _refuse_drift(
    db: Any, known: list[Migration], control: ControlStore, history_name: str
) -> None:
    version = (await control.read()).version
    drift = await find_drift(majority_collection(db, history_name), known, version)
    if drift:
        raise InvalidMigrations(
            "applied migrations differ from the ones that ran: "
            + "; ".join(d.describe() for d in drift)
            + ". A migration that ran never runs again: restore its code and put the change "
            "in a new migration (`bootmigrate validate` lists them)."
        )


def _check_request(request: VersionRequest, known: list[Migration]) -> None:
    wanted = request.rerun if request.rerun is not None else request.target
    try:
        resolve_target(wanted, known)
    except InvalidTarget as exc:
        raise InvalidTarget(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}: {exc}") from None


def _check_options(**options: Any) -> None:
    for name in ("wait_timeout", "lease", "max_poll_interval"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    timeout = options["migration_timeout"]
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise ValueError(f"migration_timeout must be a positive number of seconds, got {timeout!r}")
    if options["fresh"] not in ("run", "skip"):
        raise ValueError(f"fresh must be 'run' or 'skip', got {options['fresh']!r}")
    if options["on_ahead"] not in ("warn", "error"):
        raise ValueError(f"on_ahead must be 'warn' or 'error', got {options['on_ahead']!r}")


class _Runner:
    def __init__(
        self,
        db: Any,
        known: list[Migration],
        *,
        target: Target,
        control: ControlStore,
        history_name: str,
        owner: Owner,
        wait_timeout: float,
        fresh: str,
        on_ahead: str,
        floor: int | None,
        floor_release: str | None,
        rerun: int | None,
        max_poll_interval: float,
        migration_timeout: float | None,
        retry_failed_on_new_build: bool = False,
    ) -> None:
        self.db = db
        self.known = known
        self.by_version = {m.version: m for m in known}
        self.target = target
        self.control = control
        self.history = History(majority_collection(db, history_name), owner)
        self.owner = owner
        self.wait_timeout = wait_timeout
        self.fresh = fresh
        self.on_ahead = on_ahead
        self.floor = floor
        self.floor_release = floor_release
        self.rerun = rerun
        self.max_poll_interval = max_poll_interval
        self.migration_timeout = migration_timeout
        self.retry_failed_on_new_build = retry_failed_on_new_build
        self._transactions_checked = False
        self._last_seen: Control | None = None
        self._first_seen: Control | None = None
        self._busy_since: float | None = None
        self._lost = False

    # -- waiting until there is nothing to do, or the lock is ours ---------------------------

    async def run(self) -> MigrationReport:
        settled = await self._settle()
        if isinstance(settled, MigrationReport):
            return settled
        holder = Holder(
            self.db,
            self.known,
            control=self.control,
            history=self.history,
            owner=self.owner,
            migration_timeout=self.migration_timeout,
            retry_wait=self._backoff(),
        )
        return await holder.apply(settled.control, settled.plan, self._waited())

    async def _settle(self) -> MigrationReport | _Held:
        """Until there is nothing to do or the lock is ours. Waiting replicas follow the control
        document's changes in a task of their own (where the deployment has change streams),
        so they wake when the holder finishes, not at their next poll."""
        deadline = time.monotonic() + self.wait_timeout
        try:
            # Every boot but the few after a deploy ends here: one read, no other machinery.
            return await self._attempt(deadline)
        except (_Busy, ConnectionFailure) as exc:
            first: BaseException = exc
        except TimeoutError as exc:
            self._give_up(exc)
        settled: MigrationReport | _Held | None = None
        error: Exception | None = None
        async with anyio.create_task_group() as tasks:
            watch = ControlWatch(self.control.collection, tasks, self.max_poll_interval)
            try:
                settled = await self._settle_with(watch, deadline, first)
            except Exception as exc:  # re-raised below, outside the task group
                error = exc
            tasks.cancel_scope.cancel()
        if error is not None:
            raise error
        assert settled is not None
        return settled

    async def _settle_with(
        self, watch: ControlWatch, deadline: float, first: BaseException
    ) -> MigrationReport | _Held:
        backoff = self._backoff()

        def until_deadline(state: RetryCallState) -> float:
            # Never sleep past the deadline: the last look comes at the deadline, not after.
            return max(0.0, min(backoff(state), deadline - time.monotonic()))

        retrying = AsyncRetrying(
            retry=retry_if_exception_type((_Busy, ConnectionFailure)),
            wait=until_deadline,
            sleep=watch.nap,
            stop=stop_after_delay(self.wait_timeout),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        outcomes = [first]  # the attempt already made counts as tenacity's first

        async def attempt() -> MigrationReport | _Held:
            if outcomes:
                raise outcomes.pop()
            return await self._attempt(deadline)

        try:
            async for retry in retrying:
                with retry:
                    return await attempt()
        except (_Busy, ConnectionFailure, TimeoutError) as exc:
            self._give_up(exc)
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _backoff(self) -> wait_base:
        """Exponential backoff with full jitter, from 50 ms up to ``max_poll_interval``."""
        return wait_random_exponential(multiplier=FIRST_POLL_INTERVAL, max=self.max_poll_interval)

    def _give_up(self, exc: BaseException) -> NoReturn:
        """The deadline passed: say why, as the error an operator can act on."""
        if isinstance(exc, _Busy):
            self._raise_wait_timeout(exc.control)
        if self._last_seen is not None and self._last_seen.locked:
            self._raise_wait_timeout(self._last_seen)
        raise DatabaseUnavailable(
            f"could not reach MongoDB at {address_of(self.db)} within "
            f"{self.wait_timeout:g} s (wait_timeout): {exc}. Check that the server is up "
            "and the connection string is right; migrations were not run."
        ) from exc

    async def _attempt(self, deadline: float) -> MigrationReport | _Held:
        while True:  # loops only when another replica changed the document under us
            control = await self._read(deadline)
            plan = self._plan(control)
            if not plan.steps:
                if control.locked and not control.stuck and control.running is None:
                    await self._release_if_dead(control, deadline)
                return await self._nothing_to_do(control, plan)
            if not control.exists and self.fresh == "skip" and self.rerun is None:
                skipped = await self._skip_fresh(plan)
                if skipped is None:
                    continue
                return skipped
            if control.stuck:
                if not self._may_retry(control):
                    raise self._stuck_error(control)
                held = await self._retry_failed(control)
            elif not control.locked:
                await self._check_transactions(plan)
                held = await self._acquire(control)
            elif control.owner and control.owner.get("id") == self.owner.id:
                held = control  # our acquire went through though its reply was lost
            else:
                held = await self._take_over_if_dead(control, deadline)
            if held is not None:
                return _Held(held, self._plan(held))

    async def _read(self, deadline: float) -> Control:
        # Reads are bounded by the deadline; the driver's own server selection may be longer.
        with anyio.fail_after(max(0.0, deadline - time.monotonic()) + 0.5):
            control = await self.control.read()
        self._last_seen = control
        if self._first_seen is None:
            self._first_seen = control
        return control

    def _plan(self, control: Control) -> Plan:
        return plan_for(
            control,
            self.known,
            target=self.target,
            floor=self.floor,
            rerun=self.rerun,
            floor_release=self.floor_release,
        )

    async def _nothing_to_do(self, control: Control, plan: Plan) -> MigrationReport:
        if plan.ahead:
            message = (
                f"the database is at version {control.version}, ahead of this build's latest "
                f"migration ({latest_version(self.known)}): an older build booting during a "
                "rollout? Not migrating down."
            )
            if self.on_ahead == "error":
                raise DatabaseAhead(message + " Refused because on_ahead='error'.")
            log.warning(
                message + " Booting anyway (on_ahead='warn').",
                extra=log_fields("database_ahead", db_version=control.version),
            )
        if self._busy_since is not None:
            log.info(
                "database reached version %d after waiting %.1f s; done",
                control.version,
                self._waited(),
                extra=log_fields("wait_done", db_version=control.version, waited_s=self._waited()),
            )
        else:
            log.info(
                "database at version %d: nothing to migrate",
                control.version,
                extra=log_fields("up_to_date", db_version=control.version),
            )
        first = self._first_seen or control
        return MigrationReport(
            from_version=first.version,
            to_version=control.version,
            waited=self._waited(),
            ahead=plan.ahead,
        )

    async def _skip_fresh(self, plan: Plan) -> MigrationReport | None:
        """Rocket.Chat's behaviour on an empty database: record it as up to date."""
        with anyio.CancelScope(shield=True):
            created = await self.control.create(version=plan.to_version, owner=None)
            if created is None:
                return None  # another replica created it first: decide again from its copy
            await self.history.record(
                version=plan.to_version,
                name="",
                direction="up",
                outcome="skipped",
                note="fresh database: recorded as up to date without running migrations "
                "(fresh='skip')",
            )
        log.info("fresh database: set to version %d without running migrations", plan.to_version)
        return MigrationReport(from_version=0, to_version=plan.to_version, holder=True)

    async def _acquire(self, control: Control) -> Control | None:
        # Shielded: a lock taken by a write whose reply was abandoned would sit unused until
        # its lease ran out. A cancellation pending meanwhile lands at the first checkpoint
        # of _run_steps, which releases the lock.
        with anyio.CancelScope(shield=True):
            if control.exists:
                held = await self.control.acquire(control, self.owner)
            else:
                held = await self.control.create(version=0, owner=self.owner)
        return held

    async def _release_if_dead(self, control: Control, deadline: float) -> None:
        """Tidy a lock whose holder died after its last migration: nothing was interrupted,
        so take it over and release it, sparing operators an unlock."""
        if control.heartbeat is None or not control.owner:
            return
        silent_for = await self._silence(control, deadline)
        if silent_for <= self._lease_of(control):
            return  # alive: it is migrating beyond this build's target
        with anyio.CancelScope(shield=True):
            held = await self.control.take_over(control, self.owner)
            if held is not None:
                await self.control.release(held.token)
                log.warning(
                    "released the migration lock left by %s, silent for %.1f s after its last "
                    "migration",
                    control.holder(),
                    silent_for,
                    extra=log_fields("dead_lock_released", holder=control.owner),
                )

    async def _silence(self, control: Control, deadline: float) -> float:
        """Seconds since the holder's last heartbeat, both instants on the server's clock."""
        assert control.heartbeat is not None
        with anyio.fail_after(max(0.0, deadline - time.monotonic()) + 0.5):
            now = await server_time(self.db)
        return (now - control.heartbeat).total_seconds()

    def _lease_of(self, control: Control) -> float:
        """The holder's own lease, not ours: it promised to beat within that."""
        return float((control.owner or {}).get("lease") or self.owner.lease)

    async def _take_over_if_dead(self, control: Control, deadline: float) -> Control | None:
        if control.heartbeat is None or not control.owner:
            raise _Busy(control)  # a lock with no lease is never presumed dead
        silent_for = await self._silence(control, deadline)
        lease = self._lease_of(control)
        if silent_for <= lease:
            raise _Busy(control)
        running = control.running
        interrupted = self.by_version.get(running["version"]) if running else None
        # Safe to re-run: declared idempotent, or run in a transaction (which the server aborted
        # when its holder died, since a committed one would have cleared `running` with it).
        if running and not (interrupted and (interrupted.idempotent or interrupted.transactional)):
            await self._stick_interrupted(control, silent_for)
            return None  # re-read: now stuck, and reported as such
        log.warning(
            "taking over the migration lock from %s: no heartbeat for %.1f s (lease %g s)%s",
            control.holder(),
            silent_for,
            lease,
            f"; re-running idempotent migration {running['version']}" if running else "",
        )
        with anyio.CancelScope(shield=True):
            held = await self.control.take_over(control, self.owner)
        return held

    async def _stick_interrupted(self, control: Control, silent_for: float) -> None:
        running = control.running or {}
        error = (
            f"holder {control.holder()} stopped heartbeating for {silent_for:.1f} s "
            "inside this migration (killed or crashed)"
        )
        failure = failure_record(
            "interrupted",
            running,
            control.owner or {},
            error=error,
            detected_by=f"{self.owner.host} (pid {self.owner.pid})",
        )
        with anyio.CancelScope(shield=True):
            if await self.control.mark_interrupted(control, failure):
                await self.history.record(
                    version=int(running.get("version") or 0),
                    name=str(running.get("name") or ""),
                    direction=running.get("direction") or "up",
                    outcome="interrupted",
                    token=control.token,
                    note=error,
                )

    async def _check_transactions(self, plan: Plan) -> None:
        """Refuse, before taking the lock, a transactional migration the deployment cannot run
        in a transaction, rather than run it without one."""
        wanted = [s.migration.label() for s in plan.steps if s.migration.transactional]
        if wanted and not self._transactions_checked:
            if not await supports_transactions(self.db):
                raise InvalidMigrations(
                    f"migration {', '.join(wanted)} declares `transactional = True`, but this "
                    "deployment does not support transactions (a standalone server). Run it on "
                    "a replica set (a one-node replica set will do), or remove the declaration; "
                    "nothing was run."
                )
            self._transactions_checked = True

    def _may_retry(self, control: Control) -> bool:
        """A lock stuck by a failure is retried only when the operator opted in and this is
        a different build (the fix, presumably); never an interrupted one, never the same
        build, and never a live lock."""
        failure = control.failure or {}
        return bool(
            self.retry_failed_on_new_build
            and failure.get("kind") == "failed"
            and self.owner.build
            and failure.get("build") != self.owner.build
        )

    async def _retry_failed(self, control: Control) -> Control | None:
        failure = control.failure or {}
        with anyio.CancelScope(shield=True):
            held = await self.control.retry_failed(control, self.owner)
            if held is not None:
                await self.history.record(
                    version=int(failure.get("version") or 0),
                    name=str(failure.get("name") or ""),
                    direction=None,
                    outcome="manual",
                    action="retry-on-new-build",
                    token=held.token,
                    note=f"build {self.owner.build} retries the migration that failed on build "
                    f"{failure.get('build')}: {failure.get('error')}",
                )
        if held is not None:
            log.warning(
                "build %s retries migration %s, which failed on build %s "
                "(retry_failed_on_new_build=True)",
                self.owner.build,
                failure.get("version"),
                failure.get("build"),
                extra=log_fields("failed_retried", migration_version=failure.get("version")),
            )
        return held

    def _stuck_error(self, control: Control) -> ControlLocked:
        failure = control.failure or {}
        version = failure.get("version")
        where = failure.get("host") or "an unknown host"
        if failure.get("pid"):
            where += f" (pid {failure['pid']})"
        what = "was interrupted" if failure.get("kind") == "interrupted" else "failed"
        return ControlLocked(
            f"migration {version} {failure.get('name') or ''} {what} on {where} at "
            f"{failure.get('at')}: {failure.get('error')}. The lock in collection "
            f"{self.control.name!r} is held on purpose so that no replica boots on a "
            f"half-migrated database (at version {control.version}). Fix the cause, then "
            f"unlock: `bootmigrate unlock`, or db.{self.control.name}.updateOne("
            '{_id: "control"}, {$set: {locked: false}}); '
            f"the next boot resumes at migration {version}.",
            control=control.raw,
        )

    def _raise_wait_timeout(self, control: Control) -> NoReturn:
        if control.stuck:
            raise self._stuck_error(control)
        since = f" since {control.locked_at:%Y-%m-%d %H:%M:%S} UTC" if control.locked_at else ""
        running = control.running
        doing = f", running migration {running.get('version')}" if running else ""
        raise ControlLocked(
            f"gave up after {self.wait_timeout:g} s (wait_timeout): the migration lock in "
            f"collection {self.control.name!r} is held by {control.holder()}{since}{doing}, "
            f"database at version {control.version}. If that process is alive, wait for it "
            "or raise wait_timeout; if it is not, and it records no lease, unlock with "
            "`bootmigrate unlock`.",
            control=control.raw,
        )

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Busy):
            if self._busy_since is None:
                self._busy_since = time.monotonic()
                c = exc.control
                log.info(
                    "waiting for %s, which holds the migration lock%s (database at version %d%s)",
                    c.holder(),
                    f" since {c.locked_at:%H:%M:%S} UTC" if c.locked_at else "",
                    c.version,
                    f", running {c.running.get('version')}" if c.running else "",
                    extra=log_fields(
                        "waiting",
                        holder=c.owner,
                        locked_since=c.locked_at,
                        db_version=c.version,
                        running=c.running,
                    ),
                )
        elif exc is not None:
            log.warning(
                "MongoDB unreachable (%s); retrying until the wait_timeout",
                exc,
                extra=log_fields("unreachable", error=str(exc)),
            )

    def _waited(self) -> float:
        if self._busy_since is None:
            return 0.0
        return time.monotonic() - self._busy_since
