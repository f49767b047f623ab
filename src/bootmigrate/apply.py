"""The apply loop: run the planned steps under a held lock, record each one, and on failure or
cancellation leave the control document saying exactly what happened.

The lock's own rules (heartbeat, fencing, retried and refused writes) are ``lock.py``'s; this
module decides only what to write after each step.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
from pymongo.errors import PyMongoError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay
from tenacity.wait import wait_random_exponential

from .context import MigrationContext
from .control import Owner, failure_record, utc_now
from .drivers import TRANSIENT_TRANSACTION_ERROR, CommitOutcomeUnknown, transaction
from .errors import DatabaseUnavailable, LockLost, MigrationFailed
from .events import StepFields
from .history import Entry, Outcome, error_fields
from .ledger import Ledger
from .lock import HeldLock
from .logs import MigrationLogger
from .plan import Plan, Step
from .report import MigrationReport

log = logging.getLogger("bootmigrate")

# As long as PyMongo's own ``with_transaction`` keeps retrying: more than a dead holder's open
# transaction can live on the server (``transactionLifetimeLimitSeconds``, 60 s by default, and
# up to the reaper's next pass).
TRANSACTION_RETRY_SECONDS = 120.0


def _worth_another_transaction(exc: BaseException) -> bool:
    """A TransientTransactionError, or a commit left unanswered that turned out not to have
    been applied: either way the transaction is run again, from the start."""
    if isinstance(exc, CommitOutcomeUnknown):
        return True
    return isinstance(exc, PyMongoError) and exc.has_error_label(TRANSIENT_TRANSACTION_ERROR)


@dataclass(frozen=True)
class StepRun:
    """One step's run: when it started, on the wall clock for people and on the monotonic
    clock for its duration."""

    step: Step
    started_at: datetime
    started: float
    following: Step | None = None

    @classmethod
    def begin(cls, step: Step, following: Step | None = None) -> StepRun:
        """A run of ``step`` starting now, ``following`` to run after it (if any)."""
        return cls(step, utc_now(), time.monotonic(), following)

    def duration(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def entry(self, outcome: Outcome, token: int, **details: Any) -> Entry:
        """The history record of this run ending with ``outcome``."""
        migration = self.step.migration
        return Entry(
            version=migration.version,
            name=migration.name,
            outcome=outcome,
            direction=self.step.direction,
            started_at=self.started_at,
            duration=self.duration(),
            token=token,
            **details,
        )


@dataclass
class _Progress:
    """Where the loop is: the version reached, what ran, and whether a step is running."""

    version: int
    applied: list[int] = field(default_factory=list)
    reverted: list[int] = field(default_factory=list)
    inside: bool = False

    def done(self, step: Step) -> None:
        self.version = step.version_after
        (self.reverted if step.reverts else self.applied).append(step.migration.version)


class _CutOff(Exception):
    """The migration was cancelled: the call was asked to stop and ``shutdown_grace`` ran
    out before the migration finished."""


class _Stopped(Exception):
    """The call was asked to stop (cancelled); the lock has been left as the stop requires."""


class Applier:
    """Runs one plan under one held lock, for the length of one ``migrate()`` call."""

    def __init__(
        self,
        db: Any,
        held: HeldLock,
        owner: Owner,
        migration_timeout: float | None,
        shutdown_grace: float = 0.0,
        *,
        ledger: Ledger | None = None,
        presumed: Entry | None = None,
    ) -> None:
        self.db = db
        self.held = held
        # The ledger as it stands before the next step: each step's version write carries
        # it with that step counted (see ``ledger.py``).
        self.ledger = ledger
        self.presumed = presumed
        self.owner = owner
        self.migration_timeout = migration_timeout
        self.events = held.events
        self.shutdown_grace = shutdown_grace
        # The scope of the migration running now, and once the call is asked to stop, when
        # the grace ends (anyio's clock): every try of the migration from then on is cut off
        # at that time, a transaction's retries included.
        self._migration: anyio.CancelScope | None = None
        self._cut_at = math.inf

    async def apply(self, plan: Plan, waited: float) -> MigrationReport:
        """Run ``plan`` with the heartbeat going all along; release at the end.

        The work runs shielded, and a cancellation of this call only asks it to stop: at once
        between migrations (the lock released at the version reached), after
        ``shutdown_grace`` inside one (finished by then: recorded as applied; otherwise
        cancelled and recorded). The heartbeat goes on meanwhile, so the lock stays ours for
        as long as the grace lasts. The cancellation is raised once the lock is left."""
        stop = anyio.Event()
        if anyio.current_effective_deadline() == -math.inf:
            stop.set()  # cancelled already (while the lock was being taken): not one step
        report: MigrationReport | None = None
        error: Exception | None = None
        async with anyio.create_task_group() as watch:
            # Not `start()`: its checkpoint could take a cancellation before the shield is up,
            # leaving the lock held and unused. A task started in a cancelled scope still runs
            # up to its first checkpoint, so the stop is seen all the same.
            watch.start_soon(_set_when_cancelled, stop)
            with anyio.CancelScope(shield=True):
                try:
                    report = await self._apply(plan, waited, stop)
                except Exception as exc:  # raised below, outside the task group
                    error = exc
            watch.cancel_scope.cancel()
        if isinstance(error, _Stopped):
            await anyio.lowlevel.checkpoint()  # raises this call's own cancellation
        if error is not None:
            raise error
        assert report is not None
        return report

    async def _apply(self, plan: Plan, waited: float, stop: anyio.Event) -> MigrationReport:
        held = self.held
        state = _Progress(version=held.control.version)
        error: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(held.keep_alive, tasks.cancel_scope.cancel)
            tasks.start_soon(self._cut_off_after_grace, stop, state)
            try:
                await self._run_steps(plan, state, stop)
            except Exception as exc:  # re-raised below, outside the task group
                error = exc
            tasks.cancel_scope.cancel()
        if isinstance(error, (LockLost, DatabaseUnavailable)):
            raise error  # it already says when the loss was found, or why nothing answered
        if held.lost:
            raise held.lost_error("while running migrations") from error
        if error is not None:
            raise error
        self.events.emit(
            "migrations_done",
            "migrations done: database at version %d",
            state.version,
            db_version=state.version,
            applied=tuple(state.applied),
            reverted=tuple(state.reverted),
        )
        return MigrationReport(
            from_version=plan.from_version,
            to_version=state.version,
            applied=state.applied,
            reverted=state.reverted,
            waited=waited,
            holder=True,
        )

    async def _run_steps(self, plan: Plan, state: _Progress, stop: anyio.Event) -> None:
        steps = plan.steps
        try:
            for index, step in enumerate(steps):
                if index == 0:  # each later step is named by the version write before it
                    if stop.is_set():
                        raise _Stopped
                    if self.presumed is not None:
                        # Before the ledger that counts them.
                        await self.held.record(self.presumed)
                    await self.held.start(step.running(), step.unfinished(), applied=self.ledger)
                if stop.is_set():  # asked while it was being named: it never ran
                    await self.held.release("cancelled", unname=not self._resumes(step))
                    raise _Stopped
                following = steps[index + 1] if index + 1 < len(steps) else None
                await self._run_step(step, state, following)
            await self.held.release()
        except _Stopped:
            if not state.inside and not self.held.released:
                # Inside one, its end was recorded where it stopped.
                await self.held.release("cancelled")
            raise

    def _resumes(self, step: Step) -> bool:
        """Whether ``step`` was already unfinished when the lock was taken (an interrupted
        or failed step this call resumes): then its name stays, stopped or not."""
        before = self.held.control.unfinished_step
        return before is not None and step.is_step(before)

    async def _cut_off_after_grace(self, stop: anyio.Event, state: _Progress) -> None:
        """Once the call is asked to stop: the migration running (if any) has the grace to
        finish; then it, and any try of it still to come, is cancelled."""
        await stop.wait()
        self._cut_at = anyio.current_time() + self.shutdown_grace
        if self._migration is not None:
            self._migration.deadline = self._cut_at
        if state.inside:  # between migrations the loop stops at its next step
            self.events.emit(
                "stop_requested",
                "asked to stop while a migration runs: it has %g s (shutdown_grace) to finish",
                self.shutdown_grace,
                level=logging.WARNING,
                shutdown_grace_s=self.shutdown_grace,
            )

    async def _run_step(self, step: Step, state: _Progress, following: Step | None) -> None:
        """Run ``step``, named on the control document already; the write that records it
        names ``following``, the step to run next (if any)."""
        migration = step.migration
        run = StepRun.begin(step, following)
        self.events.emit(
            "migration_started",
            "running migration %s (%s)",
            migration.label(),
            step.direction,
            level=logging.DEBUG,
            **_identity(step),
            db_version=step.version_before,
        )
        # The server fences every control write, but not what the migration itself writes:
        # a holder paused past its lease since its last write must not start one.
        self.held.check_in_touch("before running a migration")
        state.inside = True  # stays set if the step is stopped: it is then handled here
        try:
            if migration.transactional:
                await self._run_in_transaction(run)
            else:
                await self._call(step)
        except _CutOff:
            await self._record_interruption(run)
            raise _Stopped from None
        except anyio.get_cancelled_exc_class():
            if not self.held.lost:  # only a lost lock cancels in here; kept as a safeguard
                await self._record_interruption(run)
            raise
        except LockLost:
            raise  # fenced inside the transaction: it was aborted, nothing was committed
        except Exception as exc:
            await self._record_failure(run, exc)
            raise MigrationFailed(
                version=migration.version,
                name=migration.name,
                direction=step.direction,
                host=self.owner.host,
                pid=self.owner.pid,
                collection=self.held.collection_name,
                db_version=step.version_before,
                error=f"{type(exc).__name__}: {exc}",
                out_of_order=step.out_of_order,
            ) from exc
        state.inside = False
        duration = run.duration()
        counted = self._counted(step)
        if migration.transactional:  # its record and version committed with the migration
            self._applied(step, duration)
        else:
            # The history record goes first: a holder that dies between it and the version
            # write leaves a step a taker can tell finished (see ControlLock.take_over).
            self.held.check_in_touch("before recording a migration applied")
            await self.held.record(self._applied_entry(run))
            self._applied(step, duration)
            await self.held.advance(step.version_after, then=following, applied=counted)
        self.ledger = counted
        state.done(step)

    def _counted(self, step: Step) -> Ledger | None:
        """The ledger with ``step`` counted (``None`` while none is kept)."""
        if self.ledger is None:
            return None
        return self.ledger.after_move(step.migration.version, step.direction, step.version_after)

    def _applied_entry(self, run: StepRun) -> Entry:
        """The history record of ``run`` applied, naming this acquisition: what a taker looks
        for to tell that the step finished."""
        step = run.step
        return run.entry(
            "applied",
            self.held.token,
            acquisition=self.held.acquisition,
            checksum=step.checksum,
            note=(
                f"out of order: the database was at version {step.version_after}"
                if step.out_of_order
                else None
            ),
        )

    def _applied(self, step: Step, duration: float) -> None:
        """Say the step is applied: its history record (and in a transaction, its version)
        is written."""
        migration = step.migration
        self.events.emit(
            "migration_applied",
            "applied migration %s (%s) in %.3f s",
            migration.label(),
            step.direction,
            duration,
            **_identity(step),
            duration_s=duration,
            db_version=step.version_after,
        )

    async def _run_in_transaction(self, run: StepRun) -> None:
        """The migration, its version and its history record, committed together or not at
        all, run again from the start after a TransientTransactionError as MongoDB prescribes
        (a write conflict, for example with a dead holder's transaction the server has not yet
        reaped), for at most ``TRANSACTION_RETRY_SECONDS``. Each try must end within half the
        lease, since the heartbeat waits meanwhile; its own fenced write refreshes the
        heartbeat."""
        step = run.step
        retrying = AsyncRetrying(
            retry=retry_if_exception(_worth_another_transaction),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_delay(TRANSACTION_RETRY_SECONDS),
            before_sleep=lambda state: self._transaction_retried(
                step, state.attempt_number, state.outcome.exception() if state.outcome else None
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    await self._transaction_attempt(run)
                except CommitOutcomeUnknown:
                    # Its fenced version write tells: applied with the commit, or not at all
                    # (then the transaction is run again, as after a transient error).
                    if not await self.held.reached(step.version_after, run.following):
                        raise
                    self.events.emit(
                        "commit_confirmed",
                        "migration %s: the commit went unanswered, but the control document "
                        "shows it applied",
                        step.migration.label(),
                        level=logging.WARNING,
                        **_identity(step),
                    )

    def _transaction_retried(self, step: Step, attempt: int, exc: BaseException | None) -> None:
        self.events.emit(
            "transaction_retried",
            "migration %s: transaction attempt %d hit a transient error (%s); running the "
            "transaction again",
            step.migration.label(),
            attempt,
            exc,
            level=logging.WARNING,
            **_identity(step),
            attempt=attempt,
            error=str(exc),
        )

    async def _transaction_attempt(self, run: StepRun) -> None:
        step = run.step
        # The heartbeat waits for the transaction, whose every part must therefore end well
        # within a lease of the beat before it: half for the migration, a quarter for the
        # commit (or abort) and its retries, a quarter left for the next beat.
        commit_within = self.owner.lease / 4
        async with (
            self.held.transaction_window(),
            transaction(self.db, commit_within) as session,
        ):
            await self._call(step, session, limit=self.owner.lease / 2)
            await self.held.record(self._applied_entry(run), session)
            await self.held.advance(
                step.version_after, session, then=run.following, applied=self._counted(step)
            )

    async def _call(self, step: Step, session: Any = None, limit: float | None = None) -> None:
        timeout = step.migration.timeout or self.migration_timeout
        if limit is not None:
            timeout = min(timeout or limit, limit)
        scope: anyio.CancelScope | None = None
        try:
            with (
                anyio.CancelScope(deadline=self._cut_at) as stoppable,
                anyio.fail_after(timeout) as scope,
            ):
                self._migration = stoppable
                try:
                    result = await self._invoke(step, session)
                finally:
                    self._migration = None
            if stoppable.cancelled_caught:
                raise _CutOff(
                    f"did not finish within shutdown_grace ({self.shutdown_grace:g} s) after "
                    "the process was asked to stop"
                )
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

    async def _invoke(self, step: Step, session: Any) -> Any:
        if not step.wants_context:
            return await step.function(self.db)
        migration = step.migration
        context = MigrationContext(
            db=self.db,
            version=migration.version,
            name=migration.name,
            direction=step.direction,
            log=MigrationLogger(log, {"migration": migration.version}),
            session=session,
            # Inside a transaction a progress write would conflict with the transaction's own
            # write to the control document: progress is then not recorded.
            report_progress=None if session is not None else self.held.progress,
        )
        return await step.function(self.db, context)

    async def _record_failure(self, run: StepRun, exc: Exception) -> None:
        migration = run.step.migration
        failure = failure_record(
            "failed", run.step.unfinished(), self.owner.as_document(), **error_fields(exc)
        )
        self.events.emit(
            "migration_failed",
            "migration %s failed: %s; leaving the lock stuck",
            migration.label(),
            failure["error"],
            level=logging.ERROR,
            **_identity(run.step),
            duration_s=run.duration(),
            error=failure["error"],
            error_type=type(exc).__name__,
            db_version=run.step.version_before,
            stuck=True,
        )
        await self.held.stick(failure)
        await self.held.record(run.entry("failed", self.held.token, error=exc))

    async def _record_interruption(self, run: StepRun) -> None:
        migration = run.step.migration
        why = (
            "the process was asked to stop and the migration did not finish within "
            f"shutdown_grace ({self.shutdown_grace:g} s)"
        )
        duration, before = run.duration(), run.step.version_before
        if migration.safe_to_repeat(run.step.direction):
            self.events.emit(
                "interrupted",
                "stopped inside migration %s (%s), which is safe to run again: releasing the "
                "lock; the next boot re-runs it",
                migration.label(),
                why,
                level=logging.WARNING,
                **_identity(run.step),
                duration_s=duration,
                db_version=before,
                stuck=False,
            )
            await self.held.release("interrupted")
        else:
            self.events.emit(
                "interrupted",
                "stopped inside migration %s (%s): leaving the lock stuck as interrupted",
                migration.label(),
                why,
                level=logging.ERROR,
                **_identity(run.step),
                duration_s=duration,
                db_version=before,
                stuck=True,
            )
            failure = failure_record(
                "interrupted",
                run.step.unfinished(),
                self.owner.as_document(),
                error=f"stopped while running: {why}",
            )
            await self.held.stick(failure)
        await self.held.record(run.entry("interrupted", self.held.token, note=f"stopped: {why}"))


async def _set_when_cancelled(stop: anyio.Event) -> None:
    """Set ``stop`` once the task group this runs in is cancelled, that is, once the call is."""
    try:
        await anyio.sleep_forever()
    finally:
        stop.set()


def _identity(step: Step) -> StepFields:
    """The fields that name a step in its events."""
    return {
        "migration_version": step.migration.version,
        "migration_name": step.migration.name,
        "direction": step.direction,
    }
