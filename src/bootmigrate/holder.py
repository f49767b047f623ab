"""Holding the lock: run the planned migrations under a heartbeat, record each one, and on
failure or cancellation leave the control document saying exactly what happened."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
from pymongo.errors import ConnectionFailure
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay
from tenacity.wait import wait_base

from .control import Control, ControlStore, Owner, failure_record, utc_now
from .drivers import address_of, transaction
from .errors import DatabaseUnavailable, LockLost, MigrationFailed
from .history import History, Outcome, error_fields
from .migrations import Migration
from .plan import Plan, Step
from .report import MigrationReport, log_fields

log = logging.getLogger("bootmigrate")


@dataclass
class MigrationContext:
    """The optional second argument of a migration step.

    ``await ctx.progress(done, total)`` records how far a long migration has got on the
    control document (``running.progress``), where ``bootmigrate status`` shows it.
    """

    db: Any
    version: int
    name: str
    direction: str
    log: logging.LoggerAdapter[logging.Logger]
    session: Any = None
    report_progress: Callable[[int, int], Awaitable[None]] | None = field(default=None, repr=False)

    async def progress(self, done: int, total: int) -> None:
        """Record progress (one fenced write: call it per batch, not per document)."""
        if self.report_progress is not None:
            await self.report_progress(done, total)


class Holder:
    """The process that took the lock, for the length of one ``migrate()`` call."""

    def __init__(
        self,
        db: Any,
        known: list[Migration],
        *,
        control: ControlStore,
        history: History,
        owner: Owner,
        migration_timeout: float | None,
        retry_wait: wait_base,
    ) -> None:
        self.db = db
        self.known = known
        self.control = control
        self.history = history
        self.owner = owner
        self.migration_timeout = migration_timeout
        self.retry_wait = retry_wait
        self._lost = False
        self._token = 0
        self._in_transaction = False
        self._beaten_at = 0.0  # when a transaction's commit last refreshed the heartbeat

    async def apply(self, control: Control, plan: Plan, waited: float) -> MigrationReport:
        """Run ``plan`` under the lock ``control`` records as ours, beating all along."""
        token = self._token = control.token
        state = _Progress(version=control.version)
        error: Exception | None = None
        log.info(
            "took the migration lock (token %d): %d migration(s) to run, version %d -> %d",
            token,
            len(plan.steps),
            plan.from_version,
            plan.to_version,
            extra=log_fields(
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
            extra=log_fields(
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
            if migration.transactional:
                await self._run_in_transaction(token, step, started_at, started)
            else:
                await self._call(step)
        except anyio.get_cancelled_exc_class():
            if not self._lost:
                await self._record_interruption(token, step, started_at, started)
            raise
        except LockLost:
            raise  # fenced inside the transaction: it was aborted, nothing was committed
        except Exception as exc:
            await self._record_failure(token, step, exc, started_at, started)
            raise MigrationFailed(
                self._failure_message(step, exc), version=migration.version
            ) from exc
        state.inside = False
        duration = time.monotonic() - started
        if not migration.transactional:  # a transaction committed these with the migration
            await self._write(lambda: self.control.advance(token, step.version_after))
            await self._write(
                lambda: self._recorded(
                    token, step, "applied", started_at, started, checksum=self._checksum(step)
                )
            )
        state.done(step)
        log.info(
            "applied migration %s (%s) in %.3f s",
            migration.label(),
            step.direction,
            duration,
            extra=log_fields(
                "migration_applied",
                migration_version=migration.version,
                migration_name=migration.name,
                direction=step.direction,
                duration_s=duration,
            ),
        )

    async def _recorded(
        self,
        token: int,
        step: Step,
        outcome: Outcome,
        started_at: datetime,
        started: float,
        **details: Any,
    ) -> None:
        """One history record of this step's run."""
        migration = step.migration
        await self.history.record(
            version=migration.version,
            name=migration.name,
            direction=step.direction,
            outcome=outcome,
            started_at=started_at,
            duration=time.monotonic() - started,
            token=token,
            **details,
        )

    def _checksum(self, step: Step) -> str | None:
        return step.migration.checksum if step.direction != "down" else None

    async def _run_in_transaction(
        self, token: int, step: Step, started_at: datetime, started: float
    ) -> None:
        """The migration, its version and its history record, committed together or not at
        all. Heartbeats would conflict with the transaction's write to the control document,
        so the lease is refreshed just before and the transaction must end within half of it;
        its own fenced write refreshes the heartbeat again."""
        if not await self.control.heartbeat(token):
            raise LockLost(f"lost the migration lock (token {token}) before a transaction")
        self._in_transaction = True
        try:
            async with transaction(self.db) as session:
                await self._call(step, session, limit=self.owner.lease / 2)
                await self.control.advance(token, step.version_after, session)
                await self._recorded(
                    token,
                    step,
                    "applied",
                    started_at,
                    started,
                    checksum=self._checksum(step),
                    session=session,
                )
        finally:
            self._in_transaction = False
            self._beaten_at = time.monotonic()

    async def _call(self, step: Step, session: Any = None, limit: float | None = None) -> None:
        migration = step.migration
        function = migration.down if step.direction == "down" else migration.up
        assert function is not None  # the plan refuses a down step without `down`
        timeout = migration.timeout or self.migration_timeout
        if limit is not None:
            timeout = min(timeout or limit, limit)
        scope: anyio.CancelScope | None = None
        try:
            with anyio.fail_after(timeout) as scope:
                result = await self._invoke(function, step, session)
        except TimeoutError:
            if timeout is None or scope is None or not scope.cancel_called:
                raise  # the migration's own TimeoutError, not ours
            raise TimeoutError(f"ran longer than its timeout of {timeout:g} s") from None
        if result is not None:
            if inspect.iscoroutine(result):
                result.close()  # never awaited by us: silence the warning, keep the error
            raise TypeError(
                f"{step.direction} returned {result!r}; a migration step must return None "
                "(was an `await` forgotten?)"
            )

    async def _invoke(self, function: Any, step: Step, session: Any) -> Any:
        migration = step.migration
        if not migration.wants_context(step.direction):
            return await function(self.db)
        context = MigrationContext(
            db=self.db,
            version=migration.version,
            name=migration.name,
            direction=step.direction,
            log=logging.LoggerAdapter(log, {"migration": migration.version}),
            session=session,
            # Inside a transaction a progress write would conflict with the transaction's own
            # write to the control document: progress is then not recorded.
            report_progress=None
            if session is not None
            else functools.partial(self.control.progress, self._token),
        )
        return await function(self.db, context)

    async def _record_failure(
        self, token: int, step: Step, exc: Exception, started_at: datetime, started: float
    ) -> None:
        migration = step.migration
        failure = failure_record(
            "failed", step.running(), self.owner.as_document(), **error_fields(exc)
        )
        log.error(
            "migration %s failed: %s; leaving the lock stuck",
            migration.label(),
            failure["error"],
            extra=log_fields(
                "migration_failed",
                migration_version=migration.version,
                migration_name=migration.name,
                error=failure["error"],
            ),
        )
        await self._write(lambda: self.control.stick(token, failure))
        await self._write(
            lambda: self._recorded(token, step, "failed", started_at, started, error=exc)
        )

    async def _record_interruption(
        self, token: int, step: Step, started_at: datetime, started: float
    ) -> None:
        migration = step.migration
        if migration.idempotent or migration.transactional:  # a transaction left nothing
            log.warning(
                "cancelled inside migration %s, which is safe to run again: releasing the "
                "lock; the next boot re-runs it",
                migration.label(),
            )
            await self._write(lambda: self.control.release(token))
        else:
            log.error(
                "cancelled inside migration %s: leaving the lock stuck as interrupted",
                migration.label(),
            )
            failure = failure_record(
                "interrupted",
                step.running(),
                self.owner.as_document(),
                error="cancelled while running (the process was asked to stop)",
            )
            await self._write(lambda: self.control.stick(token, failure))
        await self._write(
            lambda: self._recorded(
                token, step, "interrupted", started_at, started, note="cancelled while running"
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
                    wait=self.retry_wait,
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
            if self._in_transaction:
                continue  # a beat would conflict with the transaction; it is short by design
            last_beat = max(last_beat, self._beaten_at)
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
