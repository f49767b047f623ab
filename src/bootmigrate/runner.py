"""``migrate()``: read, plan, wait or acquire, apply under a heartbeat, report."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, NoReturn

import anyio
import anyio.lowlevel
from pymongo.errors import ConnectionFailure
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from .control import Control, ControlStore, Owner
from .drivers import address_of, detect_driver, majority_collection, server_time
from .envvar import ENV_VAR, VersionRequest, parse_version_request
from .errors import (
    ControlLocked,
    DatabaseAhead,
    DatabaseUnavailable,
    InvalidTarget,
    LockLost,
    MigrationFailed,
)
from .history import History, error_fields, utc_now
from .migrations import Migration, MigrationSource, load_migrations
from .plan import Plan, Step, Target, latest_version, plan_for, resolve_target
from .watch import ControlWatch

log = logging.getLogger("bootmigrate")

# The first polls come quickly (a hand-off is usually imminent); later ones back off.
FIRST_POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class MigrationReport:
    """What one ``migrate()`` call found and did.

    ``from_version``: the version at this call's first read; ``to_version``: at its end.
    ``applied``/``reverted``: versions this call ran up/down. ``waited``: seconds spent
    waiting for another process's lock. ``holder``: whether this call took the lock.
    ``ahead``: the database is newer than this build. ``exit_requested``:
    ``MIGRATION_VERSION=N,exit`` asked the service to exit once migrated.
    """

    from_version: int
    to_version: int
    applied: list[int] = field(default_factory=list)
    reverted: list[int] = field(default_factory=list)
    waited: float = 0.0
    holder: bool = False
    ahead: bool = False
    exit_requested: bool = False


@dataclass
class MigrationContext:
    """The optional second argument of a migration step."""

    db: Any
    version: int
    name: str
    direction: str
    log: logging.LoggerAdapter[logging.Logger]
    session: Any = None


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
    rerun: int | None = None,
    max_poll_interval: float = 2.0,
    migration_timeout: float | None = None,
) -> MigrationReport:
    """Bring the database to ``target``, with exactly one replica applying migrations.

    Awaited in a service's startup by every replica: the one that takes the control lock
    applies the pending migrations; the others wait until it is done. Returns after one
    read when nothing is pending. Raises a :class:`~bootmigrate.MigrationError` the
    service should not boot past.

    ``rerun=N`` runs migration ``N``'s ``up`` again under the lock without changing the
    version. ``floor`` is the oldest database version this build upgrades from (default:
    the version just before its oldest migration). ``migration_timeout`` bounds each
    migration (a module's own ``timeout`` wins); one that runs over fails like one that
    raised.

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
    if request is not None:
        _check_request(request, known)
    runner = _Runner(
        db,
        known,
        target=target,
        control=ControlStore(majority_collection(db, collection)),
        history_name=history_collection or f"{collection}_history",
        owner=Owner.this_process(build, lease),
        wait_timeout=wait_timeout,
        fresh=fresh,
        on_ahead=on_ahead,
        floor=floor,
        rerun=rerun,
        max_poll_interval=max_poll_interval,
        migration_timeout=migration_timeout,
    )
    report = await runner.run()
    if request is not None and request.exit:
        report = replace(report, exit_requested=True)
    return report


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
        rerun: int | None,
        max_poll_interval: float,
        migration_timeout: float | None,
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
        self.rerun = rerun
        self.max_poll_interval = max_poll_interval
        self.migration_timeout = migration_timeout
        self._last_seen: Control | None = None
        self._first_seen: Control | None = None
        self._busy_since: float | None = None
        self._lost = False

    # -- waiting until there is nothing to do, or the lock is ours ---------------------------

    async def run(self) -> MigrationReport:
        settled = await self._settle()
        if isinstance(settled, MigrationReport):
            return settled
        return await self._apply(settled.control, settled.plan)

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
        backoff = wait_random_exponential(
            multiplier=FIRST_POLL_INTERVAL, max=self.max_poll_interval
        )

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
                raise self._stuck_error(control)
            if not control.locked:
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
        return plan_for(control, self.known, target=self.target, floor=self.floor, rerun=self.rerun)

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
                extra=_fields("database_ahead", db_version=control.version),
            )
        if self._busy_since is not None:
            log.info(
                "database reached version %d after waiting %.1f s; done",
                control.version,
                self._waited(),
                extra=_fields("wait_done", db_version=control.version, waited_s=self._waited()),
            )
        else:
            log.info(
                "database at version %d: nothing to migrate",
                control.version,
                extra=_fields("up_to_date", db_version=control.version),
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
                    extra=_fields("dead_lock_released", holder=control.owner),
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
        if running and not (interrupted and interrupted.idempotent):
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
        failure = _failure(
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
                    extra=_fields(
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
                extra=_fields("unreachable", error=str(exc)),
            )

    def _waited(self) -> float:
        if self._busy_since is None:
            return 0.0
        return time.monotonic() - self._busy_since

    # -- holding the lock ----------------------------------------------------------------------

    async def _apply(self, control: Control, plan: Plan) -> MigrationReport:
        waited = self._waited()
        token = control.token
        state = _Progress(version=control.version)
        error: Exception | None = None
        log.info(
            "took the migration lock (token %d): %d migration(s) to run, version %d -> %d",
            token,
            len(plan.steps),
            plan.from_version,
            plan.to_version,
            extra=_fields(
                "lock_taken",
                token=token,
                db_version=plan.from_version,
                target_version=plan.to_version,
                waited_s=waited,
            ),
        )
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._keep_alive, token, tasks.cancel_scope.cancel)
            try:
                await self._run_steps(token, plan, state)
            except Exception as exc:  # re-raised below, outside the task group
                error = exc
            tasks.cancel_scope.cancel()
        if self._lost:
            raise LockLost(
                f"this process lost the migration lock (token {token}) while running "
                f"migrations: it missed heartbeats for longer than its lease "
                f"({self.owner.lease:g} s), so another process may have taken over. It "
                "stopped and wrote nothing more."
            ) from error
        if error is not None:
            raise error
        log.info(
            "migrations done: database at version %d",
            state.version,
            extra=_fields(
                "migrations_done",
                db_version=state.version,
                applied=state.applied,
                reverted=state.reverted,
            ),
        )
        return MigrationReport(
            from_version=plan.from_version,
            to_version=state.version,
            applied=state.applied,
            reverted=state.reverted,
            waited=waited,
            holder=True,
        )

    async def _run_steps(self, token: int, plan: Plan, state: _Progress) -> None:
        try:
            for step in plan.steps:
                await self._write(functools.partial(self.control.start, token, step.running()))
                await anyio.lowlevel.checkpoint()  # a cancellation here is still "between"
                await self._run_step(token, step, state)
            await self._write(lambda: self.control.release(token))
        except anyio.get_cancelled_exc_class():
            if not self._lost and not state.inside:
                log.warning(
                    "cancelled between migrations: releasing the lock at version %d", state.version
                )
                await self._write(lambda: self.control.release(token))
            raise

    async def _run_step(self, token: int, step: Step, state: _Progress) -> None:
        migration = step.migration
        started_at = utc_now()
        started = time.monotonic()
        log.debug("running migration %s (%s)", migration.label(), step.direction)
        state.inside = True  # stays set if the step is cancelled: it is then handled here
        try:
            result = await self._call(step)
            if result is not None:
                if inspect.iscoroutine(result):
                    result.close()  # never awaited by us: silence the warning, keep the error
                raise TypeError(
                    f"{step.direction} returned {result!r}; a migration step must return None "
                    "(was an `await` forgotten?)"
                )
        except anyio.get_cancelled_exc_class():
            if not self._lost:
                await self._record_interruption(token, step, started_at, started)
            raise
        except Exception as exc:
            await self._record_failure(token, step, exc, started_at, started)
            raise MigrationFailed(
                self._failure_message(step, exc), version=migration.version
            ) from exc
        state.inside = False
        duration = time.monotonic() - started
        await self._write(lambda: self.control.advance(token, step.version_after))
        await self._write(
            lambda: self.history.record(
                version=migration.version,
                name=migration.name,
                direction=step.direction,
                outcome="applied",
                started_at=started_at,
                duration=duration,
                token=token,
            )
        )
        state.done(step)
        log.info(
            "applied migration %s (%s) in %.3f s",
            migration.label(),
            step.direction,
            duration,
            extra=_fields(
                "migration_applied",
                migration_version=migration.version,
                migration_name=migration.name,
                direction=step.direction,
                duration_s=duration,
            ),
        )

    async def _call(self, step: Step) -> Any:
        migration = step.migration
        function = migration.down if step.direction == "down" else migration.up
        assert function is not None  # the plan refuses a down step without `down`
        timeout = migration.timeout or self.migration_timeout
        scope: anyio.CancelScope | None = None
        try:
            with anyio.fail_after(timeout) as scope:
                return await self._invoke(function, step)
        except TimeoutError:
            if timeout is None or scope is None or not scope.cancel_called:
                raise  # the migration's own TimeoutError, not ours
            raise TimeoutError(f"ran longer than its timeout of {timeout:g} s") from None

    async def _invoke(self, function: Any, step: Step) -> Any:
        migration = step.migration
        if not migration.wants_context(step.direction):
            return await function(self.db)
        context = MigrationContext(
            db=self.db,
            version=migration.version,
            name=migration.name,
            direction=step.direction,
            log=logging.LoggerAdapter(log, {"migration": migration.version}),
        )
        return await function(self.db, context)

    async def _record_failure(
        self, token: int, step: Step, exc: Exception, started_at: datetime, started: float
    ) -> None:
        migration = step.migration
        failure = _failure("failed", step.running(), self.owner.as_document(), **error_fields(exc))
        log.error(
            "migration %s failed: %s; leaving the lock stuck",
            migration.label(),
            failure["error"],
            extra=_fields(
                "migration_failed",
                migration_version=migration.version,
                migration_name=migration.name,
                error=failure["error"],
            ),
        )
        await self._write(lambda: self.control.stick(token, failure))
        await self._write(
            lambda: self.history.record(
                version=migration.version,
                name=migration.name,
                direction=step.direction,
                outcome="failed",
                started_at=started_at,
                duration=time.monotonic() - started,
                token=token,
                error=exc,
            )
        )

    async def _record_interruption(
        self, token: int, step: Step, started_at: datetime, started: float
    ) -> None:
        migration = step.migration
        if migration.idempotent:
            log.warning(
                "cancelled inside idempotent migration %s: releasing the lock; the "
                "next boot re-runs it",
                migration.label(),
            )
            await self._write(lambda: self.control.release(token))
        else:
            log.error(
                "cancelled inside migration %s: leaving the lock stuck as interrupted",
                migration.label(),
            )
            failure = _failure(
                "interrupted",
                step.running(),
                self.owner.as_document(),
                error="cancelled while running (the process was asked to stop)",
            )
            await self._write(lambda: self.control.stick(token, failure))
        await self._write(
            lambda: self.history.record(
                version=migration.version,
                name=migration.name,
                direction=step.direction,
                outcome="interrupted",
                started_at=started_at,
                duration=time.monotonic() - started,
                token=token,
                note="cancelled while running",
            )
        )

    def _failure_message(self, step: Step, exc: Exception) -> str:
        migration = step.migration
        return (
            f"migration {migration.label()} ({step.direction}) failed on {self.owner.host} "
            f"(pid {self.owner.pid}): {type(exc).__name__}: {exc}. The lock in collection "
            f"{self.control.name!r} is left held on purpose, database at version "
            f"{self._last_version(step)}. Fix the migration, then run `bootmigrate unlock`; "
            f"the next boot resumes at migration {migration.version}."
        )

    def _last_version(self, step: Step) -> int:
        if step.direction == "down":
            return step.migration.version
        if step.direction == "rerun":
            return step.version_after
        return max((m.version for m in self.known if m.version < step.migration.version), default=0)

    async def _write(self, write: Callable[[], Any]) -> None:
        """A holder's bookkeeping write: shielded from cancellation, retried on connection
        loss for at most one lease (after that the lock may no longer be ours anyway)."""
        with anyio.CancelScope(shield=True):
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(ConnectionFailure),
                    wait=wait_random_exponential(
                        multiplier=FIRST_POLL_INTERVAL, max=self.max_poll_interval
                    ),
                    stop=stop_after_delay(self.owner.lease),
                    reraise=True,
                ):
                    with attempt:
                        await write()
            except ConnectionFailure as exc:
                raise DatabaseUnavailable(
                    f"lost contact with MongoDB at {address_of(self.db)} for over "
                    f"{self.owner.lease:g} s (the lease) while holding the migration lock: "
                    f"{exc}. The lock will expire; the next process to boot decides from the "
                    "control document whether the interrupted migration may be re-run."
                ) from exc

    async def _keep_alive(self, token: int, stop: Callable[[], None]) -> None:
        """Refresh the lease every lease/3; stop everything once the lock may not be ours."""
        lease = self.owner.lease
        last_beat = time.monotonic()
        while True:
            await anyio.sleep(lease / 3)
            remaining = last_beat + lease - time.monotonic()
            ours: bool | None = None
            with anyio.move_on_after(max(remaining, 0.0)):
                try:
                    ours = await self.control.heartbeat(token)
                except Exception as exc:  # keep beating; the lease decides when to give up
                    log.warning("heartbeat failed: %s", exc)
            if ours:
                last_beat = time.monotonic()
                continue
            if ours is False or time.monotonic() - last_beat >= lease:
                log.error(
                    "lost the migration lock (token %d); stopping without further writes", token
                )
                self._lost = True
                stop()
                return


def _fields(event: str, **fields: Any) -> dict[str, Any]:
    """Structured attributes for a log record: ``event`` names it for log shippers."""
    return {"event": event, **fields}


def _failure(
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


@dataclass
class _Progress:
    """Where the holder is: the version reached, what ran, and whether a step is running."""

    version: int
    applied: list[int] = field(default_factory=list)
    reverted: list[int] = field(default_factory=list)
    inside: bool = False

    def done(self, step: Step) -> None:
        self.version = step.version_after
        if step.direction == "down":
            self.reverted.append(step.migration.version)
        else:
            self.applied.append(step.migration.version)
